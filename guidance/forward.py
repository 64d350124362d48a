"""One forward of every model a plan needs, each with its own KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from guidance.plan import DecodePlan
from model_store.loader import LoadedStore


@dataclass
class RowOutputs:
    """Last-position outputs of one decode step."""

    logprobs: dict[int, torch.Tensor]
    """Shared-row index -> next-token log-probabilities (vocab,)."""
    values: list[torch.Tensor]
    """Per value source: values (vocab,)."""


@dataclass
class KVState:
    """KV caches of one sequence: one for the shared base rows, one per standalone model."""

    shared: object | None = None
    standalone: list[object | None] = field(default_factory=list)


def _last_hidden(decoder, ids: torch.Tensor, cache: object | None) -> tuple[torch.Tensor, object]:
    out = decoder(input_ids=ids, cache=cache, use_cache=True)
    return out.last_hidden_state[:, -1], out.cache  # (rows, hidden)


@torch.inference_mode()
def forward_plan(
    store: LoadedStore, plan: DecodePlan, new_ids: torch.Tensor, kv: KVState
) -> RowOutputs:
    """Run the plan's rows on `new_ids` (tokens, ) — the prompt at prefill, then one token."""
    model = store.model
    rows = plan.coefficients.shape[0]
    store.coefficients.set(plan.coefficients)
    try:
        hidden, kv.shared = _last_hidden(
            model.get_decoder(), new_ids[None, :].expand(rows, -1), kv.shared
        )
    finally:
        store.coefficients.set(None)
    lm_rows = plan.logprob_rows
    logits = model.get_output_embeddings()(hidden[lm_rows]).float()
    logprobs = {row: torch.log_softmax(logits[i], -1) for i, row in enumerate(lm_rows)}
    values: list[torch.Tensor] = []
    if not kv.standalone:
        kv.standalone = [None] * len(plan.values)
    for index, source in enumerate(plan.values):
        if source.model is None:
            embedding = model.get_output_embeddings().weight
            values.append(source.head(hidden[source.row][None], embedding)[0].float())
            continue
        own_hidden, kv.standalone[index] = _last_hidden(
            source.model.get_decoder(), new_ids[None, :], kv.standalone[index]
        )
        embedding = source.model.get_output_embeddings().weight
        values.append(source.head(own_hidden, embedding)[0].float())
    return RowOutputs(logprobs, values)


def policy_logprobs(plan: DecodePlan, out: RowOutputs) -> torch.Tensor:
    """log pi of the policy, (vocab,): the merged row, or MOD's sum_i mu_i log pi_i."""
    if len(plan.policy_rows) == 1:
        return out.logprobs[plan.policy_rows[0]]
    return sum(w * out.logprobs[r] for w, r in zip(plan.policy_mix, plan.policy_rows, strict=True))


def guidance_term(plan: DecodePlan, out: RowOutputs) -> torch.Tensor | None:
    """The V of Eq. (25) for the plan's mode, (vocab,), or None for `none`."""
    if plan.values:  # explicit: merged V (MAGE-E-M) or sum_i mu_i V_i (MAGE-E)
        return sum(w * v for w, v in zip(plan.mix, out.values, strict=True))
    if plan.reference_row is not None:  # implicit: log pi*/pi_ref (Eq. 23), merged or ensembled
        ref = out.logprobs[plan.reference_row]
        return sum(
            w * (out.logprobs[row] - ref) for w, row in zip(plan.mix, plan.pistar_rows, strict=True)
        )
    return None
