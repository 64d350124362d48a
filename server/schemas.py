"""Request and response bodies (TGI / LoRAX conventions), validated strictly at the edge.

Every limit a body can break without knowing the store lives here, in the schema, so that
`/openapi.json` says what the server accepts: a body valid against it only gets a 422 for
reasons that need the store (preference length or names, prompt too long in tokens, a mode
the store lacks). Types are strict: `true` is not a number and `"4"` is not an integer
(a JSON integer is still a fine float, and 4.0 a fine integer). The models depend on
server settings (the `max_new_tokens` and stop-sequence limits), so `request_body_type`
builds them per app. The field types and the steering fields (preference, guidance, merge
method) are shared with the OpenAI-compatible bodies (server.openai_schemas).

Every parameter TGI documents is accepted. Those the server cannot honour are typed so that
only their neutral value validates (`best_of` 1, `watermark` false, `frequency_penalty` 0):
the schema says exactly what is accepted, and server.errors names the field as unsupported
when another value comes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
)
from pydantic_core import PydanticCustomError

from guidance.constrain import GRAMMAR_MAX_CHARS
from merging.registry import MERGE_METHODS
from model_store.manifest import GuidanceMode
from server.settings import ServerSettings

GAMMA_MAX = 100.0
"""Largest guidance scale: gamma * V beyond this only saturates the distribution."""
TEMPERATURE_MIN, TEMPERATURE_MAX = 0.01, 100.0
"""Temperature range: below 0.01 sampling is greedy in all but name and divides scores
towards overflow; above 100 it is uniform noise."""
TOP_K_MAX = 1_000_000
"""Largest top_k (values above the vocabulary size keep every token)."""
SEED_LIMIT = 2**64
"""Seeds are below this: torch.Generator.manual_seed takes an unsigned 64-bit seed. An
exclusive bound since 2**64, unlike 2**64 - 1, is also exact for tools that read
/openapi.json's bounds as floats."""
STOP_MAX_CHARS = 256
"""Longest stop sequence: each is searched for in the text after every token."""
CHARS_PER_TOKEN_BOUND = 32
"""A prompt longer than max_input_tokens * this many characters is refused before it is
tokenised (tokenising megabytes takes seconds); tokenizers merge far fewer characters
into one token in real text."""
ROLES = ("system", "user", "assistant")
"""Chat roles accepted in `messages`."""
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 0.01, 100.0
"""Repetition penalty range (1 is none): beyond these the penalised scores only saturate."""
TOP_N_MAX = 20
"""Most alternatives per generated token (top_n_tokens; OpenAI's top_logprobs allows 20)."""
ADAPTER_ID_PATTERN = r"^[^,=]+(=[^,=]+)?(,[^,=]+(=[^,=]+)?)*$"
"""`adapter_id` as a preference: comma-separated weights, or name=value pairs (objectives,
mode, gamma, merge_method); server.translate reads it."""

_STRICT = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


