"""OpenAI answers built from engine events: each choice's text (stop sequences cut out, as
OpenAI does), log-probabilities and finish reason; the reply around them (ids, usage,
chunks) and this server's `mage` extension."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from guidance.requests import Event, TokenEvent
from server.relay import Submitted, package_version


def finish_reason(details: dict[str, Any]) -> str:
    """OpenAI's finish_reason: `length`, or `stop` (an EOS token or a stop sequence)."""
    return "length" if details["finish_reason"] == "length" else "stop"


class StopFilter:
    """Streamed text with stop sequences cut out: text that could begin a stop sequence is
    held back until it cannot, and nothing from the first stop sequence on is let through."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.pending, self.stopped = stops, "", False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending, self.stopped = self.pending[: min(found)], "", True
            return out
        cut = len(self.pending) - max((_overlap(self.pending, s) for s in self.stops), default=0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0


@dataclass
class Choice:
    """The state of one choice while its events arrive."""

    index: int
    submitted: Submitted
    stops: tuple[str, ...]
    chat: bool
    prefix: str = ""
    """Echoed prompt (completions with echo), sent before the first token."""
    logprobs: bool = False
    """Whether log-probabilities were asked for."""
    prompt_key: int = 0
    """Which prompt this choice continues (usage counts each prompt once)."""
    token_text: Callable[[int], str] = str
    """A token's own text, for log-probability entries (a streamed token's text is only
    what it adds to the decoded output, empty while a character is incomplete)."""
    text: str = ""
    """The text so far (echo included), stop sequences cut out."""
    entries: list[dict] = field(default_factory=list)
    """Log-probability entries so far, OpenAI's chat shape."""
    details: dict[str, Any] | None = None
    """The engine's details, once the last event came."""

    def __post_init__(self) -> None:
        self.filter = StopFilter(self.stops)
        self.text = self.prefix
        self.opened = self.chat  # completions send the echo with their first piece

    @property
    def prompt_tokens(self) -> int:
        return len(self.submitted.handle.request.prompt_ids)

    @property
    def generated(self) -> int:
        return self.details["generated_tokens"] if self.details else 0

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (guidance.prefix_cache)."""
        return self.details.get("cached_tokens", 0) if self.details else 0

    def add(self, event: TokenEvent) -> dict | None:
        """Take one event; the streamed piece of this choice for it (None: nothing new)."""
        text = "" if event.special else self.filter.push(event.text)
        if event.details is not None:
            text += self.filter.flush()
            self.details = event.details
        entry = self._entry(event) if self.logprobs and not event.special else None
        if entry is not None:
            self.entries.append(entry)
        self.text += text
        offset = len(self.text) - len(text)  # where this token's text starts, echo included
        if not self.opened:
            text, self.opened = self.prefix + text, True
        finish = finish_reason(self.details) if event.details is not None else None
        if not text and entry is None and finish is None:
            return None
        return self._piece(text, [entry] if entry else [], finish, offset)

    def opening(self) -> dict:
        """A chat stream's first piece: the role."""
        return {
            "index": self.index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def whole(self) -> dict:
        """The non-streaming choice."""
        finish = finish_reason(self.details) if self.details else None
        if self.chat:
            return {
                "index": self.index,
                "message": {"role": "assistant", "content": self.text},
                "logprobs": {"content": self.entries} if self.logprobs else None,
                "finish_reason": finish,
            }
        logprobs = _completion_logprobs(self.entries, len(self.prefix)) if self.logprobs else None
        return {
            "index": self.index,
            "text": self.text,
            "logprobs": logprobs,
            "finish_reason": finish,
        }

    def mage(self) -> dict:
        """This server's extension: what the preference became."""
        details = self.details or {}
        return {
            "preference": details.get("preference"),
            "lambda": details.get("lambda"),
            "guidance": details.get("guidance"),
            "merge_method": self.submitted.handle.request.merge_method,
            "merge_cache_hit": details.get("merge_cache_hit"),
            "preferences": details.get("preferences"),
        }

    def _piece(self, text: str, entries: list[dict], finish: str | None, offset: int) -> dict:
        if self.chat:
            return {
                "index": self.index,
                "delta": {"content": text} if text else {},
                "logprobs": {"content": entries} if entries else None,
                "finish_reason": finish,
            }
        logprobs = _completion_logprobs(entries, offset) if entries else None
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def _entry(self, event: TokenEvent) -> dict:
        """OpenAI's chat logprob entry for a token (completions reshape these)."""
        return {
            **_token(self.token_text(event.id), event.logprob),
            "top_logprobs": [_token(t.text, t.logprob) for t in event.top_tokens],
        }


def _token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _completion_logprobs(entries: list[dict], offset: int) -> dict:
    """The legacy completions shape: parallel lists, alternatives as {token: logprob}."""
    offsets, position = [], offset
    for entry in entries:
        offsets.append(position)
        position += len(entry["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


class Reply:
    """The OpenAI answer being built from the choices' events."""

    def __init__(
        self, kind: str, model: str, body: Any, choices: list[Choice], answer_id: str = ""
    ) -> None:
        self.chat = kind == "chat"
        # The answer's id is its X-Request-Id (server.request_ids), when the route has one.
        self.id = answer_id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.object = "chat.completion" if self.chat else "text_completion"
        self.created, self.model, self.body, self.choices = int(time.time()), model, body, choices
        options = body.stream_options
        self.wants_usage = bool(options and options.include_usage)

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        head["system_fingerprint"] = _fingerprint()
        return head

    def whole(self) -> dict[str, Any]:
        """The non-streaming answer."""
        return {
            **self._head(chunk=False),
            "choices": [choice.whole() for choice in self.choices],
            "usage": self.usage(),
            "mage": self.choices[0].mage(),
        }

    def usage(self) -> dict[str, Any]:
        prompts = {c.prompt_key: c.prompt_tokens for c in self.choices}
        prompt = sum(prompts.values())
        completion = sum(c.generated for c in self.choices)
        cached: dict[int, int] = {}  # per prompt, the fewest any of its choices reused
        for c in self.choices:
            cached[c.prompt_key] = min(cached.get(c.prompt_key, c.cached_tokens), c.cached_tokens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(cached.values())},
        }

    def openings(self) -> list[dict]:
        """Chat streams open each choice with the assistant role."""
        if not self.chat:
            return []
        return [self._chunk([choice.opening()]) for choice in self.choices]

    def chunk(self, index: int, event: Event) -> dict | None:
        choice = self.choices[index]
        piece = choice.add(event)
        if piece is None:
            return None
        chunk = self._chunk([piece])
        if event.details is not None:
            chunk["mage"] = choice.mage()
        return chunk

    def _chunk(self, pieces: list[dict]) -> dict:
        chunk = {**self._head(chunk=True), "choices": pieces}
        if self.wants_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self) -> dict:
        return {**self._head(chunk=True), "choices": [], "usage": self.usage()}


def _fingerprint() -> str:
    return f"mage-{package_version()}"
