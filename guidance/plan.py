"""What one preference needs at decode time: which rows run, and how they combine.

The policy, the reference, the pi* models and LoRA value models all run as rows of one
batched forward of the shared base (model_store.multi_lora); standalone value models run
separately. A plan is built once per (mode, preference, merge method) and cached.

Building one is host arithmetic on n floats: every merge method is linear in mu, so its map
is computed once per (method, B, alpha) through the method itself, and a new preference
costs a few list operations and one tensor creation (no device work, and no torch op that
would give up the GIL to the HTTP thread mid-build).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from merging.registry import MergeMethod, get_merge_method
from model_store.loader import LoadedStore

PREFERENCE_DECIMALS = 6


@dataclass(frozen=True)
class ValueSource:
    """One value model's contribution: V comes from a shared-base row or a standalone model,
    scored by the store's value heads mixed with `weights`."""

    weights: tuple[float, ...]
    """Mix of the store's value heads, one weight per objective: mu for the merged value
    model (Eq. 24; heads are linear, so mixing outputs equals merging parameters), e_i for
    V_i."""
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
    policy_mix: tuple[float, ...]
    """Per policy row: (1,) for a merged policy; mu for MOD (sum_i mu_i log pi_i)."""
    reference_row: int | None
    """pi_ref (base) row, for implicit modes."""
    pistar_rows: tuple[int, ...]
    """pi* rows for implicit modes: one merged row, or n ensemble rows."""
    values: tuple[ValueSource, ...]
    """Explicit value sources: one merged source, or n ensemble sources."""
    mix: tuple[float, ...]
    """Per pi* row or value source, the weight of its guidance term: (1,) when merged, mu for
    MAGE-E, lambda = B^-1 mu for MAGE-I (see `build_plan`); per `arm` row, mu_i beta_i (merged:
    sum_i mu_i beta_i)."""
    terms: tuple[ScoreTerm, ...] = ()
    """Eq. (25) as a weighted sum of this plan's outputs (see `score_terms`)."""
    active_slots: tuple[int, ...] = ()
    """Adapter slots with a non-zero coefficient in some row (known without a device read)."""
    arm_rows: tuple[int, ...] = ()
    """Explicit modes over `arm` value models: rows whose next-token log-probabilities,
    times beta, are V (one merged row, or n ensemble rows; see `arm_values`)."""

    @property
    def rows(self) -> int:
        return int(self.coefficients.shape[0])

    @property
    def logprob_rows(self) -> list[int]:
        """Shared rows whose next-token log-probabilities the step needs."""
        return logprob_rows(self.policy_rows, self.pistar_rows, self.reference_row, self.arm_rows)

    def nbytes(self) -> int:
        total = self.coefficients.numel() * self.coefficients.element_size()
        for source in self.values:
            if source.model is not None:
                total += sum(p.numel() * p.element_size() for p in source.model.parameters())
        return total


def logprob_rows(
    policy_rows: tuple[int, ...],
    pistar_rows: tuple[int, ...],
    reference_row: int | None,
    arm_rows: tuple[int, ...] = (),
) -> list[int]:
    """Shared rows whose next-token log-probabilities a plan needs, in output order."""
    rows = {*policy_rows, *pistar_rows, *arm_rows}
    return sorted(rows | ({reference_row} if reference_row is not None else set()))


