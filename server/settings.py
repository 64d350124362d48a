"""Server settings: CLI flags and MAGE_* environment variables (pydantic-settings)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAGE_", extra="ignore")

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
    max_running: int = Field(default=4, ge=1)
    """Requests decoded concurrently (interleaved step by step)."""
    max_new_tokens: int = Field(default=512, ge=1)
    """Largest `max_new_tokens` a request may ask for."""
    max_input_tokens: int = Field(default=2048, ge=1)
    """Longest prompt, in tokens, after the chat template."""
    max_stop_sequences: int = Field(default=4, ge=0)
    """Most stop sequences per request."""
    request_timeout_s: float = Field(default=300.0, gt=0)
    """Deadline of each request, from arrival; past it generation stops with an error."""
    merge_cache_mb: float = Field(default=256.0, ge=0)
    """Byte budget of the per-preference merge cache."""
    log_level: str = "info"
    """uvicorn log level."""