class ApiError(Exception):
    """An error answered as {"error": message, "error_type": kind} with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.headers = headers
        self.param = param
        """The request field at fault, when one is (OpenAI's error `param`)."""


def _valid_unicode(text: str) -> str:
    """JSON escapes can spell lone surrogates (\\ud800), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "invalid_unicode",
            "must be valid Unicode text (lone surrogate at character {index})",
            {"index": exc.start},
        ) from None
    return text


def _integral(value: Any) -> Any:
    """4.0 is the integer 4 in JSON (and in JSON Schema's `integer`); 4.5, "4" and true
    still fail the strict int check after this."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def bounded_int(**bounds: int) -> Any:
    """A strict int within `bounds` (ge, le, lt) that also takes integral floats. The
    bounds come first so that the JSON schema shows them as minimum/maximum."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


Text = Annotated[str, AfterValidator(_valid_unicode)]
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Temperature = Annotated[float, Field(ge=TEMPERATURE_MIN, le=TEMPERATURE_MAX, allow_inf_nan=False)]
TopK = bounded_int(ge=1, le=TOP_K_MAX)
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
TypicalP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
RepetitionPenalty = Annotated[
    float, Field(ge=REPETITION_PENALTY_MIN, le=REPETITION_PENALTY_MAX, allow_inf_nan=False)
]
Seed = bounded_int(ge=0, lt=SEED_LIMIT)
TopN = bounded_int(ge=0, le=TOP_N_MAX)
ZeroPenalty = Annotated[float, Field(ge=0, le=0)]
"""frequency/presence penalties: accepted at their neutral 0 only (not implemented)."""
OnlyOne = bounded_int(ge=1, le=1)
"""best_of: accepted at its neutral 1 only."""
StopText = Annotated[Text, Field(min_length=1, max_length=STOP_MAX_CHARS)]


def _preference_shape(value: Any) -> str | None:
    if isinstance(value, list):
        return "weights"
    return "by_objective" if isinstance(value, dict) else None


Preference = Annotated[
    Annotated[list[Weight], Tag("weights")] | Annotated[dict[str, Weight], Tag("by_objective")],
    Discriminator(
        _preference_shape,
        custom_error_type="preference_shape",
        custom_error_message="must be a list of weights or an {objective: weight} object",
    ),
]
MergeMethod = Literal[tuple(MERGE_METHODS)]  # type: ignore[valid-type]


class GuidanceParameters(BaseModel):
    model_config = _STRICT
    mode: GuidanceMode | None = None
    """Guidance mode; omitted: the store's default. /info lists the store's modes."""
    gamma: Annotated[float, Field(ge=0, le=GAMMA_MAX, allow_inf_nan=False)] | None = None
    """Guidance scale gamma of Eq. (25); omitted: the store's tuned gamma for the mode
    (defaults.gamma_by_mode), else its default gamma."""


JsonSchema = dict[str, Any]
"""A JSON schema (structured output); guidance.constrain compiles it, and refuses what it
cannot enforce with a 422 naming the problem."""
RegexText = Annotated[Text, Field(min_length=1, max_length=GRAMMAR_MAX_CHARS)]


class JsonGrammar(BaseModel):
    model_config = _STRICT
    type: Literal["json"]
    """The output is JSON valid against `value`."""
    value: JsonSchema | Annotated[Text, Field(max_length=GRAMMAR_MAX_CHARS)]
    """The JSON schema, as an object or as JSON text."""


class RegexGrammar(BaseModel):
    model_config = _STRICT
    type: Literal["regex"]
    """The whole output matches `value`."""
    value: RegexText
    """A regular expression (Rust `regex` syntax; no lookaround or backreferences)."""


GrammarParameter = Annotated[JsonGrammar | RegexGrammar, Field(discriminator="type")]
"""TGI's `grammar`: {"type": "json" | "regex", "value": ...}."""


class Steering(BaseModel):
    """What only this server has: the preference and how it steers. Shared by the TGI
    `parameters` and the OpenAI bodies (as extra fields, like vLLM's sampling extras)."""

    model_config = _STRICT
    preference: Preference | None = None
    """mu: weights in objective order, or {objective: weight} (missing names weigh 0);
    finite, >= 0, not all zero; normalised onto the simplex. Omitted: the store's."""
    guidance: GuidanceParameters | None = None
    """Guidance mode and scale; omitted ones: the store's."""
    merge_method: MergeMethod | None = None
    """How backbone coefficients come from mu (bone-soup, the default: lambda = B^-1 mu,
    Eq. 13)."""


class SamplingOptions(BaseModel):
    """The sampling fields every route takes, declared once: TGI's `parameters` and the
    OpenAI bodies inherit them (the OpenAI bodies re-type `temperature` only, since OpenAI
    allows 0 for greedy), and server.translate.Options carries them to the engine's
    SamplingParams. None: not given (the store's defaults, greedy)."""

    model_config = _STRICT
    temperature: Temperature | None = None
    """Sampling temperature; turns sampling on."""
    top_k: TopK | None = None
    """Keep the k most likely tokens when sampling; turns sampling on."""
    top_p: TopP | None = None
    """Nucleus filter: keep the most likely tokens holding this much probability; turns
    sampling on."""
    typical_p: TypicalP | None = None
    """Typical decoding mass (transformers' TypicalLogitsWarper); turns sampling on."""
    repetition_penalty: RepetitionPenalty | None = None
    """Penalise tokens already in the prompt or output (1: none), after guidance."""
    seed: Seed | None = None
    """Seed of the request's sampler, for reproducible sampling."""


SAMPLING_FIELDS = tuple(SamplingOptions.model_fields)
"""Names of the shared sampling fields."""
SAMPLING_FILTERS = ("temperature", "top_k", "top_p", "typical_p")
"""The sampling fields whose presence turns sampling on (the rest apply greedy too)."""


@dataclass(frozen=True)
class Limits:
    """The field types whose bounds come from server settings, built once per app and used
    by the TGI and the OpenAI bodies alike: `max_new_tokens` and `max_tokens`, the two
    `stop` lists and the two prompt texts cannot drift apart."""

    max_chars: int
    """Most characters in a prompt or message (max_input_tokens * CHARS_PER_TOKEN_BOUND)."""
    max_new_tokens: Any
    """Tokens to generate: 1 to the server's max_new_tokens."""
    stops: Any
    """A list of stop sequences, at most the server's max_stop_sequences."""
    prompt: Any
    """Raw prompt text: non-empty, at most max_chars."""
    content: Any
    """A chat message's text: at most max_chars."""


def max_prompt_chars(settings: ServerSettings) -> int:
    """Most characters in a prompt, or in a chat's messages together."""
    return settings.max_input_tokens * CHARS_PER_TOKEN_BOUND


def limits(settings: ServerSettings) -> Limits:
    """The settings-bounded field types of `settings`."""
    max_chars = max_prompt_chars(settings)
    return Limits(
        max_chars=max_chars,
        max_new_tokens=bounded_int(ge=1, le=settings.max_new_tokens),
        stops=Annotated[list[StopText], Field(max_length=settings.max_stop_sequences)],
        prompt=Annotated[Text, Field(min_length=1, max_length=max_chars)],
        content=Annotated[Text, Field(max_length=max_chars)],
    )


class GenerateResponse(BaseModel):
    """What /generate answers (the last stream event carries the same two fields)."""

    model_config = ConfigDict(use_attribute_docstrings=True)
    generated_text: str
    """The generated text (without an EOS token, with a stop sequence)."""
    details: dict[str, Any] | None = None
    """TGI's details (finish_reason: length, eos_token or stop_sequence; generated_tokens,
    seed, prefill, tokens, top_tokens) and this server's: prompt_tokens, preference (mu),
    lambda, preferences (each mu with the token it took effect from), guidance {mode,
    gamma}, merge_cache_hit, cached_tokens (prompt tokens whose KV came from the prefix
    cache). Left out when `details` is false."""


class ErrorBody(BaseModel):
    """Every error the server answers, whatever the route."""

    model_config = ConfigDict(use_attribute_docstrings=True)
    error: str
    """What went wrong, for people."""
    error_type: str
    """For programs: validation, unauthorized, payload_too_large, not_found,
    method_not_allowed, conflict, overloaded, unavailable, timeout, generation, internal."""


def request_body_type(settings: ServerSettings) -> Any:
    """The /generate body: text (`inputs`) xor chat (`messages`), with these limits."""
    bounded = limits(settings)

    class Message(BaseModel):
        model_config = _STRICT
        role: Literal[ROLES]  # type: ignore[valid-type]
        """Who speaks: system, user or assistant."""
        content: bounded.content
        """What they say."""

    class Parameters(Steering, SamplingOptions):
        model_config = _STRICT
        max_new_tokens: bounded.max_new_tokens | None = None
        """Tokens to generate at most (also bounded by the model's context)."""
        do_sample: bool = False
        """Sample instead of greedy; implied by temperature, top_k, top_p or typical_p."""
        stop: bounded.stops = Field(default_factory=list)
        """Stop sequences: the output ends after the first one appears."""
        details: bool = True
        """Return `details` (TGI's fields and this server's preference, lambda, ...)."""
        decoder_input_details: bool = False
        """Add `details.prefill`: each prompt token with the policy's log-probability given
        its prefix (unguided; the first token has none)."""
        top_n_tokens: TopN | None = None
        """Return the n most likely tokens at each step (`top_tokens`)."""
        return_full_text: bool | None = None
        """Prepend the prompt to `generated_text` (default false)."""
        truncate: bounded_int(ge=1, le=settings.max_input_tokens) | None = None
        """Keep only the last `truncate` prompt tokens."""
        adapter_id: Annotated[str, Field(max_length=1024, pattern=ADAPTER_ID_PATTERN)] | None = None
        """The preference for clients that cannot send `preference` (LoRAX's adapter
        field): "0.3,0.7" or "relevance=0.3,positivity=0.7", optionally with mode=,
        gamma= and merge_method= entries. `preference`/`guidance`/`merge_method` win."""
        best_of: OnlyOne | None = None
        """Accepted for TGI compatibility at 1 only."""
        watermark: Literal[False] = False
        """Accepted for TGI compatibility at false only."""
        grammar: GrammarParameter | None = None
        """Structured output: {"type": "json", "value": schema} or {"type": "regex",
        "value": pattern}; the output is constrained to it token by token."""
        frequency_penalty: ZeroPenalty | None = None
        """Accepted for TGI compatibility at 0 only."""

    class TextBody(BaseModel):
        model_config = ConfigDict(
            **_STRICT,
            json_schema_extra={
                "examples": [
                    {
                        "inputs": "The best way to learn a language is",
                        "parameters": {"temperature": 0.8, "seed": 1},
                    }
                ]
            },
        )
        inputs: bounded.prompt
        """Raw prompt text (no chat template applied)."""
        parameters: Parameters = Field(default_factory=Parameters)
        """Generation parameters; omitted ones take the store's defaults."""
        stream: bool = False
        """On `POST /` (TGI's compat route): stream server-sent events instead of one JSON
        answer. /generate and /generate_stream decide by their route and ignore it."""

    class ChatBody(BaseModel):
        model_config = ConfigDict(
            **_STRICT,
            json_schema_extra={
                "examples": [
                    {
                        "messages": [{"role": "user", "content": "My flight was cancelled."}],
                        "parameters": {"guidance": {"gamma": 1.0}},
                    }
                ]
            },
        )
        messages: list[Message] = Field(min_length=1)
        """Chat messages, rendered with the tokenizer's chat template."""
        parameters: Parameters = Field(default_factory=Parameters)
        """Generation parameters; omitted ones take the store's defaults."""
        stream: bool = False
        """On `POST /`: stream server-sent events instead of one JSON answer."""

    return Annotated[
        Annotated[TextBody, Tag("text")] | Annotated[ChatBody, Tag("chat")],
        Discriminator(
            _body_shape,
            custom_error_type="body_shape",
            custom_error_message="give exactly one of `inputs` or `messages` (a JSON object)",
        ),
    ]


def _body_shape(value: Any) -> str | None:
    if not isinstance(value, dict) or ("inputs" in value) == ("messages" in value):
        return None
    return "text" if "inputs" in value else "chat"
