"""A preference that changes while its request runs (POST /v1/requests/{id}/preference).

The HTTP layer leaves the new mu on the request's handle (RequestHandle.change_preference);
the engine takes it at its next schedule step and swaps the sequence's plan for the plan of
the new mu, built through the merge cache like any other. From then on every forward of
that sequence runs the new coefficients (lambda = B^-1 mu, Eq. 13, and the value merge of
Eq. 24), so the first token chosen under the new plan is the next one the request
generates. The KV already computed stays as it was: the prompt and the tokens before are
not recomputed under the new preference (the token generated last is fed, and its KV
computed, under the new plan, since that forward picks the next token). A change that
comes while the prompt is still being prefilled waits for the first decode step, so a
prompt's KV always has one preference; one that comes while the request is queued applies
from the start.

Only mu changes: the mode, gamma and merge method stay, so the new plan has the same rows
and the same value lanes as the old, and the sequence keeps its place in the batch's KV.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from guidance.plan import DecodePlan
from guidance.requests import GenerationRequest
from guidance.sequence import Sequence
from merging.registry import get_merge_method
from model_store.loader import LoadedStore

log = logging.getLogger("mage.engine")
PlanFor = Callable[[GenerationRequest, torch.Tensor], DecodePlan]
"""The plan of a request's mode and merge method for another mu (the engine's merge cache)."""


def change_refused(store: LoadedStore, request: GenerationRequest) -> str | None:
    """Why this request's preference cannot change while it runs, or None if it can."""
    if request.plan is not None:
        return "its decode plan was built by the caller, not from its preference"
    method = get_merge_method(request.merge_method)
    if method.adapters not in ("backbones", "specialists"):
        return (
            f"merge method {method.name!r} applies one trained adapter, its preference fixed "
            "in training or written into the prompt, not a merge of mu"
        )
    if request.mode == "explicit" and store.value_kind == "standalone":
        # Eq. (24) on whole standalone models: each mu has its own merged model, with its own
        # KV lane, and the KV computed by one merged model cannot be continued by another.
        return (
            "mode 'explicit' over standalone value models merges a whole value model per "
            "preference, whose KV cannot carry over to another; use 'explicit-ensemble'"
        )
    return None


def same_layout(old: DecodePlan, new: DecodePlan) -> bool:
    """Whether `new` can take over `old`'s KV: the same rows in the shared lane and the same
    standalone value models (hence lanes) in the same order."""
    models = [s.model for s in old.values], [s.model for s in new.values]
    return (
        old.rows == new.rows
        and len(models[0]) == len(models[1])
        and all(a is b for a, b in zip(*models, strict=True))
        and [s.row for s in old.values] == [s.row for s in new.values]
    )


def apply_change(store: LoadedStore, seq: Sequence, plan_for: PlanFor) -> bool:
    """Take the sequence's waiting preference change, if any, and decode under it from its
    next token on; True when its plan changed (its batch's layout must be rebuilt)."""
    mu = seq.handle.take_preference()
    if mu is None or seq.finished or change_refused(store, seq.request) is not None:
        return False
    plan = plan_for(seq.request, mu)
    if not same_layout(seq.plan, plan):  # change_refused keeps these out; never mix KV
        log.warning("preference change of %s ignored: rows differ", seq.request.request_id)
        return False
    start, _ = seq.plans[-1]
    if start == seq.generated:  # the plan it replaces chose no token: not worth listing
        seq.plans.pop()
    seq.plans.append((seq.generated, plan))
    seq.plan = plan
    return True
