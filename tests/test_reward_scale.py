"""The fixed reward scale: fitted once, stored in the manifest, trained on (h_i = w_i^T r~,
Eq. 11), and the demo build that puts it all together, for n = 2 and n = 3, on a tiny base."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest

from model_store.manifest import StoreManifest
from objectives.scale import RewardScale, ScaleError, fit_reward_scale
from tests.common import write_tiny_base
from training.common import TrainingError

LENGTH = "tests.test_reward_scale:length_reward"
VOWELS = "tests.test_reward_scale:vowel_reward"
SPACES = "tests.test_reward_scale:space_reward"
CALLS: list[list[float]] = []


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Response length, capped, in [0, 1]; every raw output is recorded in CALLS."""
    raw = [min(len(r), 40) / 40.0 for r in responses]
    CALLS.append(raw)
    return raw


def vowel_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


def space_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A third objective for n = 3: the share of spaces."""
    return [r.count(" ") / max(len(r), 1) for r in responses]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scale-base") / "base"
    write_tiny_base(path)
    return path


def _manifest(**scale) -> dict:
    block = {"center": [0.5, 0.1], "scale": [0.2, 0.4], "hv_reference": [-2, -2], "samples": 8}
    return {
        "objectives": ["a", "b"],
        "base": {"path": "base"},
        "backbones": [
            {"name": "x", "path": "x", "weights": [0.7, 0.3]},
            {"name": "y", "path": "y", "weights": [0.3, 0.7]},
        ],
        "reward_scale": {**block, **scale},
    }


def test_fit_is_mean_and_population_std_with_a_fixed_reference():
    rewards = {"a": [0.2, 0.4, 0.6, 0.8], "b": [-1.0, 0.0, 0.0, 1.0]}
    block = fit_reward_scale(rewards, "test")
    assert block["center"] == [0.5, 0.0]
    assert block["scale"] == pytest.approx([statistics.pstdev(rewards["a"]), 0.707107], abs=1e-6)
    assert block["hv_reference"] == [-2.0, -2.0] and block["samples"] == 4
    scale = RewardScale(tuple(block["center"]), tuple(block["scale"]))
    rescaled = scale.apply(0, rewards["a"])
    assert statistics.fmean(rescaled) == pytest.approx(0) and statistics.pstdev(
        rescaled
    ) == pytest.approx(1)
    assert scale.apply_rows([[0.5, 0.0]]).tolist() == [[0.0, 0.0]]
    with pytest.raises(ScaleError, match="constant"):
        fit_reward_scale({"a": [0.3, 0.3, 0.3]}, "test")


def test_manifest_validates_the_scale():
    assert StoreManifest.model_validate(_manifest()).reward_scale.scale == [0.2, 0.4]
    with pytest.raises(ValueError, match="scale must be > 0"):
        StoreManifest.model_validate(_manifest(scale=[0.2, 0.0]))
    with pytest.raises(ValueError, match="one value per objective"):
        StoreManifest.model_validate(_manifest(hv_reference=[-2]))
    with pytest.raises(ValueError, match="3 values per field for 2 objectives"):
        StoreManifest.model_validate(
            _manifest(center=[0, 0, 0], scale=[1, 1, 1], hv_reference=[0, 0, 0])
        )
    with pytest.raises(ValueError, match="finite"):
        StoreManifest.model_validate(_manifest(center=[float("nan"), 0]))


def test_a_store_without_reward_scale_keeps_working():
    """Manifests written before reward_scale and gamma_by_mode (the shipped demo store's, in
    the checkout and as package data, with both taken out) still parse: rewards stay raw and
    every mode gets defaults.gamma."""
    from model_store.manifest import MANIFEST_NAME
    from model_store.resources import demo_store_path

    for folder in {Path(__file__).resolve().parents[1] / "demo" / "store", demo_store_path()}:
        data = json.loads((folder / MANIFEST_NAME).read_text())
        StoreManifest.model_validate(data)  # as shipped
        data.pop("reward_scale", None)
        data["defaults"].pop("gamma_by_mode", None)
        manifest = StoreManifest.model_validate(data)
        assert manifest.reward_scale is None and RewardScale.from_manifest(manifest) is None
        defaults = manifest.defaults
        modes = ("none", "explicit", "explicit-ensemble", "implicit", "implicit-ensemble")
        assert all(defaults.gamma_for(mode) == defaults.gamma for mode in modes)


def test_backbone_trains_on_the_plain_weighted_sum_of_rescaled_rewards(base, tmp_path):
    """TRL logs each reward function's mean and the mean of w^T r~: with the scale applied
    to every function, those are the rescaled means, and h_i = w_i^T r~ exactly (Eq. 11)."""
    pytest.importorskip("trl")
    from training.backbone import BackboneTrainConfig, train_backbone

    CALLS.clear()
    scale = RewardScale((0.5, 0.2), (0.25, 0.1))
    config = BackboneTrainConfig(
        base=base,
        rewards=[LENGTH, VOWELS],
        weights=[0.7, 0.3],
        out=tmp_path / "bb",
        reward_scale=scale,
        steps=2,
        lr=1e-2,
        rank=2,
        lora_alpha=4,
        num_generations=2,
        max_completion_length=6,
        max_prompts=4,
        save_steps=1,
        progress=False,
    )
    result = train_backbone(config)
    assert len(CALLS) == 2
    for entry, raw in zip(result.log, CALLS, strict=True):
        expected = statistics.fmean(scale.apply(0, raw))
        assert entry[f"rewards/{LENGTH}/mean"] == pytest.approx(expected, abs=1e-5)
        h = 0.7 * entry[f"rewards/{LENGTH}/mean"] + 0.3 * entry[f"rewards/{VOWELS}/mean"]
        assert entry["reward"] == pytest.approx(h, abs=1e-5)
    run = json.loads((tmp_path / "bb/run.json").read_text())
    assert run["reward_scale"] == [[0.5, 0.2], [0.25, 0.1]]
    assert run["aggregation"] == ["sum_then_normalize", "batch"]
    config.reward_scale = RewardScale((0.0, 0.0), (1.0, 1.0))  # another scale: no resume
    with pytest.raises(TrainingError, match="reward_scale"):
        train_backbone(config)


def test_backbones_store_fits_and_writes_the_scale(base, tmp_path):
    pytest.importorskip("trl")
    from model_store.validate import check_store
    from training.backbone import train_backbone_store

    store = train_backbone_store(
        base,
        [LENGTH, VOWELS],
        0.7,
        tmp_path / "store",
        scale_samples=3,
        steps=1,
        rank=2,
        lora_alpha=4,
        targets=("q_proj",),
        num_generations=2,
        max_completion_length=6,
        max_prompts=4,
        progress=False,
    )
    spec = check_store(store).manifest.reward_scale
    assert spec is not None and spec.samples == 12 and len(spec.center) == 2
    assert min(spec.scale) > 0 and spec.hv_reference == [-2.0, -2.0]
    fitted = json.loads((tmp_path / "store-work/reward_scale.json").read_text())
    assert fitted["center"] == spec.center  # fitted once; a re-run reuses it


def test_value_model_regresses_rescaled_rewards(base, tmp_path):
    from training.sampling import SamplingSettings
    from training.value import ValueTrainConfig, train_value_model

    def config(out: Path, scale: RewardScale | None) -> ValueTrainConfig:
        return ValueTrainConfig(
            base=base,
            objective=VOWELS,
            out=out,
            max_train_prompts=4,
            max_val_prompts=2,
            sampling=SamplingSettings(samples_per_prompt=3, max_new_tokens=6),
            epochs=1,
            rank=2,
            lora_alpha=4,
            reward_scale=scale,
            progress=False,
        )

    raw = train_value_model(config(tmp_path / "raw", None)).metrics
    (tmp_path / "scaled").mkdir()
    for name in ("samples-train.jsonl", "samples-val.jsonl"):  # the same responses
        shutil.copy(tmp_path / "raw" / name, tmp_path / "scaled" / name)
    scaled = train_value_model(config(tmp_path / "scaled", RewardScale((0.3,), (0.5,)))).metrics
    assert scaled["train_reward_mean"] == pytest.approx((raw["train_reward_mean"] - 0.3) / 0.5)
    from training.costs import run_cost

    assert run_cost(tmp_path / "scaled")["cpu_s"] > 0  # its training cost is on record


def test_concise_reward_pulls_against_length():
    from objectives.rewards import get_reward

    concise = get_reward("concise")
    short, medium, long = concise(["q"] * 3, ["one two three", "w " * 16, "w " * 24])
    assert short == 1.0 and medium == pytest.approx(0.5) and long == pytest.approx(0.2)


def tiny_demo_settings(objectives: tuple[str, ...]):
    """The demo build at smoke sizes, rank-2 LoRA on q_proj only (a tiny base trains fast)."""
    from dataclasses import replace

    from training.demo import DemoSettings, quick

    return replace(
        quick(DemoSettings()),
        objectives=objectives,
        name="tiny-demo",
        value_rank=2,
        value_targets=("q_proj",),
        backbone_rank=2,
        backbone_targets=("q_proj",),
    )


def test_training_curve_leaves_out_an_objective_its_run_never_logged(tmp_path):
    """A specialist reused from a two-objective build in a three-objective one logged no
    rewards for the third objective: its curve omits it, and the plot still draws."""
    from evaluation.plot import plot_training_curves
    from training.demo import _curve

    rows = [
        {"step": k, "rewards/a/mean": 0.1 * k, "rewards/b/mean": -0.1 * k, "kl": 0.01}
        for k in range(1, 13)
    ]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = _curve(tmp_path, ("a", "b", "c"))
    assert [block["steps"] for block in curve] == [[1, 10], [11, 12]]
    assert curve[1] == {"steps": [11, 12], "a": 1.15, "b": -1.15, "kl": 0.01}
    report = {
        "settings": {"objectives": ["a", "b", "c"]},
        "specialists": [{"name": "specialist-a", "weights": [1, 0, 0], "curve": curve}],
    }
    png = plot_training_curves(report, tmp_path / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG")


@pytest.mark.parametrize("objectives", [(LENGTH, VOWELS), (LENGTH, VOWELS, SPACES)])
def test_build_demo_end_to_end_on_a_tiny_base(base, tmp_path, objectives):
    """The whole build: shared base samples, the fitted scale in the manifest, value models,
    backbones on the circulant B (n = 2 and n = 3), specialists, curves and the adapters'
    validation means; a second call resumes without training again."""
    pytest.importorskip("trl")

    from evaluation.alone import validation_means
    from model_store.validate import check_store
    from training.demo import build_demo

    settings = tiny_demo_settings(objectives)
    store, work = tmp_path / "store", tmp_path / "work"
    spec = {"path": str(base)}
    build_demo(store, work, settings, lambda _: None, base, spec, alone=validation_means)
    manifest = check_store(store).manifest
    n = len(objectives)
    assert manifest.objectives == list(objectives) and len(manifest.backbones) == n
    assert manifest.backbones[0].weights == pytest.approx([0.7] + [0.3 / (n - 1)] * (n - 1))
    assert [s.weights for s in manifest.specialists] == [
        [float(i == j) for j in range(n)] for i in range(n)
    ]
    assert manifest.reward_scale is not None and manifest.reward_scale.samples == 12
    report = json.loads((store / "build_report.json").read_text())
    assert set(report["validation_means_alone"]) == {
        f"{kind}-{o}" for kind in ("backbone", "specialist") for o in objectives
    }
    assert report["backbones"][0]["curve"][0]["steps"] == [1, 1]
    assert (
        report["backbones"][0]["cost"]["steps"] == 1 and report["backbones"][0]["cost"]["cpu_s"] > 0
    )
    assert len(report["conflict"]["pearson"]) == n * (n - 1) // 2
    from model_store.costs import read_store_costs

    costs = read_store_costs(store)  # what `mage eval` reads, from the same ledgers
    assert costs["backbones"][objectives[0]] == report["backbones"][0]["cost"]
    assert set(costs["values"]) == set(costs["specialists"]) == set(objectives)
    from evaluation.plot import plot_training_curves

    png = plot_training_curves(report, tmp_path / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    build_demo(store, work, settings, log=lambda _: None, base=base, base_spec={"path": str(base)})
    assert check_store(store).manifest.reward_scale == manifest.reward_scale


def test_build_demo_of_another_seed_shares_the_value_models(base, tmp_path):
    """A second adapter seed on the same --work: the base samples and value models are reused
    (not trained again), the backbones and specialists train anew in folders of their own, and
    a backbone folder of seed 0 refuses to resume under seed 1."""
    pytest.importorskip("trl")
    from dataclasses import replace

    from safetensors.torch import load_file

    from model_store.validate import check_store
    from training.backbone import BackboneTrainConfig, train_backbone
    from training.demo import build_demo

    settings = tiny_demo_settings((LENGTH, VOWELS))
    work, spec = tmp_path / "work", {"path": str(base)}
    build_demo(tmp_path / "s0", work, settings, log=lambda _: None, base=base, base_spec=spec)
    value_checkpoints = sorted((work / f"value-{LENGTH}" / "checkpoints").rglob("*"))
    stamps = [p.stat().st_mtime_ns for p in value_checkpoints]
    seed1 = replace(settings, seed=1)
    build_demo(tmp_path / "s1", work, seed1, log=lambda _: None, base=base, base_spec=spec)
    assert [p.stat().st_mtime_ns for p in value_checkpoints] == stamps  # reused, not retrained
    for kind in ("backbone", "specialist"):
        assert (work / f"{kind}-{VOWELS}-seed1" / "run.json").is_file()
    adapter = "backbones/" + LENGTH + "/adapter_model.safetensors"
    first, second = (load_file(tmp_path / s / adapter) for s in ("s0", "s1"))
    assert any(not first[k].equal(second[k]) for k in first)
    config = BackboneTrainConfig(
        base=base,
        rewards=[LENGTH, VOWELS],
        weights=[0.7, 0.3],
        out=work / f"backbone-{LENGTH}",
        rank=2,
        lora_alpha=4,
        targets=("q_proj",),
        reward_scale=RewardScale.from_manifest(check_store(tmp_path / "s0").manifest),
        seed=1,
    )
    with pytest.raises(TrainingError, match=r"other settings \(seed\)"):
        train_backbone(config)


def test_build_demo_reuses_an_unchanged_objective_from_another_store(base, tmp_path):
    """A task that swaps one objective (LENGTH -> SPACES) keeps the other's value model and
    specialist from a built store when its fitted scale is identical (same base samples, so
    the same training targets): copied byte for byte and never trained; the new objective
    trains. A scale that differs (edited here) is not reused."""
    pytest.importorskip("trl")
    from model_store.validate import check_store
    from training.demo import build_demo

    spec = {"path": str(base)}
    old = tmp_path / "old"
    build_demo(
        old, tmp_path / "w0", tiny_demo_settings((LENGTH, VOWELS)), lambda _: None, base, spec
    )
    settings = tiny_demo_settings((SPACES, VOWELS))
    new, work = tmp_path / "new", tmp_path / "w1"
    build_demo(new, work, settings, lambda _: None, base, spec, reuse=old)
    for path in ("values/" + VOWELS, "specialists/" + VOWELS):
        for file in (old / path).glob("*.safetensors"):
            assert (new / path / file.name).read_bytes() == file.read_bytes()
    assert not (work / f"value-{VOWELS}" / "checkpoints").exists()
    assert not (work / f"specialist-{VOWELS}" / "checkpoints").exists()
    assert (work / f"specialist-{SPACES}" / "checkpoints").exists()
    assert check_store(new).manifest.objectives == [SPACES, VOWELS]
    report = json.loads((new / "build_report.json").read_text())
    assert report["specialists"][1]["reused_from"] == "tiny-demo"  # a name, not a path
    assert report["value_models"][VOWELS] == {"reused_from": "tiny-demo"}
    from model_store.costs import read_store_costs

    old_costs, new_costs = read_store_costs(old), read_store_costs(new)
    for component in ("values", "specialists"):  # a copy costs what its training did
        assert new_costs[component][VOWELS] == old_costs[component][VOWELS]
        assert new_costs[component][SPACES]["cpu_s"] > 0

    manifest = json.loads((old / "mage_store.json").read_text())
    manifest["reward_scale"]["center"][1] += 0.5
    (old / "mage_store.json").write_text(json.dumps(manifest))
    work2 = tmp_path / "w2"
    build_demo(tmp_path / "new2", work2, settings, lambda _: None, base, spec, reuse=old)
    assert (work2 / f"specialist-{VOWELS}" / "checkpoints").exists()


def test_build_demo_only_trains_one_adapter_then_the_build_resumes_it(base, tmp_path):
    """`only` trains one named model, a backbone or a value model (a process per model on a
    machine with more cores), and writes no manifest; the full build afterwards finds it
    finished and does not train it again; a name that is not a model of the task is refused."""
    pytest.importorskip("trl")
    from training.demo import build_demo

    settings = tiny_demo_settings((LENGTH, VOWELS))
    store, work, spec = tmp_path / "store", tmp_path / "work", {"path": str(base)}
    build_demo(store, work, settings, lambda _: None, base, spec, only=f"backbone-{VOWELS}")
    assert (store / "backbones" / VOWELS / "adapter_model.safetensors").is_file()
    assert not (work / f"backbone-{LENGTH}").exists()
    assert not (store / "mage_store.json").exists()
    adapter = store / "backbones" / VOWELS / "adapter_model.safetensors"
    trained = adapter.read_bytes()
    checkpoints = sorted((work / f"backbone-{VOWELS}" / "checkpoints").iterdir())
    build_demo(store, work, settings, lambda _: None, base, spec, only=f"value-{LENGTH}")
    assert (store / "values" / f"{LENGTH}-head.safetensors").is_file()
    assert not (store / "values" / f"{VOWELS}-head.safetensors").exists()
    build_demo(store, work, settings, lambda _: None, base, spec)
    assert sorted((work / f"backbone-{VOWELS}" / "checkpoints").iterdir()) == checkpoints
    assert adapter.read_bytes() == trained
    with pytest.raises(ValueError, match="--only"):
        build_demo(store, work, settings, lambda _: None, base, spec, only="backbone-nope")
