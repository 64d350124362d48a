"""OpenAI-compatible request and response bodies (/v1/chat/completions, /v1/completions,
/v1/models), validated as strictly as the TGI ones and with the same field types.

Fields follow OpenAI's API reference. Those the server cannot honour are typed so that only
their neutral value validates (penalties 0, logit_bias 0, no tools, text responses), which
/openapi.json says; server.errors names such a field as unsupported. The preference and
guidance ride as extra fields (`preference`, `guidance`, `merge_method`, from
server.schemas.Steering), the way vLLM takes its own sampling extras: with the `openai`
client, `extra_body={"preference": {...}}`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from server.schemas import (
    _STRICT,
    TEMPERATURE_MAX,
    JsonSchema,
    OnlyOne,
    SamplingOptions,
    Steering,
    StopText,
    Text,
    TopN,
    ZeroPenalty,
    bounded_int,
    limits,
)
from server.settings import ServerSettings

N_MAX = 8
"""Most choices per prompt (`n`), and most prompts per completion request: each choice is
one engine request, and all of them decode in the same batched forward (up to N_MAX**2 per
completion; past the queue's room the request gets 429 as a whole)."""
NAME_MAX = 256
"""Longest `model` or `user` string."""
LOGIT_BIAS_MAX = 300
"""Most `logit_bias` entries (OpenAI's own limit); every bias must be 0."""
TOKEN_KEY_MAX = 20
"""Longest `logit_bias` key (a token id as a string)."""
CHAT_ROLES = ("system", "user", "assistant", "developer")
"""Roles accepted in OpenAI `messages` (developer is read as system)."""


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = None
    """Send a last chunk, before [DONE], with `usage` and no choices."""
    include_obfuscation: bool | None = None
    """Accepted and ignored (this server pads no chunks)."""


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    """Only text parts (no images or audio)."""
    text: Text
    """The text."""


class TextFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    """Free text (the default)."""


class JsonObjectFormat(BaseModel):
    model_config = _STRICT
    type: Literal["json_object"]
    """JSON mode: the output is one JSON object."""


class JsonSchemaSpec(BaseModel):
    model_config = _STRICT
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    """The format's name (OpenAI's rule: letters, digits, _ and -, at most 64)."""
    description: Annotated[str, Field(max_length=NAME_MAX * 16)] | None = None
    """Accepted and ignored (it steers OpenAI's models, not the grammar)."""
    schema_: JsonSchema = Field(alias="schema")
    """The JSON schema the output must be valid against."""
    strict: bool | None = None
    """Accepted; the schema is enforced either way (every token is masked to it)."""


class JsonSchemaFormat(BaseModel):
    model_config = _STRICT
    type: Literal["json_schema"]
    """Structured output: JSON valid against `json_schema.schema`."""
    json_schema: JsonSchemaSpec
    """The schema and its name."""


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]
"""OpenAI's `response_format`: text, json_object or json_schema."""


def openai_body_types(settings: ServerSettings) -> tuple[Any, Any]:
    """(chat body, completion body) with this server's limits."""
    bounded = limits(settings)  # the same types as the TGI body's
    MaxTokens, Prompt = bounded.max_new_tokens, bounded.prompt  # noqa: N806 (types)

    class ChatMessage(BaseModel):
        model_config = _STRICT
        role: Literal[CHAT_ROLES]  # type: ignore[valid-type]
        """system, user, assistant, or developer (read as system)."""
        content: bounded.content | Annotated[list[TextPart], Field(min_length=1)]
        """Text, or one or more text parts (joined)."""
        name: Annotated[str, Field(max_length=NAME_MAX)] | None = None
        """Accepted and ignored (the chat template has no names)."""
        tool_calls: Annotated[list[Any], Field(max_length=0)] | None = None
        """Accepted empty or null only (no tools)."""

    class Common(Steering, SamplingOptions):
        """top_k, typical_p and repetition_penalty are extras (as vLLM takes them); `seed`
        is choice 0's, choice i samples with seed + i."""

        model_config = _STRICT
        model: Annotated[str, Field(max_length=NAME_MAX)] | None = None
        """Any name: the server serves one model, its store (GET /v1/models)."""
        max_tokens: MaxTokens | None = None
        """Tokens to generate at most per choice; omitted: the store's default."""
        temperature: (
            Annotated[float, Field(ge=0, le=TEMPERATURE_MAX, allow_inf_nan=False)] | None
        ) = None
        """Sampling temperature; below 0.01 (0 included) greedy; omitted: the store's
        default (greedy, the paper's choice)."""
        stop: StopText | bounded.stops | None = None
        """Stop sequences; left out of the returned text, as OpenAI does."""
        n: bounded_int(ge=1, le=N_MAX) | None = None
        """Choices to generate (each with its own seed when sampling)."""
        stream: bool | None = None
        """Stream `data: {chunk}` events, ending with `data: [DONE]`."""
        stream_options: StreamOptions | None = None
        """Streaming options."""
        presence_penalty: ZeroPenalty | None = None
        """Accepted at 0 only."""
        frequency_penalty: ZeroPenalty | None = None
        """Accepted at 0 only."""
        logit_bias: (
            Annotated[
                dict[Annotated[str, Field(max_length=TOKEN_KEY_MAX)], ZeroPenalty],
                Field(max_length=LOGIT_BIAS_MAX),
            ]
            | None
        ) = None
        """Accepted when every bias is 0 (which changes nothing), empty or null."""
        user: Annotated[str, Field(max_length=NAME_MAX)] | None = None
        """Accepted and ignored."""
        response_format: ResponseFormat | None = None
        """Structured output: {"type": "json_object"}, or {"type": "json_schema",
        "json_schema": {"name", "schema", "strict"}}; {"type": "text"} is free text."""

    class ChatCompletionBody(Common):
        model_config = ConfigDict(
            **_STRICT,
            json_schema_extra={
                "examples": [
                    {
                        "messages": [{"role": "user", "content": "My flight was cancelled."}],
                        "preference": {"answer-relevance": 0.3, "positivity": 0.7},
                    }
                ]
            },
        )
        messages: list[ChatMessage] = Field(min_length=1)
        """The chat, rendered with the tokenizer's chat template."""
        max_completion_tokens: MaxTokens | None = None
        """Like max_tokens (and wins over it)."""
        logprobs: bool | None = None
        """Return each generated token's log-probability (guided distribution)."""
        top_logprobs: TopN | None = None
        """With logprobs: the n most likely tokens at each step (without `logprobs: true`
        a 422, where OpenAI and vLLM refuse it too)."""
        tools: Annotated[list[Any], Field(max_length=0)] | None = None
        """Accepted empty or null only (no tool calling)."""
        tool_choice: Literal["none", "auto"] | None = None
        """Accepted as none or auto (there are no tools to call)."""
        tool_prompt: Annotated[str, Field(max_length=bounded.max_chars)] | None = None
        """TGI's extra, sent by InferenceClient; ignored (no tools)."""
        parallel_tool_calls: bool | None = None
        """Accepted and ignored (no tools)."""

        @field_validator("top_logprobs")
        @classmethod
        def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
            if value is not None and not info.data.get("logprobs"):
                message = "`top_logprobs` needs `logprobs`: true"
                raise PydanticCustomError("body_shape", message)
            return value

    class CompletionBody(Common):
        model_config = ConfigDict(
            **_STRICT,
            json_schema_extra={
                "examples": [
                    {"prompt": "The best way to learn a language is", "preference": [1, 0]}
                ]
            },
        )
        prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=N_MAX)]
        """Raw text (no template), or several: choices are numbered prompt by prompt."""
        logprobs: TopN | None = None
        """Return log-probabilities, with this many alternatives per token."""
        echo: bool | None = None
        """Prepend the prompt to the returned text."""
        best_of: OnlyOne | None = None
        """Accepted at 1 only."""
        suffix: None = None
        """Accepted as null only (no insertion)."""

    return ChatCompletionBody, CompletionBody


