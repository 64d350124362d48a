"""The trained baselines of the paper's Table 2 (MORLHF, MODPO, RiC): each `mage train` command
end to end on the tiny random Llama, then `mage eval --methods ...` on what they wrote, the
MODPO loss against a hand computation, RiC's prompt format and preference map, and the server
answering `merge_method: "ric"`. Tiny settings (two preferences, four prompts, one or two
steps) keep every run to seconds on CPU."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import httpx
import pytest
import torch

from model_store.adapters import load_lora_adapter
from model_store.builder import build_random_store, write_manifest
from model_store.validate import check_store, read_manifest
from objectives.ric import desired_rewards, preference_prompt, reward_tags, ric_prompt
from tests.common import write_tiny_base

pytest.importorskip("trl", minversion="1.16", reason="the baselines train with TRL")

LENGTH = "tests.test_training_backbone:length_reward"
VOWELS = "tests.test_training_backbone:vowel_reward"
PREFERENCES = "1,0;0,1"
TINY = ["--steps", "1", "--max-prompts", "4", "--rank", "2", "--lora-alpha", "4"]
TINY += ["--no-progress", "--lr", "1e-2", "--save-steps", "1"]
SFT = ["--samples-per-prompt", "3", "--max-new-tokens", "6", "--batch-size", "2"]
RL = ["--num-generations", "2", "--max-completion-length", "4", "--prompts-per-step", "2"]


def _mage(argv: list[str]) -> int:
    from cli.main import main

    return main(argv)


def _store(root: Path) -> Path:
    """A store over the tiny base whose objectives are two cheap rewards, with a reward scale."""
    root.mkdir(parents=True)
    write_tiny_base(root / "base")
    build_random_store(root, {"path": "base"}, [LENGTH, VOWELS], 0.7, 0.0, None, name="tiny")
    manifest = read_manifest(root).model_dump()
    scale = {"center": [0.3, 0.2], "scale": [0.2, 0.1], "hv_reference": [-2, -2], "samples": 8}
    write_manifest(root, manifest | {"reward_scale": scale})
    return root


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    """The store before any baseline is trained (for the checks that need only its base)."""
    return _store(tmp_path_factory.mktemp("untrained") / "store")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One store, trained for by all three commands (each writes its part of `baselines`)."""
    store = _store(tmp_path_factory.mktemp("baselines") / "store")
    common = ["--store", str(store), *TINY]
    assert _mage(["train", "morlhf", *common, *RL, "--preferences", PREFERENCES]) == 0
    assert _mage(["train", "modpo", *common, *SFT, "--preferences", PREFERENCES]) == 0
    assert _mage(["train", "ric", *common, *SFT, "--online-rounds", "1"]) == 0
    return store


def test_each_command_writes_trained_adapters_into_the_manifest(trained):
    baselines = check_store(trained).manifest.baselines
    assert [e.preference for e in baselines.morlhf] == [[1.0, 0.0], [0.0, 1.0]]
    assert [e.preference for e in baselines.modpo] == [[1.0, 0.0], [0.0, 1.0]]
    ric = baselines.ric
    assert ric is not None and ric.path == "baselines/ric"
    assert all(lo <= hi for lo, hi in zip(ric.reward_low, ric.reward_high, strict=True))
    paths = [e.path for e in [*baselines.morlhf, *baselines.modpo]] + [ric.path]
    for path in paths:  # PEFT initialises B = 0: non-zero B means training moved it
        adapter = load_lora_adapter(trained / path, path, torch.float32)
        assert any(f.lora_b.abs().max() > 0 for f in adapter.modules.values()), path
    work = trained.with_name("store-work")
    assert (work / "ric" / "round-1" / "samples.jsonl").is_file()  # the online round ran
    assert not list(trained.rglob("checkpoint-*"))  # training state stays outside the store


