"""Autoregressive reward models (GenARM, PARM) as explicit value models: the store format,
and served guided scores against an independent computation with PEFT-merged models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cli.main import main as mage
from guidance.engine import Engine
from guidance.plan import build_plan
from guidance.requests import GenerationRequest, SamplingParams
from merging import get_merge_method
from model_store.errors import StoreError
from model_store.loader import load_store
from model_store.manifest import MANIFEST_NAME
from model_store.validate import check_store
from tests.common import build_tiny_store
from tests.test_batch import peft_merged, prefill, prompt_ids, reference_greedy

MU = torch.tensor([0.3, 0.7], dtype=torch.float64)
GAMMA = 2.0


@pytest.fixture(scope="module")
def arm_store(tmp_path_factory):
    """Circulant B, alpha 0.2, `arm` value models with betas 0.5 and 0.75."""
    return build_tiny_store(
        tmp_path_factory.mktemp("arm") / "s", beta=0.7, alpha=0.2, value_kind="arm"
    )


@pytest.fixture(scope="module")
def engine(arm_store):
    return Engine(load_store(arm_store, "cpu", "float32"))


def reference_arm_scores(root, store, mode: str, mu: torch.Tensor, gamma: float):
    """ids -> log pi + gamma sum_i mu_i beta_i log pi_r,i (Eq. 25 with GenARM's value), from
    whole transformers models: the Bone Soup policy and the value adapters merged by PEFT,
    alone (ensemble) or by Eq. (24) with mu (merged: beta_merged = sum_i mu_i beta_i)."""
    manifest, matrix = store.checked.manifest, store.checked.combination_matrix
    coefficients = get_merge_method("bone-soup").coefficients(matrix, mu, manifest.alpha)
    policy = peft_merged(root, [b.path for b in manifest.backbones], coefficients.tolist())
    specs = manifest.guidance.explicit
    betas = [spec.beta for spec in specs]
    weights = mu.tolist()

    def logp(model, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model(x).logits[0, -1].float(), -1)

    if mode == "explicit":
        merged = peft_merged(root, [s.path for s in specs], weights)
        beta = sum(w * b for w, b in zip(weights, betas, strict=True))
        value = lambda x: beta * logp(merged, x)  # noqa: E731
    else:
        alone = [peft_merged(root, [s.path], [1.0]) for s in specs]
        value = lambda x: sum(  # noqa: E731
            w * b * logp(m, x) for w, b, m in zip(weights, betas, alone, strict=True)
        )
    return lambda x: logp(policy, x) + gamma * value(x)


@pytest.mark.parametrize("mode", ["explicit", "explicit-ensemble"])
def test_served_arm_scores_equal_peft_merged_reference(engine, arm_store, mode):
    """The batch's guided scores at the last prompt token, for several left-padded prompts,
    equal log pi + gamma sum_i mu_i beta_i log pi_r,i computed with PEFT-merged models."""
    store = engine.store
    plan = build_plan(store, mode, MU, "bone-soup")
    ids = prompt_ids(store)
    batch, outputs = prefill(store, plan, ids)
    for member in batch.members:
        member.gamma = GAMMA
    batch._layout = None  # the members' gamma changed after the layout was built
    served = batch.scores(outputs)
    score = reference_arm_scores(arm_store, store, mode, MU, GAMMA)
    with torch.no_grad():
        expected = torch.stack([score(torch.tensor([p])) for p in ids])
    assert torch.allclose(served, expected, atol=1e-4)


@pytest.mark.parametrize("mode", ["explicit", "explicit-ensemble"])
def test_served_arm_greedy_equals_reference_greedy(engine, arm_store, mode):
    """Through the engine (KV cache, decode steps), every greedy token is the argmax of the
    independent guided score."""
    store = engine.store
    score = reference_arm_scores(arm_store, store, mode, MU, GAMMA)
    for ids in prompt_ids(store):
        request = GenerationRequest("t", tuple(ids), MU, mode, GAMMA, SamplingParams(), 8)
        served = [event.id for event in engine.run_to_completion(request)]
        assert served == reference_greedy(score, ids, 8, store.eos_ids)


def test_arm_guidance_moves_the_output_and_gamma_zero_does_not(engine):
    store = engine.store

    def tokens(mode: str, gamma: float) -> list[list[int]]:
        out = []
        for ids in prompt_ids(store):
            request = GenerationRequest("t", tuple(ids), MU, mode, gamma, SamplingParams(), 8)
            out.append([event.id for event in engine.run_to_completion(request)])
        return out

    unguided = tokens("none", 1.0)
    assert tokens("explicit", 0.0) == unguided
    assert tokens("explicit", 30.0) != unguided


def test_arm_plan_rows_are_value_adapters_merged_by_mu(engine):
    """Eq. (24): the merged mode's value row carries mu on the value slots; the ensemble
    runs each value adapter alone with term weight mu_i beta_i."""
    store = engine.store
    merged = build_plan(store, "explicit", MU, "bone-soup")
    (row,) = merged.arm_rows
    slots = store.value_slots
    assert merged.coefficients[row, slots].tolist() == pytest.approx(MU.tolist())
    assert merged.terms[-1].guidance == pytest.approx(0.3 * 0.5 + 0.7 * 0.75)
    ensemble = build_plan(store, "explicit-ensemble", MU, "bone-soup")
    assert [t.guidance for t in ensemble.terms[1:]] == pytest.approx([0.3 * 0.5, 0.7 * 0.75])
    assert not merged.values and not ensemble.values  # no value head is read


def test_arm_store_round_trip_and_cli(arm_store, tmp_path, capsys):
    """The manifest written by the builder reads back with kind, path and beta, and
    `mage store validate` / `inspect` accept it."""
    checked = check_store(arm_store)
    specs = checked.manifest.guidance.explicit
    assert [(s.kind, s.head, s.beta) for s in specs] == [("arm", None, 0.5), ("arm", None, 0.75)]
    assert mage(["store", "validate", str(arm_store)]) == 0
    assert mage(["store", "inspect", str(arm_store)]) == 0
    assert "arm values/helpful beta=0.5" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"head": "values/helpful-head.safetensors"}, "has no head"),
        ({"beta": None}, "finite beta > 0"),
        ({"beta": -1.0}, "finite beta > 0"),
        ({"kind": "lora"}, "needs a head file"),
    ],
)
def test_bad_arm_specs_are_refused_by_name(arm_store, tmp_path, change, message):
    root = tmp_path / "s"
    shutil.copytree(arm_store, root)
    path = root / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["guidance"]["explicit"][0].update(change)
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=message):
        check_store(root)


def test_arm_and_lora_values_do_not_mix(arm_store, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(arm_store, root)
    path = root / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["guidance"]["explicit"][0].update({"kind": "lora", "beta": None, "head": "h"})
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="mix kinds"):
        check_store(root)


def test_assemble_keeps_arm_values_and_takes_a_trained_arm_run(arm_store, tmp_path):
    """`mage store assemble --from` an ARM store keeps kind and beta; `--value OBJ=RUN` takes
    a `mage train value --kind arm` folder (adapter/ + metrics.json with its beta)."""
    copy = tmp_path / "copy"
    assert mage(["store", "assemble", str(copy), "--from", str(arm_store)]) == 0
    specs = check_store(copy).manifest.guidance.explicit
    assert [(s.kind, s.head, s.beta) for s in specs] == [("arm", None, 0.5), ("arm", None, 0.75)]
    run = tmp_path / "run"
    shutil.copytree(arm_store / "values" / "harmless", run / "adapter")
    (run / "metrics.json").write_text(json.dumps({"kind": "arm", "beta": 0.25}))
    mixed = tmp_path / "mixed"
    argv = ["store", "assemble", str(mixed), "--from", str(arm_store)]
    assert mage([*argv, "--value", f"helpful={run}"]) == 0
    specs = check_store(mixed).manifest.guidance.explicit
    assert [s.beta for s in specs] == [0.25, 0.75]
    store = load_store(mixed, "cpu", "float32")
    assert store.value_kind == "arm" and store.arm_betas == [0.25, 0.75]


def test_beam_lookahead_scores_a_beam_by_its_arm_reward(engine, arm_store):
    """Over `arm` values a beam's score is its reward sum_i mu_i beta_i sum_t log pi_r,i(y_t)
    (accumulated, as GenARM's r), computed here teacher-forced with PEFT-merged models."""
    from guidance.search import BeamSettings, beam_lookahead

    store = engine.store
    plan = build_plan(store, "explicit-ensemble", MU, "bone-soup")
    prompt = prompt_ids(store)[0]
    settings = BeamSettings(width=2, expansion=2, interval=3, seed=1)
    ((tokens, score),) = beam_lookahead(store, plan, [prompt], 6, GAMMA, set(), settings)
    specs = store.checked.manifest.guidance.explicit
    ids = torch.tensor([prompt + tokens])
    reward = 0.0
    with torch.no_grad():
        for w, spec in zip(MU.tolist(), specs, strict=True):
            model = peft_merged(arm_store, [spec.path], [1.0])
            logps = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), -1)
            reward += w * spec.beta * float(logps.gather(1, torch.tensor(tokens)[:, None]).sum())
    assert len(tokens) == 6
    assert score == pytest.approx(reward, abs=1e-4)
