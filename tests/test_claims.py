"""What makes the comparison's claims checkable: MAGE-I weighted by lambda = B^-1 mu
(Eq. 11-12), the paired bootstrap, the fixed HV reference, the tuned gammas per mode, and the
paper's beam configurations sampled as Sec. 5.2.2 does."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
import torch

from cli.main import main as mage
from evaluation.metrics import chord_gaps, controllability, hypervolume
from evaluation.stats import (
    bootstrap,
    chord_gap_intervals,
    default_pairs,
    differences,
    method_intervals,
)
from guidance.plan import build_plan
from guidance.search import PAPER_BEAMS
from merging.coefficients import solve_lambda
from model_store.builder import write_manifest
from model_store.loader import load_store
from model_store.manifest import MANIFEST_NAME
from tests.test_batch import prefill

REWARDS = "tests.test_eval:response_length,tests.test_eval:vowel_share"


@pytest.fixture(scope="module")
def store(tiny_store):
    return load_store(tiny_store, "cpu", "float32")


def _policy_logprobs(store, ids, **plan_args) -> torch.Tensor:
    mu = plan_args.pop("mu")
    plan = build_plan(store, "none", torch.tensor(mu, dtype=torch.float64), **plan_args)
    batch, outputs = prefill(store, plan, ids)
    return batch.parts(outputs)[0]


@pytest.mark.parametrize("mix", ["lambda", "mu"])
def test_mage_i_weighs_backbones_by_lambda(store, mix):
    """V of implicit-ensemble = sum_i w_i log pi_i - log pi_ref with w = B^-1 mu (so
    sum_i w_i h_i = mu^T r), or w = mu for the ablation; pi_i is backbone i alone."""
    mu = torch.tensor([0.3, 0.7], dtype=torch.float64)
    plan = build_plan(store, "implicit-ensemble", mu, "bone-soup", implicit_mix=mix)
    matrix = store.checked.combination_matrix
    weights = solve_lambda(matrix, mu) if mix == "lambda" else mu
    used = torch.tensor(plan.mix, dtype=torch.float64)
    assert torch.allclose(used, weights)
    if mix == "lambda":  # Eq. 12 from the plan's own weights: B lambda = mu, and lambda != mu
        assert torch.allclose(matrix @ used, mu)
        assert not torch.allclose(used, mu, atol=0.05)  # else the two mixes look the same
    ids = [store.tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("Hi", "Bake?")]
    batch, outputs = prefill(store, plan, ids)
    value = batch.parts(outputs)[1]
    alone = [_policy_logprobs(store, ids, mu=e, merge_method="direct") for e in ([1, 0], [0, 1])]
    reference = _policy_logprobs(store, ids, mu=[1, 0], merge_method="direct", policy="base")
    expected = sum(float(w) * lp for w, lp in zip(weights, alone, strict=True)) - reference
    assert torch.allclose(value, expected, atol=1e-4)
    with pytest.raises(ValueError, match="implicit_mix"):
        build_plan(store, "implicit-ensemble", mu, "bone-soup", implicit_mix="nu")


def test_paired_bootstrap_by_hand():
    rng = np.random.default_rng(1)
    prefs = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    b = rng.normal(size=(3, 30, 2))
    a = b + np.array([0.5, 0.0])  # better in objective 0 on every prompt
    ref = np.array([-5.0, -5.0])
    reps = bootstrap({"a": a, "b": b, "c": b.copy()}, prefs, ref, replicates=200, seed=3)
    # replicate 0 by hand: the same draws, each method's mean front over them
    draws = np.random.default_rng(3).integers(0, 30, size=(200, 30))[0]
    front = b[:, draws, :].mean(axis=1)
    assert reps.hv["b"][0] == pytest.approx(hypervolume(front, ref))
    assert reps.controllability["b"][0] == pytest.approx(controllability(front, prefs))
    points = {
        k: {"hv": hypervolume(v.mean(1), ref), "controllability": 1.0}
        for k, v in {"a": a, "b": b, "c": b}.items()
    }
    diffs = {(d["a"], d["b"]): d for d in differences(reps, points, [("a", "b"), ("c", "b")])}
    assert diffs[("a", "b")]["holds"] and diffs[("a", "b")]["hv_diff_ci"][0] > 0
    same = diffs[("c", "b")]
    assert same["hv_diff_ci"] == [0.0, 0.0] and not same["holds"]  # paired: noise cancels
    ci = method_intervals(reps)["b"]["hv"]
    assert ci[0] < points["b"]["hv"] < ci[1]


def test_chord_gap_interval_by_hand():
    """Observation 3's mean gap gets an interval from the same prompt draws as the HV."""
    rng = np.random.default_rng(2)
    prefs = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    arr = rng.normal(size=(3, 40, 2))
    arr[1] += 1.0  # the interior point lies far above the chord in both objectives
    ci = chord_gap_intervals(arr, prefs, replicates=300, seed=5)
    draws = np.random.default_rng(5).integers(0, 40, size=(300, 40))
    gaps = np.array([chord_gaps(arr[:, d, :].mean(axis=1), prefs)["mean_gap"] for d in draws])
    assert np.allclose(ci, [np.percentile(gaps[:, k], [2.5, 97.5]) for k in range(2)])
    assert all(lo > 0 for lo, _ in ci)  # a clear gap excludes zero
    flat = arr.copy()
    flat[1] = (flat[0] + flat[2]) / 2  # on the chord for every prompt: the interval is 0
    assert np.allclose(chord_gap_intervals(flat, prefs, replicates=50), 0.0, atol=1e-12)