def score_terms(
    outputs: list[int],
    policy_rows: tuple[int, ...],
    policy_mix: tuple[float, ...],
    reference_row: int | None,
    pistar_rows: tuple[int, ...],
    value_count: int,
    mix: tuple[float, ...],
    arm_rows: tuple[int, ...] = (),
) -> tuple[ScoreTerm, ...]:
    """log pi + gamma V (Eq. 25) as terms over outputs; policy terms first. Implicit V is
    sum_j w_j (log pi*_j - log pi_ref) = sum_j w_j log pi*_j - (sum_j w_j) log pi_ref (Eq. 23);
    explicit V is sum_j w_j V_j (Eq. 24 merged: one source with w = 1); over `arm` value
    models V_j = beta_j log pi_r,j, so each arm row is a log-probability term of weight `mix`
    (which then carries w_j beta_j)."""
    at = {row: i for i, row in enumerate(outputs)}
    terms = [ScoreTerm(at[r], w, 0.0) for r, w in zip(policy_rows, policy_mix, strict=True)]
    if arm_rows:
        terms += [ScoreTerm(at[r], 0.0, w) for r, w in zip(arm_rows, mix, strict=True)]
    elif value_count:
        first = len(outputs)
        terms += [ScoreTerm(first + k, 0.0, w) for k, w in enumerate(mix)]
    elif reference_row is not None:
        terms += [ScoreTerm(at[r], 0.0, w) for r, w in zip(pistar_rows, mix, strict=True)]
        terms.append(ScoreTerm(at[reference_row], 0.0, -sum(mix)))
    return tuple(terms)


def round_preference(mu: torch.Tensor) -> torch.Tensor:
    """mu rounded to PREFERENCE_DECIMALS (the merge cache's key), on the host."""
    return torch.tensor([round(w, PREFERENCE_DECIMALS) for w in mu.tolist()], dtype=torch.float64)


_LINEAR_MAPS: dict[tuple[str, int, float], tuple[torch.Tensor, list[list[float]]]] = {}


def linear_map(method: MergeMethod, matrix: torch.Tensor, alpha: float) -> list[list[float]]:
    """M with coefficients(B, mu, alpha) = M mu, computed once through the method itself
    (every registered method is linear in mu: tests/test_merging.py checks it)."""
    key = (method.name, id(matrix), alpha)
    cached = _LINEAR_MAPS.get(key)
    if cached is None or cached[0] is not matrix:  # the matrix is kept, so its id stays its own
        n = matrix.shape[0]
        basis = torch.eye(n, dtype=torch.float64)
        columns = [method.coefficients(matrix, basis[j], alpha).tolist() for j in range(n)]
        rows = range(len(columns[0]))  # one per adapter it weighs (1 for a single policy)
        cached = _LINEAR_MAPS[key] = (matrix, [[col[i] for col in columns] for i in rows])
    return cached[1]


def _apply(linear: list[list[float]], mu: list[float]) -> list[float]:
    return [sum(m * w for m, w in zip(row, mu, strict=True)) for row in linear]


def _one_hot(n: int, i: int) -> list[float]:
    return [1.0 if j == i else 0.0 for j in range(n)]


def _merged_standalone(store: LoadedStore, mu: list[float]) -> PreTrainedModel:
    """Eq. (24) on whole standalone value models: theta_merge = sum_i mu_i theta_i."""
    import copy

    models = store.standalone_values
    merged = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    merged.load_state_dict(
        {k: sum(w * s[k] for w, s in zip(mu, states, strict=True)) for k in states[0]}
    )
    return merged.eval()


def _value_sources(store: LoadedStore, mode: str, mu: list[float], first_row: int):
    """Rows (coefficients by slot) and sources for the explicit modes."""
    n = store.n_objectives
    weights = [mu] if mode == "explicit" else [_one_hot(n, i) for i in range(n)]
    rows: list[dict[int, float]] = []
    sources: list[ValueSource] = []
    for w in weights:
        if store.value_kind == "lora":
            # Eq. (24): the merged value adapter is sum_i mu_i Delta_i
            rows.append(dict(zip(store.value_slots, w, strict=True)))
            sources.append(ValueSource(weights=tuple(w), row=first_row + len(rows) - 1))
        else:
            model = (
                store.standalone_values[w.index(1.0)]
                if mode != "explicit"
                else _merged_standalone(store, w)
            )
            sources.append(ValueSource(weights=tuple(w), model=model))
    return rows, sources


