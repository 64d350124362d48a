"""The architecture matrix: every served architecture, on a tiny random base, computes what
transformers computes.

For each entry of model_store.architectures.ARCHITECTURES:
- greedy Bone Soup decoding gives the tokens and log-probabilities (1e-4, fp32) of
  transformers' `generate` on an independent PEFT `cat` merge of the backbones with
  c = (1 + alpha) B^-1 mu (Eq. 13);
- a batch of mixed preferences and modes, prefilled in chunks and joined while others
  decode, gives each request what it gets alone;
- explicit guidance with LoRA value models gives argmax(log pi + gamma V) (Eq. 25) with V
  computed independently: PEFT's merge of the value adapters by mu and the head's formula
  V = E (P h + p) + c mixed by mu (Eq. 24).
The windowed architectures get a window shorter than the prompt, so every decode step
relies on the lanes dropping and masking the right columns.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from guidance.engine import Engine, EngineConfig
from guidance.kv import GROWTH, KVLane
from guidance.requests import TokenEvent
from model_store.architectures import ARCHITECTURES
from model_store.builder import build_random_store
from model_store.loader import load_store
from model_store.manifest import StoreManifest
from tests.common import make_request
from tests.tiny_architectures import CONFIGS, WINDOW, write_tiny_base

PROMPTS = (
    "How do I bake bread? The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, naïve café",
    "Merge and guide: controllable generation with value models, then wait.",
)
MU = (0.3, 0.7)
NEW_TOKENS = 10


def test_every_served_architecture_has_a_tiny_config():
    assert set(CONFIGS) == set(ARCHITECTURES)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch(request, tmp_path_factory) -> tuple[Path, Engine]:
    root = tmp_path_factory.mktemp(request.param) / "store"
    root.mkdir()
    write_tiny_base(root / "base", request.param)
    build_random_store(
        root, {"path": "base"}, ["a", "b"], beta=0.7, alpha=0.3, lora_std=0.3, head_std=0.5
    )
    return root, Engine(load_store(root, "cpu", "float32"))


def _manifest(root: Path) -> StoreManifest:
    return StoreManifest.model_validate_json((root / "mage_store.json").read_text())


def _peft_merge(root: Path, adapters: list[str], weights: list[float]) -> PeftModel:
    """The base with PEFT's exact ('cat') merge of `adapters` by `weights`, loaded afresh."""
    base = AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(root / adapters[0]), adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(str(root / path), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    model.add_weighted_adapter(names, weights, "merged", combination_type="cat")
    model.set_adapter("merged")
    return model.eval()


def _bone_soup(root: Path, mu) -> list[float]:
    """c = (1 + alpha) lambda, lambda = B^-1 mu (Sec. 3.3.5, Eq. 13), B's columns the w_i."""
    manifest = _manifest(root)
    matrix = torch.tensor([b.weights for b in manifest.backbones], dtype=torch.float64).T
    lambdas = torch.linalg.solve(matrix, torch.tensor(mu, dtype=torch.float64))
    return ((1 + manifest.alpha) * lambdas).tolist()


def _engine_tokens(engine: Engine, requests) -> list[tuple[list[int], list[float]]]:
    results = []
    for events in engine.run_all(list(requests)):
        assert all(isinstance(e, TokenEvent) for e in events), events[-1]
        results.append(([e.id for e in events], [e.logprob for e in events]))
    return results


def _ids(engine: Engine, prompt: str) -> list[int]:
    return engine.store.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_greedy_tokens_and_logprobs_equal_transformers_on_a_peft_merge(arch):
    root, engine = arch
    prompt = _ids(engine, PROMPTS[0])
    assert len(prompt) > 2 * WINDOW  # the window is shorter than the prompt
    merged = _peft_merge(root, [b.path for b in _manifest(root).backbones], _bone_soup(root, MU))
    eos = engine.store.tokenizer.eos_token_id
    out = merged.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    expected = out.sequences[0, len(prompt) :].tolist()
    expected_logprobs = [
        torch.log_softmax(logits[0].float(), -1)[token].item()
        for logits, token in zip(out.logits, expected, strict=True)
    ]
    request = make_request(engine.store, PROMPTS[0], MU, "none", NEW_TOKENS)
    [events] = engine.run_all([dataclasses.replace(request, prompt_logprobs=True)])
    tokens, logprobs = [e.id for e in events], [e.logprob for e in events]
    assert len(set(tokens)) > 1  # a random base that repeats one token would prove little
    assert tokens == expected
    assert logprobs == pytest.approx(expected_logprobs, abs=1e-4)
    # The prompt's own log-probabilities (TGI's decoder_input_details), from the prefill.
    with torch.inference_mode():
        logits = merged(input_ids=torch.tensor([prompt])).logits[0, :-1].float()
    prompt_logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(prompt[1:])[:, None])
    reported = [t["logprob"] for t in events[-1].details["prefill"][1:]]
    assert reported == pytest.approx(prompt_logprobs[:, 0].tolist(), abs=1e-4)