def test_default_pairs():
    labels = ["bone-soup", "rewarded-soup", "mage-i-m", "beam-b2c1l5", "mage-e-m", "mage-e-m@g1"]
    labels.append("beam")  # e.g. b1c1: sampling without search
    assert ("beam-b2c1l5@g1", "beam@g1") in default_pairs([*labels, "beam-b2c1l5@g1", "beam@g1"])
    assert default_pairs(labels) == [
        ("bone-soup", "rewarded-soup"),
        ("mage-e-m", "bone-soup"),
        ("mage-i-m", "bone-soup"),
        ("beam-b2c1l5", "mage-i-m"),
        ("beam", "mage-i-m"),
        ("beam-b2c1l5", "beam"),
        ("mage-e-m", "mage-e-m@g1"),
    ]
    table2 = default_pairs(["bone-soup", "mage-e-m", "ric", "modpo", "morlhf", "oracle-bok"])
    for pair in (("mage-e-m", "ric"), ("bone-soup", "morlhf"), ("mage-e-m", "modpo")):
        assert pair in table2  # the differences the paper's Sec. 5.2 discusses
    assert ("oracle-bok", "mage-e-m") in table2  # the value model's gap to the oracle


TABLE_4_BEAMS = ("b2c1l5", "b2c2l5", "b2c1l10", "b2c2l10", "b4c1l10")
"""The beam configurations of the paper's Table 4: b beams kept, c samples each, l tokens."""


@pytest.mark.parametrize("label", TABLE_4_BEAMS)
def test_paper_beams_sample_as_section_5_2_2(store, monkeypatch, label):
    """`mage eval --methods beam-<label>` keeps b beams of c samples each, selects every l
    tokens, and samples every token at temperature 1, top-k 50, top-p 0.9 (Sec. 5.2.2),
    whatever the run's own --beam-* flags say. Read off the search while it runs."""
    import guidance.search as search
    from evaluation.methods import generate_batch
    from guidance.batch import Batch
    from guidance.search import BeamSettings

    assert set(PAPER_BEAMS) == set(TABLE_4_BEAMS)
    width, expansion, interval = map(int, re.fullmatch(r"b(\d+)c(\d+)l(\d+)", label).groups())
    events: list[tuple] = []
    real_warp, real_keep = search.warp, Batch.keep

    def warp(scores, params):
        events.append(("warp", len(params), {(p.temperature, p.top_k, p.top_p) for p in params}))
        return real_warp(scores, params)

    def keep(self, rows):
        events.append(("keep", list(rows)))
        return real_keep(self, rows)

    monkeypatch.setattr(search, "warp", warp)
    monkeypatch.setattr(Batch, "keep", keep)
    prompts = [store.tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("Hi", "Bake?")]
    flags = BeamSettings(1, 1, 1, temperature=0.5, top_k=3, top_p=0.5)  # a named beam ignores
    tokens = 2 * interval + 1  # two selections, then one token of a third chunk
    generate_batch(store, f"beam-{label}", (0.3, 0.7), prompts, tokens, 1.0, set(), flags)
    group = width * expansion  # candidates per prompt
    warps = [e for e in events if e[0] == "warp"]
    assert len(warps) == tokens
    assert all(n == 2 * group and settings == {(1.0, 50, 0.9)} for _, n, settings in warps)
    at = [i for i, e in enumerate(events) if e[0] == "keep"]
    chunks = [sum(e[0] == "warp" for e in events[a:b]) for a, b in itertools.pairwise(at)]
    assert chunks == [interval] * 2  # l tokens sampled between two selections
    assert events[at[0]][1] == [0] * group + [1] * group  # each prompt's b x c candidates
    for _, chosen in (events[i] for i in at[1:]):
        for p in range(2):  # per prompt: b survivors of its own candidates, c samples each
            part = chosen[p * group : (p + 1) * group]
            assert all(p * group <= k < (p + 1) * group for k in part)
            assert len(set(part)) == width and all(part.count(k) == expansion for k in part)


