"""Server settings: CLI flags and MAGE_* environment variables (pydantic-settings)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _comma_list(value: Any) -> Any:
    """'a,b' (environment) or ['a,b', 'c'] (repeated flags) -> ['a', 'b', 'c']."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        return [
            part.strip()
            for item in value
            for part in (item.split(",") if isinstance(item, str) else [item])
            if not isinstance(part, str) or part.strip()
        ]
    return value


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MAGE_", extra="ignore", use_attribute_docstrings=True
    )

    store: str = ""
    """Path of the model store to serve (folder with mage_store.json)."""
    host: str = "127.0.0.1"
    """Interface to listen on; 0.0.0.0 in containers."""
    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port."""
    device: str = "auto"
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; 'auto' is bfloat16 on CUDA and float32 on CPU."""
    max_queue: int = Field(default=64, ge=1)
    """Requests waiting for the engine beyond which new ones get 429 at once."""
    max_running: int = Field(default=16, ge=1)
    """Requests prefilling or decoding at once, all in one batched forward per step."""
    kv_cache_mb: float | None = Field(default=None, gt=0)
    """KV-cache budget of the batch in MiB; admission waits while a new request would
    exceed it. None: 2048 on CPU, half the free GPU memory after loading on CUDA."""
    prefill_tokens: int = Field(default=512, ge=1)
    """Prompt tokens (times the rows each runs) prefilled per engine step; longer prompts
    are prefilled in chunks so running streams keep their pace (chunked prefill)."""
    engine_stall_timeout_s: float = Field(default=120.0, gt=0)
    """With work waiting, an engine that completes no step for this long is reported
    unhealthy (/health and /ready answer 503, so Kubernetes restarts the pod)."""
    max_new_tokens: int = Field(default=512, ge=1)
    """Largest `max_new_tokens` a request may ask for."""
    max_input_tokens: int = Field(default=2048, ge=1)
    """Longest prompt, in tokens, after the chat template."""
    max_stop_sequences: int = Field(default=4, ge=0)
    """Most stop sequences per request."""
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    """Largest request body in bytes; a larger one gets 413 before it is read."""
    request_timeout_s: float = Field(default=300.0, gt=0)
    """Deadline of each request, from arrival; past it generation stops with an error."""
    header_timeout_s: float = Field(default=10.0, gt=0)
    """A connection whose request line and headers are not all in this long after it opened
    (or after its previous answer) gets 408 and is closed: slow-header clients (slowloris)
    cannot hold connections open."""
    max_header_bytes: int = Field(default=16384, ge=1024)
    """Largest request line plus headers in bytes; a larger one gets 400."""
    merge_cache_mb: float = Field(default=256.0, ge=0)
    """Byte budget of the per-preference merge cache."""
    prefix_cache_mb: float = Field(default=1024.0, ge=0)
    """Budget in MiB of the prefix cache: the KV of prompts already prefilled, per
    preference, reused by later prompts that start with them (a chat's history), on the
    model's device; least recently used blocks are evicted first. 0 turns it off."""
    api_key: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """API keys; when any is set, every route but /health, /ready and /metrics needs
    `Authorization: Bearer <key>`. Comma-separated in the environment; repeat the flag."""
    metrics_require_key: bool = False
    """Also require an API key on /metrics (off: Prometheus scrapes without one)."""
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Origins allowed by CORS (e.g. https://app.example.com, or *); none: CORS off."""
    log_level: str = "info"
    """uvicorn log level."""

    @field_validator("api_key", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        return _comma_list(value)