def test_a_rerun_resumes_and_trains_no_more(trained, capsys):
    """Every run is resumable: run again, each finished adapter is found, none retrained."""
    before = (trained / "baselines/modpo/mu-1-0/adapter_model.safetensors").read_bytes()
    common = ["--store", str(trained), *TINY, *SFT, "--preferences", "1,0"]
    assert _mage(["train", "modpo", *common]) == 0
    after = (trained / "baselines/modpo/mu-1-0/adapter_model.safetensors").read_bytes()
    assert before == after
    log = trained.with_name("store-work") / "modpo" / "mu-1-0" / "log.jsonl"
    assert len(log.read_text().splitlines()) == 1
    from training.costs import run_cost

    ledger = log.with_name("cost.jsonl")  # the training cost: one line per call that trained
    assert len(ledger.read_text().splitlines()) == 1
    cost = run_cost(log.parent)
    assert cost["steps"] == 1 and cost["cpu_s"] > 0 and cost["wall_s"] > 0


def test_mage_eval_runs_every_baseline(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = _mage(
        ["eval", "--store", str(trained), "--out", str(out), "--methods", "ric,modpo,morlhf"]
        + ["--preferences", PREFERENCES, "--limit", "2", "--max-new-tokens", "4"]
        + ["--replicates", "20"]
    )
    assert rc == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"ric", "modpo", "morlhf"}
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 * 2
    assert all("<rm1_score>" not in r["prompt"] for r in rows)  # rewards see the plain prompt
    metrics = results["metrics"]  # Sec. 6.1's training cost beside each method
    assert [metrics[m]["adapters"] for m in ("ric", "modpo", "morlhf")] == [1, 2, 2]
    assert all(metrics[m]["train_cpu_s"] > 0 and not metrics[m]["unrecorded"] for m in metrics)
    assert "adapters | train CPU h" in (out / "table.md").read_text()


def test_each_trained_baseline_records_its_training_cost_in_the_store(trained):
    """training_costs.json holds every adapter's CPU time, and MODPO's sampling pass (timed
    into the work folder's own ledger) once; RiC's is its sampling and rounds."""
    from model_store.costs import read_store_costs, run_cost

    costs, work = read_store_costs(trained), trained.with_name("store-work")
    assert set(costs["morlhf"]) == set(costs["modpo"]) - {"samples"} == {"mu-1-0", "mu-0-1"}
    assert costs["morlhf"]["mu-1-0"] == run_cost(work / "morlhf" / "mu-1-0")
    [line] = [json.loads(x) for x in (work / "modpo" / "cost.jsonl").read_text().splitlines()]
    assert line["stage"] == "sampling" and line["steps"] == 0  # timed, though no step
    assert costs["modpo"]["samples"] == run_cost(work / "modpo")  # charged to MODPO once
    assert costs["modpo"]["mu-1-0"] == run_cost(work / "modpo" / "mu-1-0")
    rounds = run_cost(work / "ric" / "round-0", work / "ric" / "round-1")
    assert costs["ric"]["ric"]["cpu_s"] >= rounds["cpu_s"] > 0  # + the offline sampling
    assert (work / "ric" / "cost.jsonl").is_file()


def test_morlhf_and_modpo_refuse_a_preference_they_were_not_trained_for(trained):
    from guidance.plan import build_plan
    from model_store.loader import load_store

    store = load_store(trained, "cpu", "float32", preference_adapters=True)
    mu = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for method in ("morlhf", "modpo"):
        with pytest.raises(ValueError, match=r"not trained for preference 0\.5,0\.5.*1,0"):
            build_plan(store, "none", mu, method)
    plan = build_plan(store, "none", torch.tensor([1.0, 0.0], dtype=torch.float64), "morlhf")
    assert plan.active_slots == (store.baseline_slots["morlhf:1,0"],)