def arm_values(store: LoadedStore, mode: str, mu: list[float], first_row: int):
    """Rows, row numbers and term weights of `arm` value models (GenARM, PARM).

    `explicit` merges the adapters by Eq. (24), Delta = sum_i mu_i Delta_i, in one row whose
    V is (sum_i mu_i beta_i) log pi_r,merged; `explicit-ensemble` runs each alone, V =
    sum_i mu_i beta_i log pi_r,i. Either way the guided score is
    log pi + gamma sum_i mu_i beta_i log pi_r,i (Eq. 25; exactly so for the ensemble)."""
    betas = store.arm_betas
    if mode == "explicit":
        rows = [dict(zip(store.value_slots, mu, strict=True))]
        weights = [sum(w * b for w, b in zip(mu, betas, strict=True))]
    else:
        rows = [{slot: 1.0} for slot in store.value_slots]
        weights = [w * b for w, b in zip(mu, betas, strict=True)]
    return rows, tuple(range(first_row, first_row + len(rows))), tuple(weights)


def _baseline_slot(store: LoadedStore, adapters: str, mu: list[float]) -> list[int]:
    """The slot of a trained baseline's adapter: RiC's, or the MORLHF/MODPO adapter trained
    for exactly `mu` (a preference without one is refused by name, never approximated)."""
    from model_store.validate import preference_slot_name

    if adapters == "ric":
        if "ric" not in store.baseline_slots:
            raise ValueError("this store has no RiC adapter (manifest baselines.ric)")
        return [store.baseline_slots["ric"]]
    name = preference_slot_name(adapters, mu)
    if name not in store.baseline_slots:
        prefix = adapters + ":"
        trained = sorted(k[len(prefix) :] for k in store.baseline_slots if k.startswith(prefix))
        raise ValueError(
            f"{adapters} was not trained for preference {name.partition(':')[2]}; "
            f"trained (and loaded) for: {trained or 'none'}"
        )
    return [store.baseline_slots[name]]


def _policy_adapter_slots(store: LoadedStore, adapters: str, mu: list[float]) -> list[int]:
    """Slots a merge method's coefficients go to: the backbones, or the Rewarded-Soup
    specialists (the backbones themselves when B = I), or a trained baseline's adapter."""
    if adapters == "backbones":
        return store.backbone_slots
    if adapters != "specialists":
        return _baseline_slot(store, adapters, mu)
    if store.specialist_slots:
        return store.specialist_slots
    n = store.n_objectives
    if torch.equal(store.checked.combination_matrix, torch.eye(n, dtype=torch.float64)):
        return store.backbone_slots
    raise ValueError(
        "this store has no Rewarded-Soup specialists (manifest 'specialists', weights e_i) "
        "and its backbones are not specialists (B != I)"
    )


def _check_plan_options(mode: str, policy: str, pistar_merge: str | None, implicit_mix: str):
    if policy not in ("merged", "logit-ensemble", "base"):
        raise ValueError(f"unknown policy {policy!r}: 'merged', 'logit-ensemble' or 'base'")
    if policy == "logit-ensemble" and mode != "none":
        raise ValueError("the logit-ensemble policy (MOD) takes no guidance: mode must be 'none'")
    if pistar_merge is not None and mode != "implicit":
        raise ValueError("pistar_merge applies to the merged implicit mode only")
    if implicit_mix not in ("lambda", "mu"):
        raise ValueError(f"implicit_mix must be 'lambda' or 'mu', got {implicit_mix!r}")


def _policy_rows(
    store: LoadedStore, method: MergeMethod, policy: str, mu: list[float]
) -> tuple[list[dict[int, float]], tuple[int, ...], tuple[float, ...]]:
    """(rows, policy_rows, policy_mix): each row maps adapter slot -> coefficient. The merged
    policy is one row, its coefficients the method's map with extrapolation alpha (Eq. 13);
    MOD is pi_i alone in row i, mixed by mu."""
    matrix, alpha = store.checked.combination_matrix, store.checked.manifest.alpha
    adapter_slots = _policy_adapter_slots(store, method.adapters, mu)
    if policy == "logit-ensemble":
        return [{slot: 1.0} for slot in adapter_slots], tuple(range(len(mu))), tuple(mu)
    coefficients = [] if policy == "base" else _apply(linear_map(method, matrix, alpha), mu)
    return [dict(zip(adapter_slots, coefficients, strict=False))], (0,), (1.0,)


