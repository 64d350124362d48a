"""PEFT adapters as PEFT writes them: per-module rank/alpha patterns are matched the way PEFT
matches them, and options the server does not implement are refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from merging.lora import exact_merged_delta
from model_store.adapters import ADAPTER_CONFIG, load_lora_adapter
from model_store.errors import StoreError
from tests.common import write_tiny_base

RANK_PATTERN = {"model.layers.1.self_attn.v_proj": 2}
ALPHA_PATTERN = {
    "model.layers.0.self_attn.q_proj": 32,  # one layer, by its full name
    r"layers\.1\.self_attn\.(q|v)_proj": 3,  # a regex, as PEFT allows
}


@pytest.fixture(scope="module")
def patterned(tmp_path_factory):
    """A tiny base and a PEFT adapter with per-layer rank and alpha patterns."""
    root = tmp_path_factory.mktemp("patterned")
    base = write_tiny_base(root / "base")
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern=RANK_PATTERN,
        alpha_pattern=ALPHA_PATTERN,
        init_lora_weights=False,
    )
    torch.manual_seed(1)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(str(root / "adapter"), safe_serialization=True)
    return root


def test_patterns_match_peft_merge_and_unload(patterned):
    base = LlamaForCausalLM.from_pretrained(str(patterned / "base")).eval()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, str(patterned / "adapter")).merge_and_unload()
    ours = load_lora_adapter(patterned / "adapter", "patterned", torch.float32).modules
    assert len(ours) == 4  # q_proj and v_proj of both layers
    for module, factors in ours.items():
        peft_delta = merged.get_submodule(module).weight - original[f"{module}.weight"]
        assert torch.allclose(exact_merged_delta([factors], [1.0]), peft_delta, atol=1e-5), module
    # The patterns did apply (by last segment, none of these keys would have matched):
    assert ours["model.layers.0.self_attn.q_proj"].scale == 32 / 4
    assert ours["model.layers.1.self_attn.v_proj"].scale == 3 / 2
    assert ours["model.layers.1.self_attn.q_proj"].scale == 3 / 4
    assert ours["model.layers.0.self_attn.v_proj"].scale == 8 / 4


def edited_copy(patterned, tmp_path, **changes):
    target = tmp_path / "adapter"
    shutil.copytree(patterned / "adapter", target)
    config = json.loads((target / ADAPTER_CONFIG).read_text())
    config.update(changes)
    (target / ADAPTER_CONFIG).write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("use_dora", True),
        ("bias", "lora_only"),
        ("lora_bias", True),
        ("modules_to_save", ["lm_head"]),
        ("trainable_token_indices", [1, 2]),
        ("layer_replication", [[0, 1]]),
        ("target_parameters", ["mlp.experts.gate_up_proj"]),
        ("alora_invocation_tokens", [5, 6]),
        ("use_qalora", True),
        ("megatron_config", {"tensor_model_parallel_size": 2}),
        ("an_option_from_a_future_peft", 1),
    ],
)
def test_unimplemented_options_are_refused_by_name(patterned, tmp_path, option, value):
    adapter = edited_copy(patterned, tmp_path, **{option: value})
    with pytest.raises(StoreError, match=rf"{ADAPTER_CONFIG}: LoRA options .*{option}="):
        load_lora_adapter(adapter, "x", torch.float32)


def test_training_and_selection_options_are_accepted(patterned, tmp_path):
    adapter = edited_copy(
        patterned,
        tmp_path,
        init_lora_weights="gaussian",
        lora_dropout=0.1,
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        exclude_modules=["lm_head"],
        an_option_from_a_future_peft=None,  # unset: harmless whatever it means
    )
    assert len(load_lora_adapter(adapter, "x", torch.float32).modules) == 4


def test_config_rank_must_match_the_tensors(patterned, tmp_path):
    adapter = edited_copy(patterned, tmp_path, r=8)
    with pytest.raises(StoreError, match="q_proj: tensors have rank 4, the config says r=8"):
        load_lora_adapter(adapter, "x", torch.float32)
