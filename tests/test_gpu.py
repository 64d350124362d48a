"""CUDA path: the same tokens on GPU as on CPU. Skipped where no GPU is present."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from evaluation.methods import METHODS, generate_batch
from guidance.engine import Engine
from guidance.requests import SamplingParams
from guidance.search import BeamSettings
from model_store.loader import load_store
from tests.common import make_request
from tests.test_decoding import MODES, token_ids

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("mode", MODES)
def test_cuda_float32_matches_cpu(tiny_store, mode):
    cpu = Engine(load_store(tiny_store, "cpu", "float32"))
    gpu = Engine(load_store(tiny_store, "cuda", "float32"))
    assert gpu.store.device.type == "cuda"
    mu = [0.3, 0.7]
    assert token_ids(gpu, mu, mode, gamma=1.0, max_new=8) == token_ids(cpu, mu, mode, 1.0, 8)


def test_cuda_bfloat16_runs_every_mode(tiny_store):
    engine = Engine(load_store(tiny_store, "cuda", "auto"))
    assert engine.store.dtype == torch.bfloat16
    for mode in MODES:
        assert 1 <= len(token_ids(engine, [0.5, 0.5], mode, gamma=1.0, max_new=4)) <= 4


def _eval_prompts(store) -> list[list[int]]:
    texts = ("How do I bake bread?", "Hi", "Tell me a long story about a dragon")
    return [store.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("method", sorted(m for m in METHODS if not METHODS[m].oracle))
def test_cuda_batched_eval_methods_match_cpu(tiny_store, method):
    """The evaluation's batched path (padding, MOD, pi* merges, beam reorders) on CUDA."""
    outputs = []
    for device in ("cpu", "cuda"):
        store = load_store(tiny_store, device, "float32")
        eos = store.eos_ids
        beam = BeamSettings(width=2, expansion=2, interval=3)
        outputs.append(
            generate_batch(store, method, (0.3, 0.7), _eval_prompts(store), 6, 1.0, eos, beam)
        )
    assert outputs[0] == outputs[1]


def test_cuda_bfloat16_batched_eval_runs_every_method(tiny_store):
    store = load_store(tiny_store, "cuda", "auto")
    eos = store.eos_ids
    for method in (m for m in METHODS if not METHODS[m].oracle):  # oracles need rewards
        out = generate_batch(
            store, method, (0.5, 0.5), _eval_prompts(store), 4, 1.0, eos, BeamSettings(2, 1, 2)
        )
        assert len(out) == 3 and all(1 <= len(tokens) <= 4 for tokens in out)


def test_cuda_concurrent_mixed_batch_matches_cpu(tiny_store):
    """The batched engine on CUDA: eight preferences and every mode in one batch give the
    CPU's tokens (fp32), and bf16 runs the same batch."""
    from tests.test_engine import ids_of, mixed_requests

    cpu = load_store(tiny_store, "cpu", "float32")
    gpu = load_store(tiny_store, "cuda", "float32")
    expected = [ids_of(events) for events in Engine(cpu).run_all(mixed_requests(cpu))]
    got = [ids_of(events) for events in Engine(gpu).run_all(mixed_requests(gpu))]
    assert got == expected
    bf16 = load_store(tiny_store, "cuda", "auto")
    assert all(len(ids_of(events)) >= 1 for events in Engine(bf16).run_all(mixed_requests(bf16)))


def test_cuda_sampling_settings_and_prompt_logprobs_match_cpu(tiny_store):
    """Repetition penalty, top-n alternatives and prompt log-probabilities on CUDA (greedy:
    CPU and CUDA generators draw different numbers, so sampled rows only have to run)."""
    results = []
    for device in ("cpu", "cuda"):
        store = load_store(tiny_store, device, "float32")
        sampling = SamplingParams(repetition_penalty=1.5, top_n=3)
        request = make_request(store, "How do I bake bread?", (0.3, 0.7), "explicit", 8, sampling)
        events = Engine(store).run_to_completion(replace(request, prompt_logprobs=True))
        prefill = [p["logprob"] for p in events[-1].details["prefill"][1:]]
        results.append(([e.id for e in events], [[t.id for t in e.top_tokens] for e in events]))
        results.append(prefill)
        typical = replace(request, sampling=SamplingParams(1.0, seed=3, typical_p=0.7, top_n=2))
        assert len(Engine(store).run_to_completion(typical)) == 8
    assert results[0] == results[2]
    assert results[1] == pytest.approx(results[3], abs=1e-4)
