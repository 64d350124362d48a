"""Turn a validated HTTP body into the engine's GenerationRequest (tokenising the prompt).

Both APIs (TGI's `parameters`, OpenAI's fields) are first read into one `Options`; from there
everything is shared: store defaults, preference, guidance mode, limits, sampling.
"""

from __future__ import annotations

import functools
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError

from guidance.constrain import Grammar, GrammarError, GrammarSpec, grammar_cache
from guidance.requests import GenerationRequest, SamplingParams
from merging.coefficients import PreferenceError, normalise_preference
from model_store.loader import LoadedStore
from objectives.ric import preference_prompt
from server.errors import describe_validation, quote
from server.schemas import (
    SAMPLING_FIELDS,
    SAMPLING_FILTERS,
    ApiError,
    SamplingOptions,
    Steering,
    max_prompt_chars,
)
from server.settings import ServerSettings

STEERING_KEYS = ("mode", "gamma", "merge_method")
"""Keys of an `adapter_id` (or X-Mage-Preference header) that are not objective names."""
PREFERENCE_HEADER = "x-mage-preference"
"""Header carrying the same text as `adapter_id`, for clients that can only set headers
(TGI's `text-generation` Client(headers=...))."""


@dataclass(frozen=True)
class Prompt:
    """Raw text (no template) xor chat messages ({"role", "content"} dicts)."""

    text: str | None = None
    messages: list[dict[str, str]] | None = None


@dataclass(frozen=True)
class Options:
    """What a request asks for, whichever API it came through (already schema-valid)."""

    steering: Steering = field(default_factory=Steering)
    """Preference, guidance and merge method as the body gave them (None: not given)."""
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    """The shared sampling fields as the body gave them (server.schemas: declared once)."""
    max_new_tokens: int | None = None
    """Omitted: the store's default, within the server's limit."""
    do_sample: bool = False
    """Sample; implied by temperature, top_k, top_p or typical_p."""
    stop: tuple[str, ...] = ()
    """Stop sequences."""
    top_n: int = 0
    """Alternatives per generated token."""
    prompt_logprobs: bool = False
    """Report the prompt tokens' log-probabilities."""
    truncate: int | None = None
    """Keep only the last `truncate` prompt tokens."""
    grammar: GrammarSpec | None = None
    """Structured output (TGI's grammar, OpenAI's response_format); None: free text."""


def sampling_of(body: Any, **changes: Any) -> SamplingOptions:
    """The shared sampling fields of a schema-valid body (TGI parameters or an OpenAI body),
    with `changes` applied (OpenAI's greedy temperature)."""
    given = {name: getattr(body, name) for name in SAMPLING_FIELDS} | changes
    return SamplingOptions.model_construct(**given)  # already validated by the body's schema


def available_modes(store: LoadedStore) -> list[str]:
    guidance = store.checked.manifest.guidance
    modes = ["none"]
    if guidance.explicit:
        modes += ["explicit", "explicit-ensemble"]
    if guidance.implicit:
        modes += ["implicit", "implicit-ensemble"]
    return modes


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _number(text: str) -> float:
    """A decimal number as JSON writes one; ValueError otherwise. Python's float() would
    also take '1_0' (10), 'inf' and 'nan'."""
    if not _NUMBER.fullmatch(text):
        raise ValueError(text)
    return float(text)


def parse_steering(text: str, source: str, store: LoadedStore) -> Steering:
    """`adapter_id` / header text as steering fields, checked against the store so that an
    error names `source`: "0.3,0.7" (weights in objective order) or
    "relevance=0.3,positivity=0.7", either with optional mode=, gamma=, merge_method=."""

    def refuse(problem: str) -> ApiError:
        message = f"`{source}` {problem}. Given: {quote(text)}"
        return ApiError(422, message, "validation", None, source)

    entries = [entry.partition("=") for entry in text.split(",")]
    fields = {key.strip(): value.strip() for key, sep, value in entries if sep}
    weights = [key.strip() for key, sep, _ in entries if not sep]
    named = {k: v for k, v in fields.items() if k not in STEERING_KEYS}
    if weights and named:
        raise refuse("mixes bare weights and objective=weight entries")
    values: dict[str, Any] = {}
    try:
        if weights or named:
            values["preference"] = [_number(w) for w in weights] or {
                k: _number(v) for k, v in named.items()
            }
        guidance = {k: fields[k] for k in ("mode", "gamma") if k in fields}
        if "gamma" in guidance:
            guidance["gamma"] = _number(guidance["gamma"])
    except ValueError:
        raise refuse("weights and gamma must be numbers") from None
    values |= {"guidance": guidance} if guidance else {}
    values |= {"merge_method": fields["merge_method"]} if "merge_method" in fields else {}
    try:
        steering = Steering.model_validate(values)
        if steering.preference is not None:
            normalise_preference(steering.preference, store.objectives)
    except ValidationError as exc:
        raise refuse(describe_validation(exc.errors()).replace("invalid request: ", "")) from None
    except PreferenceError as exc:
        raise refuse(f"is not a valid preference: {exc}") from None
    return steering