def _add_implicit_rows(
    store: LoadedStore,
    rows: list[dict[int, float]],
    mode: str,
    mu: list[float],
    pistar_merge: str | None,
    implicit_mix: str,
) -> tuple[int, tuple[int, ...], tuple[float, ...]]:
    """Append pi_ref (the bare base) and the pi* rows of Eq. (23) to `rows`; return
    (reference_row, pistar_rows, mix)."""
    matrix = store.checked.combination_matrix
    rows.append({})  # pi_ref: the bare base
    reference_row = len(rows) - 1
    if mode == "implicit" and pistar_merge is None:
        return reference_row, (0,), (1.0,)  # pi*_merged is the Bone Soup merge: the policy row
    if mode == "implicit":
        pistar = _apply(linear_map(get_merge_method(pistar_merge), matrix, 0.0), mu)
        rows.append(dict(zip(store.backbone_slots, pistar, strict=True)))
        return reference_row, (len(rows) - 1,), (1.0,)
    # MAGE-I: each backbone alone as pi*_i (Eq. 23), weighed by lambda = B^-1 mu
    first = len(rows)
    rows += [{slot: 1.0} for slot in store.backbone_slots]
    lambdas = _apply(linear_map(get_merge_method("bone-soup"), matrix, 0.0), mu)
    mix = lambdas if implicit_mix == "lambda" else mu
    return reference_row, tuple(range(first, len(rows))), tuple(mix)


def _add_explicit_rows(
    store: LoadedStore, rows: list[dict[int, float]], mode: str, mu: list[float]
) -> tuple[tuple[ValueSource, ...], tuple[float, ...], tuple[int, ...]]:
    """Append the value models' rows (Eq. 16; merged by mu, Eq. 24) to `rows`; return
    (values, mix, arm_rows)."""
    if store.value_kind is None:
        raise ValueError("this store has no explicit value models")
    if store.value_kind == "arm":
        value_rows, arm_rows, mix = arm_values(store, mode, mu, first_row=len(rows))
        rows += value_rows
        return (), mix, arm_rows
    value_rows, sources = _value_sources(store, mode, mu, first_row=len(rows))
    rows += value_rows
    return tuple(sources), tuple(mu) if mode == "explicit-ensemble" else (1.0,), ()


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
    _check_plan_options(mode, policy, pistar_merge, implicit_mix)
    weights = mu.tolist()
    method = get_merge_method(merge_method)
    matrix = store.checked.combination_matrix
    lambdas = _apply(linear_map(method, matrix, 0.0), weights)
    rows, policy_rows, policy_mix = _policy_rows(store, method, policy, weights)
    reference_row, pistar_rows, values, mix, arm_rows = None, (), (), (1.0,), ()
    if mode.startswith("implicit"):
        reference_row, pistar_rows, mix = _add_implicit_rows(
            store, rows, mode, weights, pistar_merge, implicit_mix
        )
    elif mode.startswith("explicit"):
        values, mix, arm_rows = _add_explicit_rows(store, rows, mode, weights)
    terms = score_terms(
        logprob_rows(policy_rows, pistar_rows, reference_row, arm_rows),
        policy_rows,
        policy_mix,
        reference_row,
        pistar_rows,
        len(values),
        mix,
        arm_rows,
    )
    dense = [[row.get(slot, 0.0) for slot in range(store.slot_count)] for row in rows]
    return DecodePlan(
        mode=mode,
        preference=mu,
        lambdas=torch.tensor(lambdas, dtype=torch.float64),
        coefficients=torch.tensor(dense, dtype=store.dtype, device=store.device),
        policy_rows=policy_rows,
        policy_mix=policy_mix,
        reference_row=reference_row,
        pistar_rows=pistar_rows,
        values=values,
        mix=mix,
        terms=terms,
        active_slots=tuple(sorted({s for row in rows for s, c in row.items() if c != 0.0})),
        arm_rows=arm_rows,
    )