# --- responses (documentation: what /openapi.json says the routes answer) -------------------


class _Open(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)


class MageExtension(_Open):
    """This server's extra field on every answer: what the preference became."""

    preference: list[float]
    """mu used, normalised onto the simplex, in objective order."""
    lambda_: list[float] = Field(alias="lambda")
    """lambda = B^-1 mu (or mu for the other merge methods), before alpha."""
    guidance: dict[str, Any]
    """{mode, gamma} used."""
    merge_method: str
    """bone-soup, rewarded-soup or direct."""
    merge_cache_hit: bool
    """Whether the plan for this preference came from the merge cache."""
    preferences: list[dict[str, Any]]
    """Each preference the answer was decoded under, {from_token, preference, lambda}: one,
    unless POST /v1/requests/{id}/preference changed it while it ran (`preference` and
    `lambda` above are the last one's)."""


class PromptTokensDetails(_Open):
    """What the prompt tokens were made of."""

    cached_tokens: int
    """Prompt tokens whose KV came from the prefix cache, summed over prompts (for a prompt
    with several choices, the fewest any of them reused)."""


class Usage(_Open):
    """Token counts."""

    prompt_tokens: int
    """Prompt tokens (after the chat template), summed over prompts."""
    completion_tokens: int
    """Generated tokens, summed over choices."""
    total_tokens: int
    """Their sum."""
    prompt_tokens_details: PromptTokensDetails | None = None
    """Of the prompt tokens, those served from the prefix cache."""


class _Answer(_Open):
    """What chat and text completions share."""

    id: str
    """chatcmpl-... or cmpl-..."""
    created: int
    """Unix seconds."""
    model: str
    """The store's name."""
    system_fingerprint: str
    """mage-<version>."""
    usage: Usage
    """Token counts."""
    mage: MageExtension
    """Preference, lambda and guidance used."""


class ChatCompletion(_Answer):
    """A chat completion (non-streaming)."""

    object: Literal["chat.completion"]
    """Always chat.completion."""
    choices: list[dict[str, Any]]
    """{index, message: {role, content}, logprobs, finish_reason: stop | length}."""


class Completion(_Answer):
    """A text completion (non-streaming)."""

    object: Literal["text_completion"]
    """Always text_completion."""
    choices: list[dict[str, Any]]
    """{index, text, logprobs, finish_reason: stop | length}."""


class ModelCard(_Open):
    """The served store, as an OpenAI model."""

    id: str
    """The store's name."""
    object: Literal["model"]
    """Always model."""
    created: int
    """When the server started (Unix seconds)."""
    owned_by: str
    """Always mage."""


class ModelList(_Open):
    """GET /v1/models."""

    object: Literal["list"]
    """Always list."""
    data: list[ModelCard]
    """The one model."""


class OpenAIErrorDetail(_Open):
    """OpenAI's error object."""

    message: str
    """What went wrong, for people."""
    type: str
    """invalid_request_error (4xx), authentication_error (401), rate_limit_error (429),
    server_error (5xx)."""
    param: str | None
    """The request field at fault, when one is."""
    code: str
    """This server's error_type: validation, unauthorized, overloaded, ..."""


class OpenAIErrorBody(_Open):
    """Every error on a /v1 route."""

    error: OpenAIErrorDetail
    """The error."""
