"""Turn a validated HTTP body into the engine's GenerationRequest (tokenising the prompt)."""

from __future__ import annotations

import time
import uuid

from guidance.requests import GenerationRequest, SamplingParams
from merging.coefficients import PreferenceError, normalise_preference
from model_store.loader import LoadedStore
from model_store.manifest import GUIDANCE_MODES
from server.schemas import ApiError, GenerateBody, check_ranges
from server.settings import ServerSettings


def available_modes(store: LoadedStore) -> list[str]:
    guidance = store.checked.manifest.guidance
    modes = ["none"]
    if guidance.explicit:
        modes += ["explicit", "explicit-ensemble"]
    if guidance.implicit:
        modes += ["implicit", "implicit-ensemble"]
    return modes


def tokenize_prompt(body: GenerateBody, store: LoadedStore, settings: ServerSettings) -> list[int]:
    tokenizer = store.tokenizer
    if (body.inputs is None) == (body.messages is None):
        raise ApiError(422, "give exactly one of `inputs` or `messages`", "validation")
    if body.messages is not None:
        if not body.messages:
            raise ApiError(422, "`messages` cannot be empty", "validation")
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(422, "this model has no chat template; send `inputs`", "validation")
        messages = [m.model_dump() for m in body.messages]
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # jinja errors for roles the template rejects
            raise ApiError(422, f"`messages` could not be rendered: {exc}", "validation") from None
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        if not body.inputs:
            raise ApiError(422, "`inputs` cannot be empty", "validation")
        ids = tokenizer(body.inputs, add_special_tokens=False)["input_ids"]
    if len(ids) > settings.max_input_tokens:
        raise ApiError(
            422,
            f"`inputs` must have less than {settings.max_input_tokens} tokens. Given: {len(ids)}",
            "validation",
        )
    return ids


def build_request(
    body: GenerateBody, store: LoadedStore, settings: ServerSettings
) -> GenerationRequest:
    p = body.parameters
    check_ranges(p, settings.max_new_tokens, settings.max_stop_sequences)
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
    if mode not in GUIDANCE_MODES:
        raise ApiError(
            422,
            f"`guidance.mode` must be one of {list(GUIDANCE_MODES)}. Given: {mode!r}",
            "validation",
        )
    if mode not in available_modes(store):
        raise ApiError(
            422,
            f"guidance mode {mode!r} is not available in this store; "
            f"available: {available_modes(store)}",
            "validation",
        )
    gamma = p.guidance.gamma if p.guidance and p.guidance.gamma is not None else defaults.gamma
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


def _sampling(p, defaults) -> SamplingParams:
    sample = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p))
    if not sample and defaults.temperature:
        return SamplingParams(defaults.temperature, defaults.top_k, defaults.top_p, p.seed)
    if not sample:
        return SamplingParams(seed=p.seed)
    return SamplingParams(p.temperature or 1.0, p.top_k, p.top_p, p.seed)