def merged_steering(first: Steering, *fallbacks: Steering | None) -> Steering:
    """Each steering field from the first source that gives it (body, adapter_id, header)."""
    keys = set(Steering.model_fields)
    values = first.model_dump(include=keys, exclude_none=True)
    for fallback in fallbacks:
        if fallback is not None:
            for key, value in fallback.model_dump(exclude_none=True).items():
                if key == "guidance":  # mode and gamma each from the first that gives it
                    values["guidance"] = {**value, **values.get("guidance", {})}
                else:
                    values.setdefault(key, value)
    return Steering.model_validate(values)


def header_steering(headers: Mapping[str, str], store: LoadedStore) -> Steering | None:
    """The X-Mage-Preference header's steering; two such headers are refused rather than
    one silently winning (a proxy and a client each setting one is a mistake to show)."""
    getlist = getattr(headers, "getlist", None)
    texts = getlist(PREFERENCE_HEADER) if getlist else [headers.get(PREFERENCE_HEADER)]
    texts = [t for t in texts if t]
    if len(texts) > 1:
        message = f"send one X-Mage-Preference header, not {len(texts)}"
        raise ApiError(422, message, "validation", None, "X-Mage-Preference")
    return parse_steering(texts[0], "X-Mage-Preference", store) if texts else None


def tokenize_prompt(
    prompt: Prompt, store: LoadedStore, settings: ServerSettings, truncate: int | None = None
) -> list[int]:
    """Prompt ids of raw text (no template) or chat messages; the schema has already checked
    that exactly one is there, non-empty, valid Unicode. `truncate` keeps the last tokens."""
    tokenizer = store.tokenizer
    if prompt.messages is not None:
        ids = _chat_ids(prompt.messages, store, settings)
    else:
        ids = tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    if truncate is not None:
        ids = ids[-truncate:]
    if len(ids) > settings.max_input_tokens:
        raise ApiError(
            422,
            f"`inputs` must have at most {settings.max_input_tokens} tokens. Given: {len(ids)}",
            "validation",
            None,
            "inputs",
        )
    return list(ids)


def _chat_ids(
    messages: list[dict[str, str]], store: LoadedStore, settings: ServerSettings
) -> list[int]:
    # The schema bounds each message; their sum is bounded here, before the template and the
    # tokenizer see megabytes.
    max_chars = max_prompt_chars(settings)
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        raise ApiError(
            422,
            f"`messages` must have at most {max_chars} characters in all. Given: {total}",
            "validation",
        )
    tokenizer = store.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(422, "this model has no chat template; send `inputs`", "validation")
    # Control tokens a client writes inside a message (`<|im_end|>\n<|im_start|>system`) are
    # text, not turns: each is swapped for a marker before the template renders, and
    # tokenised as plain text where the marker lands. Contents without any are untouched.
    hidden: list[str] = []
    pattern = _control_tokens(tokenizer)

    def hide(match: re.Match[str]) -> str:
        hidden.append(match.group(0))
        return f"{_MARK_OPEN}{len(hidden) - 1}{_MARK_CLOSE}"

    safe = [{**m, "content": pattern.sub(hide, m["content"])} for m in messages]
    try:
        text = tokenizer.apply_chat_template(safe, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja errors for roles or orders the template rejects
        raise ApiError(422, f"`messages` could not be rendered: {exc}", "validation") from None
    pieces = re.split(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}", text)
    ids: list[int] = []
    for i, piece in enumerate(pieces):  # template text, then a hidden token, then text, ...
        if i % 2 == 0:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        else:
            hidden_text = hidden[int(piece)]
            as_text = tokenizer(hidden_text, add_special_tokens=False, split_special_tokens=True)
            ids += as_text["input_ids"]
    return ids


_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
"""Private-use characters around the index of a hidden control token."""


@functools.lru_cache(maxsize=4)  # one store's tokenizer per server: built once, not per chat
def _control_tokens(tokenizer: Any) -> re.Pattern[str]:
    """The tokenizer's special tokens (<|im_start|>, <|im_end|>, <|endoftext|>, ...) and the
    marker characters themselves, as one pattern, longest first."""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials |= set(tokenizer.all_special_tokens) | {_MARK_OPEN, _MARK_CLOSE}
    return re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))


