"""What one preference needs at decode time: which rows run, and how they combine.

The policy, the reference, the pi* models and LoRA value models all run as rows of one
batched forward of the shared base (model_store.multi_lora); standalone value models run
separately. A plan is built once per (mode, preference, merge method) and cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from merging.coefficients import solve_lambda
from merging.registry import get_merge_method
from model_store.loader import LoadedStore

PREFERENCE_DECIMALS = 6


@dataclass(frozen=True)
class ValueSource:
    """One value model's contribution: V comes from a shared-base row or a standalone model,
    scored by the store's value heads mixed with `weights`."""

    weights: torch.Tensor
    """(objectives,) float64 mix of the store's value heads: mu for the merged value model
    (Eq. 24; heads are linear, so mixing outputs equals merging parameters), e_i for V_i."""
    row: int | None = None
    """Row of the shared forward, for LoRA value models."""
    model: PreTrainedModel | None = None
    """Standalone value model, run on its own."""


@dataclass(frozen=True)
class ScoreTerm:
    """One term of the guided score log pi + gamma V (Eq. 25) as a weighted output.

    Outputs are numbered: first the plan's `logprob_rows` (in that order), then its value
    sources. A term adds (policy + gamma * guidance) * output to the score.
    """

    output: int
    """Index into the plan's outputs."""
    policy: float
    """Weight in log pi: 1 for a merged policy, mu_i for MOD's sum_i mu_i log pi_i."""
    guidance: float
    """Weight in V: mu_i (or 1) on V_i or log pi*_i; minus their sum on log pi_ref (Eq. 23)."""


@dataclass(frozen=True)
class DecodePlan:
    """Rows and weights for one preference under one guidance mode."""

    mode: str
    """Guidance mode."""
    preference: torch.Tensor
    """mu, float64 (n,), rounded to PREFERENCE_DECIMALS."""
    lambdas: torch.Tensor
    """lambda = B^-1 mu (float64), as reported to clients."""
    coefficients: torch.Tensor
    """(rows, adapter slots) in model dtype: the merged adapters of every shared row."""
    policy_rows: tuple[int, ...]
    """Rows whose log-probabilities, weighted by `policy_mix`, form the policy: the one Bone
    Soup row (Eq. 6 + Eq. 13), or one row per specialist for MOD's logit ensemble."""
    policy_mix: torch.Tensor
    """(len(policy_rows),) float64: [1] for a merged policy; mu for MOD (sum_i mu_i log pi_i)."""
    reference_row: int | None
    """pi_ref (base) row, for implicit modes."""
    pistar_rows: tuple[int, ...]
    """pi* rows for implicit modes: one merged row, or n ensemble rows."""
    values: tuple[ValueSource, ...]
    """Explicit value sources: one merged source, or n ensemble sources."""
    mix: torch.Tensor
    """(len(pistar_rows) or len(values),) float64 weights of the guidance terms: [1] when
    merged, mu for MAGE-E, lambda = B^-1 mu for MAGE-I (see `build_plan`)."""
    terms: tuple[ScoreTerm, ...] = ()
    """Eq. (25) as a weighted sum of this plan's outputs (see `score_terms`)."""
    active_slots: tuple[int, ...] = ()
    """Adapter slots with a non-zero coefficient in some row (known without a device read)."""

    @property
    def rows(self) -> int:
        return int(self.coefficients.shape[0])

    @property
    def logprob_rows(self) -> list[int]:
        """Shared rows whose next-token log-probabilities the step needs."""
        return logprob_rows(self.policy_rows, self.pistar_rows, self.reference_row)

    def nbytes(self) -> int:
        total = self.coefficients.numel() * self.coefficients.element_size()
        for source in self.values:
            if source.model is not None:
                total += sum(p.numel() * p.element_size() for p in source.model.parameters())
        return total


def logprob_rows(
    policy_rows: tuple[int, ...], pistar_rows: tuple[int, ...], reference_row: int | None
) -> list[int]:
    """Shared rows whose next-token log-probabilities a plan needs, in output order."""
    rows = {*policy_rows, *pistar_rows}
    return sorted(rows | ({reference_row} if reference_row is not None else set()))


