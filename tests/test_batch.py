"""Batched offline decoding, MOD, the naive pi* merge, specialists and beam lookahead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from guidance.batch import Batch
from guidance.engine import Engine
from guidance.plan import DecodePlan, build_plan
from guidance.requests import GenerationRequest, SamplingParams
from guidance.search import BeamSettings, beam_lookahead, greedy_generate
from merging import get_merge_method, solve_lambda
from model_store.errors import StoreError
from model_store.loader import load_store
from model_store.manifest import MANIFEST_NAME
from model_store.validate import check_store
from model_store.value_head import load_value_head

MODES = ("none", "explicit", "explicit-ensemble", "implicit", "implicit-ensemble")
PROMPTS = ("How do I bake bread?", "Hi", "Tell me a long story about a dragon and a knight")


@pytest.fixture(scope="module")
def engine(tiny_store):
    return Engine(load_store(tiny_store, "cpu", "float32"))


def prompt_ids(store) -> list[list[int]]:
    return [store.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def one_at_a_time(engine: Engine, ids: list[int], mu, mode: str, method="bone-soup") -> list[int]:
    request = GenerationRequest(
        "t", tuple(ids), mu, mode, 1.0, SamplingParams(), 10, merge_method=method
    )
    return [event.id for event in engine.run_to_completion(request)]


class Member:
    def __init__(self, plan: DecodePlan, gamma: float = 1.0) -> None:
        self.plan, self.gamma = plan, gamma


def prefill(store, plan: DecodePlan, prompts: list[list[int]]) -> tuple[Batch, torch.Tensor]:
    """A batch of `prompts` under one plan, prefilled; its outputs at the last prompt token."""
    batch = Batch(store)
    batch.start([Member(plan) for _ in prompts], prompts)
    return batch, batch.prefill(batch.prefill_left)


def peft_merged(root: Path, folders: list[str], weights: list[float]) -> PreTrainedModel:
    """The base plus sum_i w_i Delta_i of the LoRA folders (Eq. 6, Eq. 24), merged by PEFT
    ("cat" is exact for any signs of w) and unloaded into plain transformers weights."""
    model = AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32)
    if not folders:
        return model.eval()
    names = [f"a{k}" for k in range(len(folders))]
    model = PeftModel.from_pretrained(model, str(root / folders[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:], strict=True):
        model.load_adapter(str(root / folder), adapter_name=name)
    model.add_weighted_adapter(names, weights, "merged", combination_type="cat")
    model.set_adapter("merged")
    return model.merge_and_unload().eval()


def reference_scores(root: Path, store, mode: str, mu: torch.Tensor, gamma: float):
    """ids -> guided next-token scores log pi + gamma V (Eq. 25), from whole transformers
    models (no batch, no padding, no KV cache, no multi-LoRA rows): the engine's answer
    computed another way."""
    manifest, matrix = store.checked.manifest, store.checked.combination_matrix
    weights = mu.tolist()
    policy_coefficients = get_merge_method("bone-soup").coefficients(matrix, mu, manifest.alpha)
    backbones = [b.path for b in manifest.backbones]
    policy = peft_merged(root, backbones, policy_coefficients.tolist())
    base = peft_merged(root, [], [])

    def logp(model, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model(x).logits[0, -1].float(), -1)

    def head_mix(model, mix: list[float], x: torch.Tensor) -> torch.Tensor:
        # Heads are linear (Sec. 3.4.1), so the merged head of Eq. (24) is sum_i w_i head_i(h).
        hidden = model(x, output_hidden_states=True).hidden_states[-1][0, -1:]
        embedding = model.get_output_embeddings().weight
        return sum(w * head(hidden, embedding)[0] for w, head in zip(mix, heads, strict=True))

    heads = [load_value_head(root / s.head) for s in manifest.guidance.explicit]
    values = [s.path for s in manifest.guidance.explicit]
    if mode == "none":
        value = lambda x: 0.0  # noqa: E731
    elif mode == "implicit":  # pi* is the policy's own Bone Soup merge (Eq. 23)
        value = lambda x: logp(policy, x) - logp(base, x)  # noqa: E731
    elif mode == "implicit-ensemble":  # sum_i lambda_i log pi_i/pi_ref, lambda = B^-1 mu
        lambdas = solve_lambda(matrix, mu).tolist()
        alone = [peft_merged(root, [b], [1.0]) for b in backbones]
        value = lambda x: sum(  # noqa: E731
            w * (logp(m, x) - logp(base, x)) for w, m in zip(lambdas, alone, strict=True)
        )
    elif mode == "explicit":  # one value model merged with mu (Eq. 24)
        merged = peft_merged(root, values, weights)
        value = lambda x: head_mix(merged, weights, x)  # noqa: E731
    else:  # explicit-ensemble: sum_i mu_i V_i, each value model alone
        singles = [peft_merged(root, [v], [1.0]) for v in values]
        one_hot = torch.eye(len(values)).tolist()
        value = lambda x: sum(  # noqa: E731
            w * head_mix(m, e, x) for w, m, e in zip(weights, singles, one_hot, strict=True)
        )
    return lambda x: logp(policy, x) + gamma * value(x)


def reference_greedy(score, prompt: list[int], max_new: int, eos: set[int]) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        while len(out) < max_new and not (out and out[-1] in eos):
            out.append(int(score(torch.tensor([prompt + out])).argmax()))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_batched_greedy_equals_transformers_per_prompt(engine, tiny_store, mode):
    """Left padding, positions and per-row coefficients must not change a single token: the
    batch decodes as a plain per-prompt greedy loop over PEFT-merged transformers models."""
    mu = torch.tensor([0.3, 0.7], dtype=torch.float64)
    plan = build_plan(engine.store, mode, mu, "bone-soup")
    ids = prompt_ids(engine.store)
    batched = greedy_generate(engine.store, plan, ids, 10, 1.0)
    score = reference_scores(tiny_store, engine.store, mode, mu, 1.0)
    assert batched == [reference_greedy(score, p, 10, engine.store.eos_ids) for p in ids]


def test_batched_greedy_with_standalone_value_models(standalone_store):
    engine = Engine(load_store(standalone_store, "cpu", "float32"))
    mu = torch.tensor([0.6, 0.4], dtype=torch.float64)
    plan = build_plan(engine.store, "explicit", mu, "bone-soup")
    ids = prompt_ids(engine.store)
    batched = greedy_generate(engine.store, plan, ids, 8, 1.0)
    expected = [one_at_a_time(engine, p, mu, "explicit")[:8] for p in ids]
    assert batched == expected


def test_rewarded_soup_merges_the_specialists(engine):
    store = engine.store
    mu = torch.tensor([0.25, 0.75], dtype=torch.float64)
    plan = build_plan(store, "none", mu, "rewarded-soup")
    policy = plan.coefficients[0].double()
    assert torch.allclose(policy[store.specialist_slots], mu.to(policy))  # lambda = mu
    assert not policy[store.backbone_slots].any()


def test_rewarded_soup_needs_specialists_unless_b_is_identity(tmp_path, tiny_store, soup_store):
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(tiny_store, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["specialists"] = []
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    store = load_store(copy, "cpu", "float32")
    with pytest.raises(ValueError, match="no Rewarded-Soup specialists"):
        build_plan(store, "none", torch.tensor([0.5, 0.5], dtype=torch.float64), "rewarded-soup")
    soup = load_store(soup_store, "cpu", "float32")  # B = I: its backbones are specialists
    plan = build_plan(soup, "none", torch.tensor([0.5, 0.5], dtype=torch.float64), "rewarded-soup")
    assert plan.coefficients[0, soup.backbone_slots].tolist() == [0.5, 0.5]


def test_specialists_must_be_one_hot(store_copy):
    manifest = json.loads((store_copy / MANIFEST_NAME).read_text())
    manifest["specialists"][0]["weights"] = [0.7, 0.3]
    (store_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="one-hot"):
        check_store(store_copy)


def test_mod_is_the_mu_weighted_sum_of_specialist_logprobs(engine):
    """MOD: log pi = sum_i mu_i log pi_i, each specialist alone (not a weight merge)."""
    store, mu = engine.store, torch.tensor([0.3, 0.7], dtype=torch.float64)
    ids = prompt_ids(store)[:2]
    mod = build_plan(store, "none", mu, "rewarded-soup", policy="logit-ensemble")
    single = [
        build_plan(store, "none", torch.eye(2, dtype=torch.float64)[i], "rewarded-soup")
        for i in range(2)
    ]
    batch, out = prefill(store, mod, ids)
    got, _ = batch.parts(out)  # (prompts, vocab): the MOD policy's log pi
    singles = []
    for plan in single:
        single_batch, single_out = prefill(store, plan, ids)
        singles.append(single_batch.parts(single_out)[0])
    assert torch.allclose(got, 0.3 * singles[0] + 0.7 * singles[1], atol=1e-5)
    merged = build_plan(store, "none", mu, "rewarded-soup")
    assert greedy_generate(store, mod, ids, 8, 1.0, ignore_eos=True) != greedy_generate(
        store, merged, ids, 8, 1.0, ignore_eos=True
    )


def test_naive_pistar_merges_backbones_with_mu(engine):
    store, mu = engine.store, torch.tensor([0.2, 0.8], dtype=torch.float64)
    naive = build_plan(store, "implicit", mu, "bone-soup", pistar_merge="direct")
    (pistar,) = naive.pistar_rows
    assert pistar != naive.policy_rows[0]
    assert torch.allclose(naive.coefficients[pistar, store.backbone_slots].double(), mu)
    merged = build_plan(store, "implicit", mu, "bone-soup")  # pi* = the Bone Soup policy row
    assert merged.pistar_rows == merged.policy_rows
    ids = prompt_ids(store)
    assert greedy_generate(store, naive, ids, 10, 1.0, ignore_eos=True) != greedy_generate(
        store, merged, ids, 10, 1.0, ignore_eos=True
    )


def test_keep_reorders_and_repeats_every_lane(engine):
    store = engine.store
    plan = build_plan(store, "implicit", torch.tensor([0.5, 0.5], dtype=torch.float64), "direct")
    ids = prompt_ids(store)
    batch, _ = prefill(store, plan, ids)
    reference = batch.scores(batch.decode([5, 6, 7]))
    swapped, _ = prefill(store, plan, ids)
    swapped.keep([2, 0, 0])
    got = swapped.scores(swapped.decode([7, 5, 5]))
    assert torch.allclose(got, reference[[2, 0, 0]], atol=1e-5)


def implicit_reward(store, plan, prompt: list[int], tokens: list[int]) -> float:
    """Teacher-forced sum of log pi*/pi_ref over the tokens (the beam's score)."""
    batch, out = prefill(store, plan, [prompt])
    total = 0.0
    for token in tokens:
        total += float(batch.parts(out)[1][0, token])
        out = batch.decode([token])
    return total


def test_beam_lookahead_returns_its_best_scored_beam(engine):
    store = engine.store
    plan = build_plan(store, "implicit", torch.tensor([0.4, 0.6], dtype=torch.float64), "bone-soup")
    prompt = prompt_ids(store)[0]
    settings = BeamSettings(width=3, expansion=2, interval=3, seed=1)
    ((tokens, score),) = beam_lookahead(store, plan, [prompt], 9, 1.0, set(), settings)
    assert len(tokens) == 9
    assert score == pytest.approx(implicit_reward(store, plan, prompt, tokens), abs=1e-4)
    ((again, _),) = beam_lookahead(store, plan, [prompt], 9, 1.0, set(), settings)
    assert again == tokens  # seeded
    rivals = [
        beam_lookahead(store, plan, [prompt], 9, 1.0, set(), BeamSettings(1, 1, 3, seed))[0][1]
        for seed in range(4)
    ]
    assert score >= sorted(rivals)[1]  # search beats most single samples


def test_beam_lookahead_batches_prompts_independently(engine):
    """Several prompts in one batch: each result is that prompt's own best, scored on it."""
    store = engine.store
    plan = build_plan(store, "implicit", torch.tensor([0.4, 0.6], dtype=torch.float64), "bone-soup")
    prompts = prompt_ids(store)
    found = beam_lookahead(store, plan, prompts, 6, 1.0, set(), BeamSettings(2, 2, 2, seed=3))
    assert len(found) == len(prompts)
    for prompt, (tokens, score) in zip(prompts, found, strict=True):
        assert len(tokens) == 6
        assert score == pytest.approx(implicit_reward(store, plan, prompt, tokens), abs=1e-4)