def test_mixed_preference_batches_equal_each_request_alone(arch):
    _, engine = arch
    store = engine.store
    requests = [
        make_request(store, PROMPTS[0], (0.3, 0.7), "none", 12, name="a"),
        make_request(store, PROMPTS[1], (0.9, 0.1), "implicit", 12, gamma=1.5, name="b"),
        make_request(store, PROMPTS[2], (0.5, 0.5), "explicit", 12, gamma=2.0, name="c"),
        make_request(store, PROMPTS[1], (0.2, 0.8), "implicit-ensemble", 12, name="d"),
    ]
    requests = [dataclasses.replace(r, ignore_eos=True) for r in requests]
    alone = [_engine_tokens(Engine(store), [r])[0] for r in requests]
    # A small prefill budget: prompts are prefilled in chunks and groups join the decoding
    # batch at different steps, so lanes of different lengths are joined and cut.
    together = _engine_tokens(Engine(store, EngineConfig(prefill_tokens=16)), requests)
    for (tokens, logprobs), (tokens_alone, logprobs_alone) in zip(together, alone, strict=True):
        assert tokens == tokens_alone
        assert logprobs == pytest.approx(logprobs_alone, abs=1e-4)


def _value(model: PeftModel, heads: list[dict], mu, ids: list[int]) -> torch.Tensor:
    """V of the last position: the merged value model's final hidden state h through the
    mu-mixed tied heads, sum_j mu_j (E (P_j h + p_j) + c_j)."""
    hidden = model.get_base_model().get_decoder()(input_ids=torch.tensor([ids]))
    h = hidden.last_hidden_state[0, -1]
    embedding = model.get_base_model().get_output_embeddings().weight
    return sum(
        w * (embedding @ (head["proj"] @ h + head["proj_bias"]) + head["out_bias"])
        for w, head in zip(mu, heads, strict=True)
    )


@torch.inference_mode()
def test_explicit_guidance_equals_log_pi_plus_gamma_v(arch):
    root, engine = arch
    manifest, gamma, mu = _manifest(root), 2.0, (0.6, 0.4)
    policy = _peft_merge(root, [b.path for b in manifest.backbones], _bone_soup(root, mu))
    values = _peft_merge(root, [v.path for v in manifest.guidance.explicit], list(mu))
    heads = [load_file(str(root / v.head)) for v in manifest.guidance.explicit]
    ids, expected, expected_logprobs = _ids(engine, PROMPTS[2]), [], []
    for _ in range(8):
        log_pi = torch.log_softmax(policy(input_ids=torch.tensor([ids])).logits[0, -1], -1)
        scores = log_pi + gamma * _value(values, heads, mu, ids)  # Eq. (25)
        token = int(scores.argmax())
        expected.append(token)
        expected_logprobs.append(torch.log_softmax(scores, -1)[token].item())
        ids = ids + [token]
    request = make_request(engine.store, PROMPTS[2], mu, "explicit", 8, gamma=gamma)
    [(tokens, logprobs)] = _engine_tokens(engine, [dataclasses.replace(request, ignore_eos=True)])
    assert tokens == expected
    assert logprobs == pytest.approx(expected_logprobs, abs=1e-4)


def test_sliding_layers_hold_only_their_window(arch):
    """Per-layer windows: after many decode steps a sliding-window layer's buffer stays near
    its window while a full-attention layer's holds every column."""
    _, engine = arch
    lane = KVLane(engine.store.model.get_decoder(), engine.store.device)
    windowed = "sliding_window" in CONFIGS[engine.store.model.config.model_type]
    assert any(w is not None for w in lane.windows) == windowed
    prompt = torch.tensor([_ids(engine, PROMPTS[0])])
    lane.open(1)
    lane.forward(prompt, torch.ones_like(prompt), [prompt.shape[1]])
    for _ in range(3 * GROWTH):
        lane.forward(prompt[:, -1:], torch.ones(1, 1, dtype=torch.long), [1])
    for window, layer in zip(lane.windows, lane.cache.layers, strict=True):
        held = layer.keys.shape[-2]
        if window is None:
            assert held >= lane.length
        else:
            assert held <= window + 2 * GROWTH < lane.length


HALF_PRECISION_TOLERANCE = {"bfloat16": 0.15, "float16": 0.02}
"""Largest |log pi| difference, in nats, between serving in half precision and an fp32
PEFT merge scoring the same tokens (docs/serve-your-own-model.md quotes these)."""


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "cohere", "gpt2"])
@pytest.mark.parametrize("dtype", sorted(HALF_PRECISION_TOLERANCE))
def test_half_precision_logprobs_stay_within_the_documented_tolerance(tmp_path, model_type, dtype):
    root = tmp_path / "store"
    write_tiny_base(root / "base", model_type)
    build_random_store(root, {"path": "base"}, ["a", "b"], beta=0.7, alpha=0.3, lora_std=0.3)
    engine = Engine(load_store(root, "cpu", dtype))
    request = make_request(engine.store, PROMPTS[0], MU, "none", 24)
    [(tokens, logprobs)] = _engine_tokens(engine, [dataclasses.replace(request, ignore_eos=True)])
    reference = _peft_merge(root, ["backbones/a", "backbones/b"], _bone_soup(root, MU))
    prompt = _ids(engine, PROMPTS[0])
    with torch.inference_mode():
        logits = reference(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    expected = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    expected = expected.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    difference = (torch.tensor(logprobs) - expected).abs().max().item()
    assert difference <= HALF_PRECISION_TOLERANCE[dtype]