def score_terms(
    outputs: list[int],
    policy_rows: tuple[int, ...],
    policy_mix: torch.Tensor,
    reference_row: int | None,
    pistar_rows: tuple[int, ...],
    value_count: int,
    mix: torch.Tensor,
) -> tuple[ScoreTerm, ...]:
    """log pi + gamma V (Eq. 25) as terms over outputs; policy terms first. Implicit V is
    sum_j w_j (log pi*_j - log pi_ref) = sum_j w_j log pi*_j - (sum_j w_j) log pi_ref (Eq. 23);
    explicit V is sum_j w_j V_j (Eq. 24 merged: one source with w = 1)."""
    at = {row: i for i, row in enumerate(outputs)}
    terms = [
        ScoreTerm(at[r], float(w), 0.0)
        for r, w in zip(policy_rows, policy_mix.tolist(), strict=True)
    ]
    if value_count:
        first = len(outputs)
        terms += [ScoreTerm(first + k, 0.0, float(w)) for k, w in enumerate(mix.tolist())]
    elif reference_row is not None:
        weights = mix.tolist()
        terms += [ScoreTerm(at[r], 0.0, w) for r, w in zip(pistar_rows, weights, strict=True)]
        terms.append(ScoreTerm(at[reference_row], 0.0, -sum(weights)))
    return tuple(terms)


def round_preference(mu: torch.Tensor) -> torch.Tensor:
    return torch.round(mu * 10**PREFERENCE_DECIMALS) / 10**PREFERENCE_DECIMALS


def _merged_standalone(store: LoadedStore, mu: torch.Tensor) -> PreTrainedModel:
    """Eq. (24) on whole standalone value models: theta_merge = sum_i mu_i theta_i."""
    import copy

    models = store.standalone_values
    merged = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    merged.load_state_dict(
        {k: sum(float(w) * s[k] for w, s in zip(mu, states, strict=True)) for k in states[0]}
    )
    return merged.eval()


def _value_sources(store: LoadedStore, mode: str, mu: torch.Tensor, first_row: int):
    """Rows (coefficient vectors) and sources for the explicit modes."""
    n, slots = store.n_objectives, store.value_slots
    weights = (
        [mu] if mode == "explicit" else [torch.eye(n, dtype=torch.float64)[i] for i in range(n)]
    )
    rows: list[torch.Tensor] = []
    sources: list[ValueSource] = []
    for w in weights:
        if store.value_kind == "lora":
            row = torch.zeros(store.slot_count, dtype=torch.float64)
            row[slots] = w  # Eq. (24): merged value adapter = sum_i mu_i Delta_i
            rows.append(row)
            sources.append(ValueSource(weights=w, row=first_row + len(rows) - 1))
        else:
            model = (
                store.standalone_values[int(w.argmax())]
                if mode != "explicit"
                else (_merged_standalone(store, w))
            )
            sources.append(ValueSource(weights=w, model=model))
    return rows, sources


def _policy_adapter_slots(store: LoadedStore, adapters: str) -> list[int]:
    """Slots a merge method's coefficients go to: the backbones, or the Rewarded-Soup
    specialists (the backbones themselves when B = I)."""
    if adapters == "backbones":
        return store.backbone_slots
    if store.specialist_slots:
        return store.specialist_slots
    n = store.n_objectives
    if torch.equal(store.checked.combination_matrix, torch.eye(n, dtype=torch.float64)):
        return store.backbone_slots
    raise ValueError(
        "this store has no Rewarded-Soup specialists (manifest 'specialists', weights e_i) "
        "and its backbones are not specialists (B != I)"
    )