def scaled_store(path, gamma_by_mode: dict | None = None) -> None:
    """Give a tiny store a reward scale (for the test rewards) and tuned gammas."""
    data = json.loads((path / MANIFEST_NAME).read_text())
    data["reward_scale"] = {
        "center": [10.0, 0.3],
        "scale": [5.0, 0.1],
        "hv_reference": [-3.0, -3.0],
        "samples": 8,
    }
    data["defaults"]["gamma_by_mode"] = gamma_by_mode or {}
    write_manifest(path, data)


def test_eval_reports_rescaled_rewards_intervals_and_tuned_gammas(store_copy, tmp_path, capsys):
    scaled_store(store_copy, {"explicit": 3.0})
    methods = "bone-soup,rewarded-soup,rewarded-soup-a,bone-soup-a0,mage-e-m,mage-i,mage-i-mu"
    args = ["eval", "--store", str(store_copy), "--out", str(tmp_path / "ev"), "--methods"]
    args += [methods + ",beam-b2c1l5,lmc-explicit", "--preferences", "1,0;0.5,0.5;0,1"]
    args += ["--rewards", REWARDS, "--split", "validation", "--limit", "3"]
    args += ["--max-new-tokens", "4", "--batch-size", "3", "--replicates", "50"]
    assert mage(args) == 0
    results = json.loads((tmp_path / "ev/results.json").read_text())
    labels = set(methods.split(",")) | {"beam-b2c1l5", "lmc-explicit", "mage-e-m@g1"}
    labels.add("lmc-explicit@g1")  # an explicit-mode diagnostic: at the tuned gamma and at 1
    assert set(results["variants"]) == labels
    assert results["variants"]["mage-e-m"]["gamma"] == 3.0
    assert results["variants"]["mage-e-m@g1"]["gamma"] == 1.0
    assert results["variants"]["mage-i"]["gamma"] == 1.0  # no tuned gamma: the default
    raw = np.array(results["per_prompt_raw_rewards"]["bone-soup"])
    assert raw.shape == (3, 3, 2)
    rescaled = (raw.mean(axis=1) - [10.0, 0.3]) / [5.0, 0.1]
    assert np.allclose(results["mean_rewards"]["bone-soup"], rescaled, atol=1e-4)
    assert results["reference_point"] == [-3.0, -3.0]
    bone = results["metrics"]["bone-soup"]
    assert bone["hv"] == pytest.approx(hypervolume(rescaled, [-3.0, -3.0]), abs=1e-3)
    assert len(bone["hv_ci"]) == 2 and len(bone["controllability_ci"]) == 2
    pairs = {(c["a"], c["b"]) for c in results["comparisons"]}
    assert ("bone-soup", "rewarded-soup") in pairs and ("mage-e-m", "mage-e-m@g1") in pairs
    assert ("bone-soup", "bone-soup-a0") in pairs and ("mage-i", "mage-i-mu") in pairs
    assert ("beam-b2c1l5", "mage-i-m") not in pairs  # greedy mage-i-m was not run
    assert not any("lmc" in a + b for a, b in pairs)  # diagnostics are never compared
    lmc = results["metrics"]["lmc-explicit"]["lmc"]
    assert [len(ci) for ci in lmc["mean_gap_ci"]] == [2, 2]
    gammas = {json.loads(x)["gamma"] for x in (tmp_path / "ev/generations.jsonl").open()}
    assert gammas == {1.0, 3.0}
    table = (tmp_path / "ev/table.md").read_text()
    assert "HV reference point: r~ = (-3, -3)" in table and "(r~ = (-3, -3))" in table
    assert "share above chord, mean gap [95% CI]" in table and "| lmc-explicit | " in table
    capsys.readouterr()
    assert mage(args) == 0  # resumed: nothing generated again
    assert "0s generating" in capsys.readouterr().out


def test_eval_needs_a_fixed_reference(tiny_store, tmp_path, capsys):
    args = ["eval", "--store", str(tiny_store), "--out", str(tmp_path), "--limit", "1"]
    assert mage(args + ["--rewards", REWARDS]) == 2
    assert "--hv-reference" in capsys.readouterr().err


