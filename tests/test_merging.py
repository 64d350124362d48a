"""Stage-1 coefficient maths and exact LoRA merging."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from merging.coefficients import (
    PreferenceError,
    bone_soup_coefficients,
    check_combination_matrix,
    circulant_matrix,
    normalise_preference,
    solve_lambda,
)
from merging.lora import (
    LoraFactors,
    apply_row_lora,
    exact_merged_delta,
    lora_delta,
    stack_adapters,
)
from merging.registry import ABLATION_MERGE_METHODS, MERGE_METHODS, get_merge_method
from model_store.adapters import load_lora_adapter
from model_store.loader import load_store
from model_store.multi_lora import MultiLoraLinear


def test_circulant_matches_eq12():
    b = circulant_matrix(0.6, 3)
    assert torch.allclose(b.diagonal(), torch.full((3,), 0.6, dtype=torch.float64))
    assert torch.allclose(b[0, 1], torch.tensor(0.2, dtype=torch.float64))
    assert torch.allclose(b.sum(0), torch.ones(3, dtype=torch.float64))  # columns on simplex
    check_combination_matrix(b)
    with pytest.raises(ValueError, match="beta"):
        circulant_matrix(0.3, 3)


def test_singular_and_off_simplex_matrices_are_rejected():
    with pytest.raises(ValueError, match="singular"):
        check_combination_matrix(torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64))
    with pytest.raises(ValueError, match="simplex"):
        check_combination_matrix(torch.tensor([[0.9, 0.3], [0.3, 0.7]], dtype=torch.float64))


def test_lambda_solves_b_lambda_equals_mu_and_can_be_negative():
    b = circulant_matrix(0.7, 2)
    mu = torch.tensor([1.0, 0.0], dtype=torch.float64)
    lam = solve_lambda(b, mu)
    assert torch.allclose(b @ lam, mu)
    assert lam[1] < 0  # extrapolation beyond the backbones is intended
    assert torch.allclose(lam, torch.tensor([1.75, -0.75], dtype=torch.float64))


def test_extrapolation_eq13_scales_delta_by_one_plus_alpha():
    b = circulant_matrix(0.8, 3)
    mu = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    assert torch.allclose(bone_soup_coefficients(b, mu, 0.3), 1.3 * solve_lambda(b, mu))
    assert torch.allclose(get_merge_method("rewarded-soup").coefficients(b, mu, 0.3), mu)


def test_paper_example_1():
    # Section 3.3.2: backbones trained on h1 = .4 r1 + .6 r2 and h2 = .6 r1 + .4 r2.
    b = torch.tensor([[0.4, 0.6], [0.6, 0.4]], dtype=torch.float64)  # columns w_1, w_2
    thetas = torch.tensor([[2.2, -5 / 7], [1.8, -5 / 11]], dtype=torch.float64)
    lam = bone_soup_coefficients(b, torch.tensor([0.5, 0.5], dtype=torch.float64), alpha=0.0)
    merged = lam @ thetas
    assert torch.allclose(merged, torch.tensor([2.0, -0.58], dtype=torch.float64), atol=5e-3)
    optimum, soup = torch.tensor([2.0, -0.6]), torch.tensor([2.0, 0.0])
    assert (merged.float() - optimum).norm() < (soup - optimum).norm()


@pytest.mark.parametrize(
    ("preference", "message"),
    [
        ([1.0], "must have 2 weights"),
        ([1.0, -0.5], ">= 0"),
        ([0.0, 0.0], "not all be zero"),
        ([float("nan"), 1.0], "finite"),
        ({"helpful": 1.0, "funny": 1.0}, "unknown objective"),
        (["a", 1.0], "must be a number"),
    ],
)
def test_bad_preferences_get_clear_messages(preference, message):
    with pytest.raises(PreferenceError, match=message):
        normalise_preference(preference, ["helpful", "harmless"])


def test_weights_near_the_float_maximum_do_not_overflow():
    # math.fsum([1e308, 1e308]) overflows; mu is scale-free, so these are (1/2, 1/2).
    mu = normalise_preference([1e308, 1e308], ["helpful", "harmless"])
    assert torch.equal(mu, torch.tensor([0.5, 0.5], dtype=torch.float64))
    mu = normalise_preference({"harmless": 1.7e308}, ["helpful", "harmless"])
    assert torch.equal(mu, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.isfinite(normalise_preference([1.7e308, 5e-324], ["a", "b"])).all()


def test_preference_is_normalised_and_map_form_accepted():
    mu = normalise_preference({"harmless": 3.0, "helpful": 1.0}, ["helpful", "harmless"])
    assert torch.allclose(mu, torch.tensor([0.25, 0.75], dtype=torch.float64))


def _random_factors(out: int, inp: int, rank: int, scale: float, seed: int) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(
        torch.randn(rank, inp, generator=g, dtype=torch.float64),
        torch.randn(out, rank, generator=g, dtype=torch.float64),
        scale,
    )


def test_row_merge_equals_dense_merge_not_the_factor_average():
    adapters = [_random_factors(6, 5, 2, 0.5, 1), _random_factors(6, 5, 4, 2.0, 2)]
    coefficients = [1.75, -0.75]
    x = torch.randn(1, 3, 5, dtype=torch.float64)
    stacked = stack_adapters(dict(enumerate(adapters)))
    per_row = apply_row_lora(x, stacked, torch.tensor([coefficients], dtype=torch.float64))
    dense = x @ exact_merged_delta(adapters, coefficients).T
    assert torch.allclose(per_row, dense, atol=1e-10)
    # The inexact (sum c B)(sum c A) merge differs; it needs equal ranks, so compare on rank 2.
    same_rank = [_random_factors(6, 5, 2, 1.0, 3), _random_factors(6, 5, 2, 1.0, 4)]
    naive = sum(c * f.lora_b for f, c in zip(same_rank, coefficients, strict=True)) @ sum(
        c * f.lora_a for f, c in zip(same_rank, coefficients, strict=True)
    )
    assert not torch.allclose(naive, exact_merged_delta(same_rank, coefficients), atol=1e-3)


def test_rows_with_different_coefficients_share_one_forward(tiny_store):
    store = load_store(tiny_store, device="cpu", dtype="float32")
    layer = next(
        m
        for m in store.model.modules()
        if isinstance(m, MultiLoraLinear) and 0 in m.adapters and 1 in m.adapters
    )
    x = torch.randn(3, 4, layer.in_features)
    rows = torch.tensor([[1.75, -0.75, 0, 0], [0.0, 0.0, 0, 0], [-0.5, 1.5, 0, 0]])
    store.coefficients.set(rows)
    try:
        batched = layer(x)
    finally:
        store.coefficients.set(None)
    for r in range(3):
        delta = exact_merged_delta([layer.adapters[0], layer.adapters[1]], rows[r, :2].tolist())
        expected = x[r] @ (layer.base.weight + delta).T
        assert torch.allclose(batched[r], expected, atol=1e-5)


def test_exact_merge_matches_peft_cat(tiny_store):
    store = load_store(tiny_store, device="cpu", dtype="float32")
    base = store.model
    for module in list(base.modules()):  # unwrap to a plain model for PEFT
        for name, child in list(module.named_children()):
            if isinstance(child, MultiLoraLinear):
                setattr(module, name, child.base)
    peft_model = PeftModel.from_pretrained(
        base, str(tiny_store / "backbones/helpful"), adapter_name="a"
    )
    peft_model.load_adapter(str(tiny_store / "backbones/harmless"), adapter_name="b")
    weights = [1.75, -0.75]
    peft_model.add_weighted_adapter(["a", "b"], weights, "merged", combination_type="cat")
    ours = {
        name: load_lora_adapter(tiny_store / f"backbones/{name}", name, torch.float32).modules
        for name in ("helpful", "harmless")
    }
    modules = set(ours["helpful"]) | set(ours["harmless"])
    checked = 0
    for module in sorted(modules):
        peft_layer = peft_model.base_model.model.get_submodule(module)
        peft_delta = peft_layer.get_delta_weight("merged")
        parts = [
            (ours[n][module], w)
            for n, w in zip(("helpful", "harmless"), weights, strict=True)
            if module in ours[n]
        ]
        dense = exact_merged_delta([p for p, _ in parts], [w for _, w in parts])
        assert torch.allclose(peft_delta, dense, atol=1e-5), module
        checked += 1
    assert checked == len(modules) >= 5  # adapters differ in targets and rank
    assert lora_delta(ours["helpful"][sorted(ours["helpful"])[0]]).abs().sum() > 0


@pytest.mark.parametrize("name", sorted(MERGE_METHODS | ABLATION_MERGE_METHODS))
def test_every_merge_method_is_linear_in_mu(name):
    """guidance.plan builds coefficient rows from each method's linear map M (c = M mu),
    computed once; that is exact only for methods linear in mu."""
    from guidance.plan import linear_map

    method = get_merge_method(name)
    matrix = circulant_matrix(0.7, 3)
    linear = torch.tensor(linear_map(method, matrix, 0.4), dtype=torch.float64)
    for mu in ([0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.05, 0.9, 0.05]):
        mu = torch.tensor(mu, dtype=torch.float64)
        assert torch.allclose(linear @ mu, method.coefficients(matrix, mu, 0.4), atol=1e-12)
