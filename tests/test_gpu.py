"""CUDA path: the same tokens on GPU as on CPU. Skipped where no GPU is present."""

from __future__ import annotations

import pytest
import torch

from guidance.engine import Engine
from model_store.loader import load_store
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