def test_the_server_answers_merge_method_ric_with_the_tagged_prompt(trained):
    from model_store.loader import load_store
    from server.schemas import Steering
    from server.settings import ServerSettings
    from server.translate import Options, Prompt, build_request
    from server.translate import ric_prompt as server_ric_prompt
    from tests.http_server import running_server

    store = load_store(trained, "cpu", "float32")
    assert set(store.baseline_slots) == {"ric"}  # per-preference adapters are eval-only
    spec = store.checked.manifest.baselines.ric
    mu = torch.tensor([0.25, 0.75], dtype=torch.float64)
    tagged = server_ric_prompt(Prompt(messages=[{"role": "user", "content": "Hi"}]), mu, store)
    expected = preference_prompt("Hi", [0.25, 0.75], spec.reward_low, spec.reward_high)
    assert tagged.messages == [{"role": "user", "content": expected}]
    options = Options(steering=Steering(merge_method="ric", preference=[0.25, 0.75]))
    request = build_request(Prompt(text="Hi"), options, store, ServerSettings())
    assert (
        list(request.prompt_ids) == store.tokenizer(expected, add_special_tokens=False)["input_ids"]
    )
    body = {"inputs": "Hello", "parameters": {"merge_method": "ric", "max_new_tokens": 3}}
    with running_server(store, max_new_tokens=8) as url:
        answer = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert answer.status_code == 200, answer.text


def test_a_store_without_ric_refuses_merge_method_ric(tiny_store):
    from model_store.loader import load_store
    from tests.http_server import running_server

    body = {"inputs": "Hello", "parameters": {"merge_method": "ric", "max_new_tokens": 3}}
    with running_server(load_store(tiny_store, "cpu", "float32"), max_new_tokens=8) as url:
        answer = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert answer.status_code == 422
    assert (
        "Rewards-in-Context" in answer.json()["error"] and "baselines.ric" in answer.json()["error"]
    )


def test_ric_prompt_format():
    assert reward_tags([0.34, -1.25]) == " <rm1_score> 0.3 <rm2_score> -1.2"
    assert ric_prompt("How are you? ", [-0.04, 2]) == "How are you? <rm1_score> 0.0 <rm2_score> 2.0"
    with pytest.raises(ValueError):
        reward_tags([math.nan])


def test_ric_preference_to_reward_map():
    low, high = [-2.0, -1.0], [2.0, 3.0]
    # N = 2: mu_i >= 1/2 asks for high_i; otherwise low_i + 2 mu_i (high_i - low_i)
    assert desired_rewards([0.5, 0.5], low, high) == [2.0, 3.0]
    assert desired_rewards([1.0, 0.0], low, high) == [2.0, -1.0]
    assert desired_rewards([0.8, 0.2], low, high) == [2.0, round(-1 + 0.4 * 4, 1)]
    assert desired_rewards([0.1, 0.9], low, high) == [round(-2 + 0.2 * 4, 1), 3.0]
    three = desired_rewards([0.2, 0.3, 0.5], [0, 0, 0], [1, 1, 1])
    assert three == [0.6, 0.9, 1.0]
    with pytest.raises(ValueError):
        desired_rewards([0.0, 0.0], low, high)


def test_ric_sft_puts_the_loss_on_the_response_only(untrained):
    from training.common import encode_prompt, load_base
    from training.ric import sft_rows
    from training.sampling import Sample

    _, tokenizer = load_base(untrained / "base")
    sample = Sample(0, "Hi", [], [5, 6, 7], "abc", True)
    (row,) = sft_rows(tokenizer, [sample], torch.tensor([[0.26, -1.0]]).numpy())
    prompt = encode_prompt(tokenizer, "Hi <rm1_score> 0.3 <rm2_score> -1.0")
    assert row["input_ids"] == prompt + [5, 6, 7]
    assert row["completion_mask"] == [0] * len(prompt) + [1, 1, 1]


def test_modpo_loss_by_hand():
    from training.modpo import modpo_loss

    # w = (0.25, 0.75), beta = 0.5: logits = (1/w_1)[beta (lr_w - lr_l) - (m_w - m_l)]
    loss = modpo_loss(
        torch.tensor(1.0), torch.tensor(-1.0), torch.tensor(0.3), torch.tensor(0.9), 0.25, 0.5
    )
    logits = (0.5 * (1.0 - -1.0) - (0.3 - 0.9)) / 0.25
    assert loss.item() == pytest.approx(math.log1p(math.exp(-logits)), rel=1e-6)