def build_request(
    prompt: Prompt, options: Options, store: LoadedStore, settings: ServerSettings
) -> GenerationRequest:
    """The engine's request for schema-valid options; ApiError (422) for what needs the store."""
    steering, defaults = options.steering, store.checked.manifest.defaults
    given = steering.preference if steering.preference is not None else defaults.preference
    mu = preference_of(given, store.objectives)
    guidance = steering.guidance
    mode = (guidance.mode if guidance and guidance.mode else None) or defaults.guidance_mode
    if mode not in available_modes(store):
        raise ApiError(
            422,
            f"guidance mode {mode!r} is not available in this store; "
            f"available: {available_modes(store)}",
            "validation",
            None,
            "guidance",
        )
    named = guidance.gamma if guidance else None
    gamma = named if named is not None else defaults.gamma_for(mode)  # tuned per mode
    merge_method = steering.merge_method or "bone-soup"
    if merge_method == "ric":
        prompt = ric_prompt(prompt, mu, store)
    grammar = compile_grammar(options.grammar, store)
    ids = tokenize_prompt(prompt, store, settings, options.truncate)
    max_new = options.max_new_tokens or min(defaults.max_new_tokens, settings.max_new_tokens)
    context = getattr(store.model.config, "max_position_embeddings", None)
    if context and len(ids) + max_new > context:
        raise ApiError(
            422,
            f"`inputs` tokens + `max_new_tokens` must be <= {context}. "
            f"Given: {len(ids)} `inputs` tokens and {max_new} `max_new_tokens`",
            "validation",
            None,
            "max_new_tokens",
        )
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        prompt_ids=tuple(ids),
        preference=mu,
        mode=mode,
        gamma=float(gamma),
        sampling=_sampling(options, defaults),
        max_new_tokens=max_new,
        stop=options.stop,
        deadline=time.monotonic() + settings.request_timeout_s,
        merge_method=merge_method,
        prompt_logprobs=options.prompt_logprobs,
        grammar=grammar,
    )


def compile_grammar(spec: GrammarSpec | None, store: LoadedStore) -> Grammar | None:
    """The request's grammar compiled for the store's tokenizer (cached by its text), or a
    422 naming the problem: an invalid or unsupported schema or regex never reaches the
    engine."""
    if spec is None:
        return None
    vocab = store.model.get_output_embeddings().weight.shape[0]  # the mask's width
    cache = grammar_cache(store.tokenizer, vocab, tuple(sorted(store.eos_ids)))
    try:
        return cache.compile(spec)
    except GrammarError as exc:
        what = "regex" if spec.kind == "regex" else "JSON schema"
        message = f"`{spec.field}` is not a usable {what}: {exc}"
        raise ApiError(422, message, "validation", None, spec.field) from None


def ric_prompt(prompt: Prompt, mu: torch.Tensor, store: LoadedStore) -> Prompt:
    """The prompt a Rewards-in-Context policy answers for mu: RiC's reward tags (the desired
    rewards RiC maps mu to, objectives/ric.py) after the text, or after the last user message
    (where RiC's own prompts carry them, just before the assistant turn)."""
    spec = store.checked.manifest.baselines.ric
    if spec is None:
        raise ApiError(
            422,
            "merge_method 'ric' needs a Rewards-in-Context adapter, and this store has none "
            "(manifest baselines.ric; `mage train ric` makes one)",
            "validation",
            None,
            "merge_method",
        )
    weights = mu.tolist()
    if prompt.messages is None:
        return Prompt(text=preference_prompt(prompt.text or "", weights, *_ric_range(spec)))
    messages = [dict(m) for m in prompt.messages]
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ApiError(422, "merge_method 'ric' needs a user message to tag", "validation")
    last = messages[users[-1]]
    last["content"] = preference_prompt(last["content"], weights, *_ric_range(spec))
    return Prompt(messages=messages)


def _ric_range(spec: Any) -> tuple[list[float], list[float]]:
    return list(spec.reward_low), list(spec.reward_high)


def preference_of(
    given: Sequence[float] | Mapping[str, float] | None, objectives: list[str]
) -> torch.Tensor:
    """mu on the simplex from a schema-valid `preference` (None: equal weights), or a 422
    naming the problem: the one check of every route that takes a preference."""
    try:
        return normalise_preference(
            given if given is not None else [1.0] * len(objectives), objectives
        )
    except PreferenceError as exc:
        raise ApiError(422, str(exc), "validation", None, "preference") from None


def _sampling(o: Options, defaults: Any) -> SamplingParams:
    # The shared fields go to the engine by name: one added to SamplingOptions reaches
    # SamplingParams, or fails here at once if the engine has no such setting.
    given = o.sampling.model_dump(exclude_none=True)  # None: the engine's default
    if o.do_sample or any(name in given for name in SAMPLING_FILTERS):
        given.setdefault("temperature", 1.0)
    elif defaults.temperature:  # greedy unless the store samples by default
        given |= {"temperature": defaults.temperature, "top_k": defaults.top_k}
        given |= {"top_p": defaults.top_p}
    return SamplingParams(**given, top_n=o.top_n)
