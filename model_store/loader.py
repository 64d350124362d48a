"""Load a checked store once onto the serving device: one base, every adapter, every head."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from model_store.adapters import ADAPTER_WEIGHTS, LoraAdapter, load_lora_adapter
from model_store.architectures import OutputHead, output_head, verify_output_head
from model_store.errors import StoreError
from model_store.multi_lora import RowCoefficients, wrap_linear_layers
from model_store.validate import CheckedStore, baseline_adapters, check_store, resolve
from model_store.value_head import HeadBank, ValueHead, load_value_head

END_OF_DOCUMENT_TOKENS = frozenset({"<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>"})
"""Special tokens that end a document in common tokenizers; generating one ends a response."""


@dataclass(frozen=True)
class LoadedStore:
    """Everything the engine needs, resident on one device.

    Adapter slots: 0..n-1 are the backbones (objective order of B's columns); then the
    explicit value adapters in objective order, when the value models are LoRA (`lora`,
    `arm`); then the Rewarded-Soup specialists, when the manifest lists them.
    """

    checked: CheckedStore
    """The statically checked store (manifest, B, paths)."""
    model: PreTrainedModel
    """The one base model, its targeted linears wrapped by MultiLoraLinear."""
    tokenizer: object
    """The base tokenizer."""
    coefficients: RowCoefficients
    """Per-row adapter coefficients read by every wrapped layer."""
    output_head: OutputHead
    """The base's lm_head and the transforms its forward applies after it."""
    value_kind: str | None
    """'lora', 'standalone', 'arm' or None when the store has no explicit value models."""
    value_heads: tuple[ValueHead, ...]
    """Explicit value heads in objective order."""
    value_bank: HeadBank | None
    """The same heads stacked, for mixing them per row (None without explicit guidance)."""
    standalone_values: tuple[PreTrainedModel, ...]
    """Standalone value models in objective order (empty for 'lora')."""
    device: torch.device
    """Where everything lives."""
    dtype: torch.dtype
    """Model dtype."""
    baseline_slots: dict[str, int] = field(default_factory=dict)
    """Slots of the baselines' adapters, after the specialists: 'ric' (always loaded when the
    manifest has one: merge_method "ric" serves it), and 'morlhf:<mu>' / 'modpo:<mu>'
    (validate.preference_slot_name) when loaded for evaluation."""

    @property
    def objectives(self) -> list[str]:
        return list(self.checked.manifest.objectives)

    @property
    def n_objectives(self) -> int:
        return len(self.checked.manifest.objectives)

    @property
    def eos_ids(self) -> set[int]:
        """Tokens that end a response: the tokenizer's EOS, the generation config's and the
        model config's, and the tokenizer's end-of-document token when it is a special
        token (SmolLM2-Instruct ends chat turns with <|im_end|> but may still emit its
        pretraining <|endoftext|>; text after either is not part of the answer)."""
        ids = {self.tokenizer.eos_token_id}
        for config in (self.model.generation_config, self.model.config):
            eos = getattr(config, "eos_token_id", None)
            ids |= set(eos) if isinstance(eos, list) else {eos}
        specials = set(self.tokenizer.all_special_tokens)
        for token in END_OF_DOCUMENT_TOKENS & specials:
            ids.add(self.tokenizer.convert_tokens_to_ids(token))
        return {i for i in ids if i is not None}

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token of one batch row takes: keys and values of every layer."""
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        size = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * config.num_hidden_layers * heads * head_dim * size

    @property
    def backbone_slots(self) -> list[int]:
        return list(range(self.n_objectives))

    @property
    def value_slots(self) -> list[int]:
        n = self.n_objectives
        return list(range(n, 2 * n)) if self.value_kind in ("lora", "arm") else []

    @property
    def arm_betas(self) -> list[float]:
        """beta_i of each `arm` value model, in objective order (empty for other kinds):
        V_i = beta_i log pi_r,i."""
        if self.value_kind != "arm":
            return []
        by_objective = {s.objective: s.beta for s in self.checked.manifest.guidance.explicit}
        return [float(by_objective[name]) for name in self.objectives]  # type: ignore[arg-type]

    @property
    def specialist_slots(self) -> list[int]:
        first = self.n_objectives + len(self.value_slots)
        return list(range(first, first + len(self.checked.manifest.specialists)))

    @property
    def slot_count(self) -> int:
        first_extra = self.n_objectives + len(self.value_slots)
        return first_extra + len(self.checked.manifest.specialists) + len(self.baseline_slots)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_causal_lm(path: Path, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """Safetensors only, local only, no remote code."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=False,
        )
    except (OSError, ValueError) as exc:
        raise StoreError(path, f"cannot load model: {exc}") from None
    return model.to(device).eval()