def test_modpo_through_trl_equals_the_modpo_loss(untrained, tmp_path):
    """TRL's DPO loss at beta / w_k over margin-shifted precomputed references is MODPO's: at
    the start (policy = reference) the loss is -log sigmoid(-(m_w - m_l) / w_k) per pair, and
    the references are the base's log-probabilities plus margin / beta."""
    from training.baselines import FineTuneRun
    from training.modpo import ModpoConfig, _trainer, modpo_loss
    from training.runs import RunLog

    rows = [
        {"prompt_ids": [5, 6], "chosen_ids": [7, 8, 0], "rejected_ids": [9, 0],
         "chosen_margin": 0.6, "rejected_margin": -0.3},
        {"prompt_ids": [10], "chosen_ids": [11, 0], "rejected_ids": [12, 13, 0],
         "chosen_margin": -1.2, "rejected_margin": 0.4},
    ]  # fmt: skip
    run = FineTuneRun(store=untrained, batch_size=2, progress=False, device="cpu")
    config = ModpoConfig(run=run, beta=0.5)
    w_k = 0.4
    trainer = _trainer(config, untrained / "base", rows, w_k, tmp_path, RunLog(tmp_path))
    data = trainer.train_dataset
    base = trainer.model
    with torch.no_grad(), base.disable_adapter():
        for row, shifted in zip(rows, data["ref_chosen_logps"], strict=True):
            ids = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
            logp = base(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
            own = logp[len(row["prompt_ids"]) - 1 :].sum().item()
            assert shifted == pytest.approx(own + row["chosen_margin"] / 0.5, abs=1e-4)
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch).item()
    zero = torch.zeros(2)
    margins_w = torch.tensor([r["chosen_margin"] for r in rows])
    margins_l = torch.tensor([r["rejected_margin"] for r in rows])
    expected = modpo_loss(zero, zero, margins_w, margins_l, w_k, 0.5).mean().item()
    assert loss == pytest.approx(expected, rel=1e-4)


def test_modpo_computes_the_reference_once_for_every_w_of_the_same_pairs(
    untrained, tmp_path, monkeypatch
):
    """The grid's w share one pair set, so the base's log-probabilities are kept in the work
    folder after the first adapter: the next trainer reads them (no reference pass) and shifts
    them by its own margins."""
    from trl import DPOTrainer

    from training.baselines import FineTuneRun
    from training.modpo import ModpoConfig, _trainer, ref_logps_file
    from training.runs import RunLog

    rows = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8, 0], "rejected_ids": [9, 0],
             "chosen_margin": 0.0, "rejected_margin": 0.0}]  # fmt: skip
    config = ModpoConfig(run=FineTuneRun(store=untrained, progress=False, device="cpu"), beta=0.5)
    cache = ref_logps_file(tmp_path / "ref-logps", untrained / "base", rows)
    first = _trainer(config, untrained / "base", rows, 1.0, tmp_path / "a", RunLog(tmp_path), cache)
    assert json.loads(cache.read_text())["chosen"] == list(first.train_dataset["ref_chosen_logps"])

    def no_second_pass(*_):
        raise AssertionError("the reference was computed again")

    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps", no_second_pass)
    shifted = [row | {"chosen_margin": 0.4, "rejected_margin": -0.2} for row in rows]
    assert ref_logps_file(tmp_path / "ref-logps", untrained / "base", shifted) == cache
    second = _trainer(
        config, untrained / "base", shifted, 0.5, tmp_path / "b", RunLog(tmp_path), cache
    )
    data, before = second.train_dataset, first.train_dataset
    assert data["ref_chosen_logps"][0] == pytest.approx(before["ref_chosen_logps"][0] + 0.4 / 0.5)
    assert data["ref_rejected_logps"][0] == pytest.approx(
        before["ref_rejected_logps"][0] - 0.2 / 0.5
    )
    other = [row | {"rejected_ids": [10, 0]} for row in rows]
    assert ref_logps_file(tmp_path / "ref-logps", untrained / "base", other) != cache


