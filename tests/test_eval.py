"""`mage eval` end to end on a tiny store with cheap module:function rewards."""

from __future__ import annotations

import json

import pytest

from cli.main import main as mage
from evaluation.run import preference_sweep


def response_length(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(len(r)) for r in responses]


def vowel_share(prompts: list[str], responses: list[str]) -> list[float]:
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


def test_preference_sweeps():
    two = preference_sweep(2)
    assert len(two) == 11 and two[0] == (1.0, 0.0) and two[-1] == (0.0, 1.0)
    three = preference_sweep(3, steps=2)
    assert len(three) == 6 and all(abs(sum(p) - 1) < 1e-9 for p in three)


def test_eval_writes_table_and_resumes(tiny_store, tmp_path, capsys):
    args = [
        "eval",
        "--store",
        str(tiny_store),
        "--out",
        str(tmp_path / "ev"),
        "--methods",
        "bone-soup,mage-e-m,mage-i,rewarded-soup,mod,mage-i-m-naive,beam",
        "--preferences",
        "1,0;0.5,0.5;0,1",
        "--rewards",
        "tests.test_eval:response_length,tests.test_eval:vowel_share",
        "--split",
        "validation",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
        "--beam-width",
        "2",
        "--beam-interval",
        "2",
        "--hv-reference",
        "0,0",
    ]
    methods = {"bone-soup", "mage-e-m", "mage-i", "rewarded-soup", "mod", "mage-i-m-naive", "beam"}
    assert mage(args) == 0
    results = json.loads((tmp_path / "ev/results.json").read_text())
    assert set(results["mean_rewards"]) == methods
    assert len(results["mean_rewards"]["mage-e-m"]) == 3
    assert results["prompts"] == 2
    lines = [json.loads(x) for x in (tmp_path / "ev/generations.jsonl").read_text().splitlines()]
    assert len(lines) == len(methods) * 3 * 2
    assert all(0 < row["tokens"] <= 4 and row["seconds"] > 0 for row in lines)
    table = (tmp_path / "ev/table.md").read_text()
    assert "| mage-e-m | 1 | (0.5, 0.5) |" in table and "ms/token" in table
    for m in results["metrics"].values():
        assert m["front_length"] >= 1 and m["hv"] >= 0
        assert m["ms_per_token"] > 0 and m["peak_mib"] > 0
    adapters = {k: m["adapters"] for k, m in results["metrics"].items()}
    assert adapters == dict.fromkeys(methods, 2) | {"mage-e-m": 4}  # + the 2 value models
    assert results["metrics"]["mod"]["unrecorded"] == [
        "specialists/helpful",
        "specialists/harmless",
    ]
    assert results["metrics"]["mage-e-m"]["train_cpu_s"] is None  # a random store: no record
    png = (tmp_path / "ev/fronts.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    capsys.readouterr()
    assert mage(args) == 0  # resumed: nothing generated again
    assert len((tmp_path / "ev/generations.jsonl").read_text().splitlines()) == len(lines)
    assert "0s generating" in capsys.readouterr().out
    resumed = json.loads((tmp_path / "ev/results.json").read_text())
    assert resumed["metrics"]["beam"]["peak_mib"] == results["metrics"]["beam"]["peak_mib"]


def test_each_method_is_charged_the_parts_it_decodes_with(tiny_store, tmp_path):
    """Sec. 6.1's training cost: Bone Soup and the implicit modes use the backbones, explicit
    guidance adds the value models, Rewarded Soup and MOD the specialists, an oracle its
    policy's; each sums what the store recorded for those parts."""
    import shutil

    from evaluation.costs import method_training_cost
    from model_store.costs import record_store_cost
    from model_store.validate import read_manifest

    store = tmp_path / "s"
    shutil.copytree(tiny_store, store)
    manifest = read_manifest(store)
    names = [b.path.split("/")[-1] for b in manifest.backbones]
    for component, seconds in (("backbones", 100.0), ("values", 10.0), ("specialists", 1.0)):
        for name in names:
            record_store_cost(store, component, name, {"steps": 1, "wall_s": 1, "cpu_s": seconds})
    expected = {
        "bone-soup": 200, "mage-i-m": 200, "oracle-bok": 200, "lmc-implicit": 200,
        "mage-e-m": 220, "mage-e": 220, "lmc-explicit": 20, "rewarded-soup": 2, "mod": 2,
    }  # fmt: skip
    cost = {m: method_training_cost(store, manifest, m)["train_cpu_s"] for m in expected}
    assert cost == expected


def test_batched_eval_matches_the_server_engine(tiny_store, tmp_path):
    """The eval's batched responses are the texts the engine (and so the server) returns."""
    import torch

    from evaluation.run import EvalConfig, generate_texts
    from guidance.engine import Engine
    from guidance.requests import GenerationRequest, SamplingParams
    from model_store.loader import load_store
    from objectives.prompts import load_prompts
    from training.common import encode_prompt

    store = load_store(tiny_store, "cpu", "float32")
    engine = Engine(store)
    prompts = [encode_prompt(store.tokenizer, p["prompt"]) for p in load_prompts("test")[:3]]
    cfg = EvalConfig(
        store=tiny_store,
        out=tmp_path,
        methods=("mage-e-m",),
        preferences=((0.3, 0.7),),
        max_new_tokens=6,
    )
    batched = generate_texts(store, "mage-e-m", (0.3, 0.7), prompts, cfg, engine.eos_ids)
    for ids, (text, _) in zip(prompts, batched, strict=True):
        mu = torch.tensor([0.3, 0.7], dtype=torch.float64)
        request = GenerationRequest("t", tuple(ids), mu, "explicit", 1.0, SamplingParams(), 6)
        assert engine.run_to_completion(request)[-1].generated_text == text


def test_eval_rejects_unknown_method(tiny_store, tmp_path, capsys):
    assert (
        mage(["eval", "--store", str(tiny_store), "--out", str(tmp_path), "--methods", "telepathy"])
        == 2
    )
    assert "unknown method" in capsys.readouterr().err


def test_tune_alpha_picks_by_hypervolume_and_writes(store_copy, capsys):
    from model_store.validate import check_store

    args = [
        "tune",
        "alpha",
        "--store",
        str(store_copy),
        "--grid",
        "0.0,0.5",
        "--preferences",
        "1,0;0,1",
        "--limit",
        "2",
        "--max-new-tokens",
        "3",
        "--rewards",
        "tests.test_eval:response_length,tests.test_eval:vowel_share",
        "--write",
    ]
    assert mage(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["hypervolume"]) == {"0.0", "0.5"}
    best = max(result["hypervolume"], key=result["hypervolume"].get)
    assert result["chosen_alpha"] == float(best)
    assert check_store(store_copy).manifest.alpha == float(best)  # checksums rewritten too


def test_tune_beta_trains_short_runs_and_compares(tiny_store, tmp_path, capsys):
    pytest.importorskip("trl")
    args = [
        "tune",
        "beta",
        "--base",
        str(tiny_store / "base"),
        "--work",
        str(tmp_path / "w"),
        "--grid",
        "0.6,0.8",
        "--steps",
        "1",
        "--preferences",
        "1,0;0,1",
        "--limit",
        "2",
        "--max-new-tokens",
        "3",
        "--rewards",
        "tests.test_eval:response_length,tests.test_eval:vowel_share",
        "--targets",
        "q_proj,down_proj",
        "--rank",
        "2",
    ]
    assert mage(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["hypervolume"]) == {"0.6", "0.8"}
    adapter = json.loads(
        next((tmp_path / "w/beta-0.6/backbones").glob("*/adapter_config.json")).read_text()
    )
    assert sorted(adapter["target_modules"]) == ["down_proj", "q_proj"] and adapter["r"] == 2
    assert result["chosen_beta"] in (0.6, 0.8)
    assert (tmp_path / "w/beta-0.8/mage_store.json").is_file()