def build_plan(
    store: LoadedStore,
    mode: str,
    mu: torch.Tensor,
    merge_method: str,
    *,
    policy: str = "merged",
    pistar_merge: str | None = None,
    implicit_mix: str = "lambda",
) -> DecodePlan:
    """Rows for (mode, mu, merge method). `policy="logit-ensemble"` is MOD (Shi et al. 2024):
    each of the method's adapters alone as a row, next token from sum_i mu_i log pi_i.
    `policy="base"` decodes with the SFT model itself (Observation 3's fixed LM_phi0).
    `pistar_merge` merges the implicit pi* with another method than the policy (Table 3's
    MAGE-I-M' uses "direct": lambda = mu).

    MAGE-I (`implicit-ensemble`) weighs backbone i's implicit value log pi*_i/pi_ref by
    lambda_i, lambda = B^-1 mu: backbone i was trained on h_i = w_i^T r (Eq. 11), so
    sum_i lambda_i h_i = (B lambda)^T r = mu^T r (Eq. 12), the reward the user asked for.
    `implicit_mix="mu"` keeps the earlier weighting by mu ((B mu)^T r), as an ablation."""
    if policy not in ("merged", "logit-ensemble", "base"):
        raise ValueError(f"unknown policy {policy!r}: 'merged', 'logit-ensemble' or 'base'")
    if policy == "logit-ensemble" and mode != "none":
        raise ValueError("the logit-ensemble policy (MOD) takes no guidance: mode must be 'none'")
    if pistar_merge is not None and mode != "implicit":
        raise ValueError("pistar_merge applies to the merged implicit mode only")
    n, slots = store.n_objectives, store.slot_count
    matrix, alpha = store.checked.combination_matrix, store.checked.manifest.alpha
    method = get_merge_method(merge_method)
    adapter_slots = _policy_adapter_slots(store, method.adapters)

    def row(coefficients: torch.Tensor | None = None, on: list[int] | None = None) -> torch.Tensor:
        out = torch.zeros(slots, dtype=torch.float64)
        if coefficients is not None:
            out[on if on is not None else adapter_slots] = coefficients
        return out

    if policy != "logit-ensemble":
        coefficients = None if policy == "base" else method.coefficients(matrix, mu, alpha)
        rows = [row(coefficients)]
        policy_rows, policy_mix = (0,), torch.ones(1, dtype=torch.float64)
    else:  # MOD: pi_i alone in row i
        rows = [row(torch.eye(n, dtype=torch.float64)[i]) for i in range(n)]
        policy_rows, policy_mix = tuple(range(n)), mu.clone()
    reference_row, pistar_rows, values = None, (), ()
    mix = torch.ones(1, dtype=torch.float64)
    if mode.startswith("implicit"):
        rows.append(row())  # pi_ref: the bare base
        reference_row = len(rows) - 1
        if mode == "implicit" and pistar_merge is None:
            pistar_rows = (0,)  # pi*_merged is the Bone Soup merge: the policy row itself
        elif mode == "implicit":
            pistar = get_merge_method(pistar_merge)
            rows.append(row(pistar.coefficients(matrix, mu, 0.0), store.backbone_slots))
            pistar_rows = (len(rows) - 1,)
        else:
            for i in range(n):  # MAGE-I: each backbone alone as pi*_i (Eq. 23)
                rows.append(row(torch.eye(n, dtype=torch.float64)[i], store.backbone_slots))
            pistar_rows = tuple(range(len(rows) - n, len(rows)))
            if implicit_mix not in ("lambda", "mu"):
                raise ValueError(f"implicit_mix must be 'lambda' or 'mu', got {implicit_mix!r}")
            mix = solve_lambda(matrix, mu) if implicit_mix == "lambda" else mu.clone()
    elif mode.startswith("explicit"):
        if store.value_kind is None:
            raise ValueError("this store has no explicit value models")
        value_rows, sources = _value_sources(store, mode, mu, first_row=len(rows))
        rows += value_rows
        values = tuple(sources)
        mix = mu.clone() if mode == "explicit-ensemble" else mix
    terms = score_terms(
        logprob_rows(policy_rows, pistar_rows, reference_row),
        policy_rows,
        policy_mix,
        reference_row,
        pistar_rows,
        len(values),
        mix,
    )
    stacked = torch.stack(rows)  # (rows, slots) float64, on the host
    return DecodePlan(
        mode=mode,
        preference=mu,
        lambdas=method.coefficients(matrix, mu, 0.0),
        coefficients=stacked.to(store.device, store.dtype),
        policy_rows=policy_rows,
        policy_mix=policy_mix,
        reference_row=reference_row,
        pistar_rows=pistar_rows,
        values=values,
        mix=mix,
        terms=terms,
        active_slots=tuple(int(k) for k in torch.nonzero(stacked.abs().sum(0)).flatten()),
    )