def test_morlhf_from_specialists_takes_e_i_from_the_store_and_trains_the_rest(tmp_path):
    """At mu = e_i MORLHF's objective is the specialist's (Eq. 11 with w = e_i): with
    --from-specialists those entries name the specialists' folders (never trained, nor
    copied) and load; a mixed mu still trains its own."""
    from guidance.plan import build_plan
    from model_store.loader import load_store

    root = tmp_path / "store"
    root.mkdir()
    write_tiny_base(root / "base")
    build_random_store(
        root, {"path": "base"}, [LENGTH, VOWELS], 0.7, 0.0, None, name="t", with_specialists=True
    )
    manifest = read_manifest(root).model_dump()
    scale = {"center": [0.3, 0.2], "scale": [0.2, 0.1], "hv_reference": [-2, -2], "samples": 8}
    write_manifest(root, manifest | {"reward_scale": scale})
    from model_store.costs import read_store_costs, record_store_cost

    spent = {"steps": 5, "wall_s": 7.0, "cpu_s": 6.0}
    record_store_cost(root, "specialists", LENGTH, spent)  # as a build records it
    argv = ["train", "morlhf", "--store", str(root), *TINY, *RL, "--preferences", "1,0;0.5,0.5"]
    assert _mage([*argv, "--from-specialists"]) == 0
    costs = read_store_costs(root)["morlhf"]  # a stand-in costs what its specialist did
    assert costs["mu-1-0"] == spent and costs["mu-0.5-0.5"]["cpu_s"] > 0
    entries = check_store(root).manifest.baselines.morlhf
    assert [e.preference for e in entries] == [[1.0, 0.0], [0.5, 0.5]]
    assert entries[0].path == f"specialists/{LENGTH}"  # listed, not copied: stored once
    assert not (root / "baselines/morlhf/mu-1-0").exists()
    store = load_store(root, "cpu", "float32", preference_adapters=True)
    plan = build_plan(store, "none", torch.tensor([1.0, 0.0], dtype=torch.float64), "morlhf")
    assert plan.active_slots == (store.baseline_slots["morlhf:1,0"],)
    work = root.with_name("store-work") / "morlhf"
    assert not (work / "mu-1-0").exists() and (work / "mu-0.5-0.5" / "log.jsonl").is_file()


def test_a_runs_cost_includes_building_its_trainer(tmp_path):
    """Building a trainer can be most of a run (MODPO precomputes its reference there), so the
    ledger's clock starts before it: a trainer that costs nothing to train still records the
    CPU its set-up took."""
    from types import SimpleNamespace

    from training.costs import run_cost
    from training.runs import train_to_adapter

    class Trainer:  # what train_to_adapter touches of a TRL trainer
        state = SimpleNamespace(global_step=0)
        model = SimpleNamespace(save_pretrained=lambda *_, **__: None)

        def add_callback(self, _):
            pass

        def remove_callback(self, _):
            pass

        def train(self, resume_from_checkpoint=None):
            self.state.global_step = 3

    def costly_set_up(_log):
        started = time.process_time()
        while time.process_time() - started < 0.2:
            pass
        return Trainer()

    train_to_adapter(costly_set_up, tmp_path, 3, tmp_path / "adapter", False)
    cost = run_cost(tmp_path)
    assert cost["steps"] == 3 and cost["cpu_s"] >= 0.2


def test_the_cost_ledger_adds_each_checkpoint_since_the_last(tmp_path):
    """A line per checkpoint with the steps since the previous one (a resumed clock starts at
    its checkpoint's step), none for an empty interval; run_cost sums them."""
    from training.costs import CostClock, run_cost

    clock = CostClock(tmp_path, step=4)  # resumed at step 4
    sum(range(200_000))  # some CPU time
    clock.record(8)
    clock.record(8)  # nothing new: no line
    clock.record(10)
    lines = [json.loads(x) for x in (tmp_path / "cost.jsonl").read_text().splitlines()]
    assert [x["steps"] for x in lines] == [4, 2]
    assert run_cost(tmp_path)["steps"] == 6 and run_cost(tmp_path / "none")["steps"] == 0