def test_eval_refuses_a_single_preference(tiny_store, tmp_path, capsys):
    """One point has no sparsity, spacing or controllability: refused, never a NaN in JSON."""
    args = ["eval", "--store", str(tiny_store), "--out", str(tmp_path), "--preferences", "1,0"]
    assert mage(args + ["--rewards", REWARDS, "--hv-reference=-1,-1"]) == 2
    assert "--preferences: give at least two" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_tune_gamma_writes_each_modes_choice(store_copy, tmp_path, capsys):
    scaled_store(store_copy)
    args = [
        "tune",
        "gamma",
        "--store",
        str(store_copy),
        "--methods",
        "mage-e-m,mage-i,lmc-implicit",
    ]
    args += ["--grid", "0.1,5", "--preferences", "1,0;0,1", "--limit", "2"]
    args += ["--max-new-tokens", "3", "--rewards", REWARDS, "--write", "--work", str(tmp_path)]
    assert mage(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lines = (tmp_path / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 2 * 2 * 2  # methods x gammas x preferences x prompts
    assert mage(args) == 0  # resumed: every response from the cache
    assert len((tmp_path / "generations.jsonl").read_text().splitlines()) == len(lines)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert json.loads((tmp_path / "result.json").read_text()) == result
    for method in ("mage-e-m", "mage-i"):
        volumes = result[method]["hypervolume"]
        assert result[method]["chosen_gamma"] == float(max(volumes, key=volumes.get))
        assert set(result[method]["hv_ci"]) == {"0.1", "5.0"}
        assert result[method]["reference_point"] == [-3.0, -3.0]
    defaults = load_store(store_copy, "cpu", "float32").checked.manifest.defaults
    assert defaults.gamma_by_mode == {  # lmc-implicit is a diagnostic: it sets nothing
        "explicit": result["mage-e-m"]["chosen_gamma"],
        "implicit-ensemble": result["mage-i"]["chosen_gamma"],
    }
    assert mage(["tune", "gamma", "--store", str(store_copy), "--methods", "bone-soup"]) == 2


def test_tune_alpha_grid_has_zero_and_beyond_a_half(store_copy, capsys):
    """`mage tune alpha` with its default grid tries Bone Soup without extrapolation
    (alpha = 0 in Eq. 13) and extrapolation past one half."""
    scaled_store(store_copy)
    args = ["tune", "alpha", "--store", str(store_copy), "--preferences", "1,0;0,1"]
    args += ["--limit", "2", "--max-new-tokens", "3", "--rewards", REWARDS]
    assert mage(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tried = {float(a) for a in result["hypervolume"]}
    assert 0.0 in tried and max(tried) > 0.5 and result["reference_point"] == [-3, -3]
    losers = {a for a in result["hypervolume"] if float(a) != result["chosen_alpha"]}
    assert set(result["margin_ci"]) == losers


def test_server_takes_the_tuned_gamma_of_the_requested_mode(store_copy):
    from server.schemas import Steering
    from server.settings import ServerSettings
    from server.translate import Options, Prompt, build_request, parse_steering

    scaled_store(store_copy, {"implicit": 3.0})
    loaded = load_store(store_copy, "cpu", "float32")
    settings = ServerSettings(store=str(store_copy))

    def gamma(steering: Steering) -> float:
        return build_request(Prompt(text="Hi"), Options(steering), loaded, settings).gamma

    def body(guidance: dict) -> float:  # TGI parameters and OpenAI extras share Steering
        return gamma(Steering.model_validate({"guidance": guidance}))

    assert body({"mode": "implicit"}) == 3.0
    assert body({"mode": "implicit", "gamma": 0.2}) == 0.2  # a named gamma wins
    assert body({"mode": "explicit"}) == 1.0  # untuned mode: defaults.gamma
    assert gamma(parse_steering("0.5,0.5,mode=implicit", "adapter_id", loaded)) == 3.0
    assert gamma(parse_steering("mode=implicit,gamma=0.4", "adapter_id", loaded)) == 0.4


def space_share(prompts: list[str], responses: list[str]) -> list[float]:
    return [r.count(" ") / max(len(r), 1) for r in responses]


def _three_objective_store(folder):
    from tests.common import build_tiny_store

    root = build_tiny_store(folder, objectives=("a", "b", "c"), beta=0.6, alpha=0.2)
    data = json.loads((root / MANIFEST_NAME).read_text())
    data["reward_scale"] = {"center": [10, 0.3, 0.1], "scale": [5, 0.1, 0.1]}
    data["reward_scale"] |= {"hv_reference": [-3, -3, -3], "samples": 8}
    write_manifest(root, data)
    return root


def test_eval_sweeps_the_simplex_for_three_objectives(tmp_path):
    """n = 3: the circulant B of Eq. (12), lambda = B^-1 mu, the simplex grid as default sweep,
    pairwise projections in fronts.png."""
    root = _three_objective_store(tmp_path / "s3")
    args = ["eval", "--store", str(root), "--out", str(tmp_path / "ev"), "--simplex-steps", "2"]
    args += ["--methods", "bone-soup,mage-i", "--split", "validation", "--limit", "2"]
    args += ["--rewards", REWARDS + ",tests.test_claims:space_share", "--max-new-tokens", "3"]
    assert mage(args) == 0
    results = json.loads((tmp_path / "ev/results.json").read_text())
    assert len(results["preferences"]) == 6 and all(len(p) == 3 for p in results["preferences"])
    assert np.array(results["per_prompt_raw_rewards"]["mage-i"]).shape == (6, 2, 3)
    loaded = load_store(root, "cpu", "float32")
    matrix = loaded.checked.combination_matrix
    assert torch.allclose(
        matrix,
        torch.tensor([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]], dtype=torch.float64),
    )
    mu = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    plan = build_plan(loaded, "implicit-ensemble", mu, "bone-soup")
    assert torch.allclose(matrix @ torch.tensor(plan.mix, dtype=torch.float64), mu)  # B^-1 mu
    png = (tmp_path / "ev/fronts.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def _seed_results(hv_bs: float, hv_rs: float, holds: bool, reference=(-2.0, -2.0)) -> dict:
    return {
        "reference_point": list(reference),
        "metrics": {
            "bone-soup": {"hv": hv_bs, "controllability": 1.0},
            "rewarded-soup": {"hv": hv_rs, "controllability": 0.8},
        },
        "comparisons": [
            {"a": "bone-soup", "b": "rewarded-soup", "hv_diff": hv_bs - hv_rs, "holds": holds}
        ],
    }


def test_seeds_reports_each_seed_mean_and_spread(tmp_path, capsys):
    for name, result in (
        ("s0", _seed_results(5.0, 4.0, True)),
        ("s1", _seed_results(4.5, 4.5, False)),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(result))
    assert mage(["seeds", str(tmp_path / "s0"), str(tmp_path / "s1")]) == 0
    out = capsys.readouterr().out
    spread = json.loads(out.strip().splitlines()[-1])
    hv = spread["methods"]["bone-soup"]["hv"]
    assert hv["per_seed"] == [5.0, 4.5] and hv["mean"] == 4.75 and hv["spread"] == 0.5
    diff = spread["comparisons"]["bone-soup − rewarded-soup"]
    assert diff["per_seed"] == [1.0, 0.0] and diff["holds_in"] == 1
    assert "| bone-soup − rewarded-soup | +1.0000 | +0.0000 | +0.5000 | 1.0000 | 1 of 2 |" in out
    # the results files themselves (as committed under docs/) read the same as their folders
    files = [str(tmp_path / name / "results.json") for name in ("s0", "s1")]
    assert mage(["seeds", *files]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == spread


def test_seeds_refuses_runs_on_different_reference_points(tmp_path, capsys):
    for name, ref in (("s0", (-2.0, -2.0)), ("s1", (-1.0, -2.0))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_seed_results(1, 1, False, ref)))
    assert mage(["seeds", str(tmp_path / "s0"), str(tmp_path / "s1")]) == 2
    assert "different HV reference points" in capsys.readouterr().err
    assert mage(["seeds", str(tmp_path / "s0"), str(tmp_path / "missing")]) == 2
    assert "missing/results.json: cannot read it" in capsys.readouterr().err


def test_tuning_a_three_objective_store_sweeps_its_simplex_by_default(tmp_path, capsys):
    """Without --preferences, tuning sweeps the store's own objectives (the two-objective
    default cannot fit three): vertices and edge midpoints, 6 points."""
    root = _three_objective_store(tmp_path / "s3")
    args = ["tune", "alpha", "--store", str(root), "--grid", "0,0.5", "--limit", "1"]
    args += ["--rewards", REWARDS + ",tests.test_claims:space_share", "--max-new-tokens", "2"]
    assert mage(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fronts = {k: np.array(v) for k, v in result["fronts"].items()}
    assert set(fronts) == {"0.0", "0.5"} and {f.shape for f in fronts.values()} == {(6, 3)}
    assert mage(["tune", "beta", "--base", str(tmp_path), "--work", str(tmp_path / "w")]) == 2
    assert "--rewards is required" in capsys.readouterr().err
