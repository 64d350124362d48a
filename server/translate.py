"""Turn a validated HTTP body into the engine's GenerationRequest (tokenising the prompt)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from guidance.requests import GenerationRequest, SamplingParams
from merging.coefficients import PreferenceError, normalise_preference
from model_store.loader import LoadedStore
from server.schemas import CHARS_PER_TOKEN_BOUND, ApiError
from server.settings import ServerSettings


def available_modes(store: LoadedStore) -> list[str]:
    guidance = store.checked.manifest.guidance
    modes = ["none"]
    if guidance.explicit:
        modes += ["explicit", "explicit-ensemble"]
    if guidance.implicit:
        modes += ["implicit", "implicit-ensemble"]
    return modes


def tokenize_prompt(body: Any, store: LoadedStore, settings: ServerSettings) -> list[int]:
    """Prompt ids of a text body (`inputs`, no template) or a chat body (`messages`); the
    schema has already checked that exactly one is there, non-empty, valid Unicode."""
    tokenizer = store.tokenizer
    messages = getattr(body, "messages", None)
    if messages is not None:
        # The schema bounds each message; their sum is bounded here, before the template
        # and the tokenizer see megabytes.
        max_chars = settings.max_input_tokens * CHARS_PER_TOKEN_BOUND
        total = sum(len(m.content) for m in messages)
        if total > max_chars:
            raise ApiError(
                422,
                f"`messages` must have at most {max_chars} characters in all. Given: {total}",
                "validation",
            )
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(422, "this model has no chat template; send `inputs`", "validation")
        rendered = [m.model_dump() for m in messages]
        try:
            ids = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # jinja errors for roles or orders the template rejects
            raise ApiError(422, f"`messages` could not be rendered: {exc}", "validation") from None
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = tokenizer(body.inputs, add_special_tokens=False)["input_ids"]
    if len(ids) > settings.max_input_tokens:
        raise ApiError(
            422,
            f"`inputs` must have at most {settings.max_input_tokens} tokens. Given: {len(ids)}",
            "validation",
        )
    return ids


def build_request(body: Any, store: LoadedStore, settings: ServerSettings) -> GenerationRequest:
    """The engine's request for a schema-valid body; ApiError (422) for what needs the store."""
    p = body.parameters
    defaults = store.checked.manifest.defaults
    objectives = store.objectives
    preference = (
        p.preference
        if p.preference is not None
        else (defaults.preference or [1.0] * len(objectives))
    )
    try:
        mu = normalise_preference(preference, objectives)
    except PreferenceError as exc:
        raise ApiError(422, str(exc), "validation") from None
    mode = (p.guidance.mode if p.guidance and p.guidance.mode else None) or defaults.guidance_mode
    if mode not in available_modes(store):
        raise ApiError(
            422,
            f"guidance mode {mode!r} is not available in this store; "
            f"available: {available_modes(store)}",
            "validation",
        )
    named = p.guidance.gamma if p.guidance else None
    gamma = named if named is not None else defaults.gamma_for(mode)  # tuned per mode
    ids = tokenize_prompt(body, store, settings)
    max_new = p.max_new_tokens or min(defaults.max_new_tokens, settings.max_new_tokens)
    context = getattr(store.model.config, "max_position_embeddings", None)
    if context and len(ids) + max_new > context:
        raise ApiError(
            422,
            f"`inputs` tokens + `max_new_tokens` must be <= {context}. "
            f"Given: {len(ids)} `inputs` tokens and {max_new} `max_new_tokens`",
            "validation",
        )
    sampling = _sampling(p, defaults)
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        prompt_ids=tuple(ids),
        preference=mu,
        mode=mode,
        gamma=float(gamma),
        sampling=sampling,
        max_new_tokens=max_new,
        stop=tuple(p.stop),
        deadline=time.monotonic() + settings.request_timeout_s,
        merge_method=p.merge_method,
    )


def _sampling(p: Any, defaults: Any) -> SamplingParams:
    sample = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p))
    if not sample and defaults.temperature:
        return SamplingParams(defaults.temperature, defaults.top_k, defaults.top_p, p.seed)
    if not sample:
        return SamplingParams(seed=p.seed)
    return SamplingParams(p.temperature or 1.0, p.top_k, p.top_p, p.seed)