def _install_adapters(model: PreTrainedModel, adapters: list[LoraAdapter]) -> RowCoefficients:
    """Wrap every targeted layer once and give it each adapter's factors; StoreError names
    the adapter whose target is not a Linear/Conv1D of this model or has the wrong shape."""
    coefficients = RowCoefficients()
    wrapped = {}
    for slot, adapter in enumerate(adapters):
        try:
            wrapped |= wrap_linear_layers(model, set(adapter.modules) - set(wrapped), coefficients)
            for module, factors in adapter.modules.items():
                wrapped[module].add_adapter(slot, factors)
        except (TypeError, ValueError, AttributeError) as exc:
            raise StoreError(adapter.path / ADAPTER_WEIGHTS, f"cannot apply it: {exc}") from None
    return coefficients


def load_store(
    path: Path | str, device: str = "auto", dtype: str = "auto", preference_adapters: bool = False
) -> LoadedStore:
    """Load a checked store; `preference_adapters` also loads the MORLHF and MODPO adapters
    (evaluation only: the server never answers with them)."""
    checked = check_store(path)
    manifest, root = checked.manifest, checked.root
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    model = load_causal_lm(checked.base_path, torch_device, torch_dtype)
    head = output_head(model, checked.architecture)
    verify_output_head(model, head, checked.base_path / "config.json")
    tokenizer = AutoTokenizer.from_pretrained(str(checked.base_path), local_files_only=True)

    def adapter(spec_path: str, name: str) -> LoraAdapter:
        loaded = load_lora_adapter(resolve(root, spec_path), name, torch_dtype)
        for factors in loaded.modules.values():
            object.__setattr__(factors, "lora_a", factors.lora_a.to(torch_device))
            object.__setattr__(factors, "lora_b", factors.lora_b.to(torch_device))
        return loaded

    adapters = [adapter(b.path, b.name) for b in manifest.backbones]
    by_objective = {spec.objective: spec for spec in manifest.guidance.explicit}
    specs = [by_objective[name] for name in manifest.objectives] if by_objective else []
    value_kind = specs[0].kind if specs else None
    standalone: list[PreTrainedModel] = []
    if value_kind in ("lora", "arm"):
        adapters += [adapter(spec.path, f"value:{spec.objective}") for spec in specs]
    elif value_kind == "standalone":
        standalone = [
            load_causal_lm(resolve(root, s.path), torch_device, torch_dtype) for s in specs
        ]
    adapters += [adapter(s.path, s.name) for s in manifest.specialists]
    baselines = {
        name: spec_path
        for name, spec_path in baseline_adapters(manifest).items()
        if name == "ric" or preference_adapters
    }
    baseline_slots = {name: len(adapters) + i for i, name in enumerate(baselines)}
    adapters += [adapter(spec_path, name) for name, spec_path in baselines.items()]
    heads = tuple(
        load_value_head(resolve(root, s.head)).to(torch_device, torch_dtype)
        for s in specs
        if s.head is not None  # 'arm' values are scored by the base's own lm_head
    )
    coefficients = _install_adapters(model, adapters)
    return LoadedStore(
        checked,
        model,
        tokenizer,
        coefficients,
        head,
        value_kind,
        heads,
        HeadBank.stack(heads),
        tuple(standalone),
        torch_device,
        torch_dtype,
        baseline_slots,
    )
