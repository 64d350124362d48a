"""Structured output: a JSON schema or a regex constrains a sequence's tokens (llguidance).

A request's grammar is compiled once at validation time (server.translate), against the
store's tokenizer, and kept in an LRU cache keyed by its canonical text, so the same schema
sent again costs a dictionary look-up; what is cached is a fresh llguidance matcher, which
each admitted sequence deep-copies into its own Constraint. In the decode step the allowed
tokens of every constrained row are computed together (llguidance's parallel executor) and
applied after guidance, to the scores log pi + gamma V of Eq. (25), and before sampling, so
constrained and free rows of any guidance mode share one batch: a free row's scores are
untouched. The matcher advances with each emitted token; when the grammar can take nothing
more the sequence ends, as if EOS came (TGI's `eos_token`, OpenAI's `stop`).

JSON is compiled without free whitespace between tokens (llguidance's
`whitespace_flexible: false`: `{"a":1,"b":[2,3]}`): with it, a model can spend its whole
budget on blanks inside an object, which vLLM's `disable-any-whitespace` exists to stop.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

GRAMMAR_KINDS = ("json", "regex")
"""What a grammar may be: a JSON schema, or a regular expression (Rust `regex` syntax) the
whole output must match."""
GRAMMAR_MAX_CHARS = 64 * 1024
"""Longest schema (as compact JSON) or regex: compile time grows with the grammar."""
CACHE_ENTRIES = 256
"""Compiled grammars kept per tokenizer, least recently used dropped first."""
JSON_OPTIONS = {"whitespace_flexible": False}
"""llguidance's JSON options (module docstring: no free whitespace)."""
ANY_OBJECT = {"type": "object"}
"""OpenAI's `json_object` response format: any JSON object."""


class GrammarError(ValueError):
    """The schema or regex cannot be compiled (invalid, unsupported, or too large)."""


@dataclass(frozen=True, eq=False)
class GrammarSpec:
    """A grammar as a request gives it, before compilation."""

    kind: str
    """"json" (a JSON schema) or "regex" (GRAMMAR_KINDS)."""
    value: Any
    """json: the schema, as an object (or true / false) or as JSON text; regex: the text."""
    field: str = "grammar"
    """The request field it came from, named in errors (grammar, response_format)."""

    def key(self) -> tuple[str, str]:
        """(kind, source): the schema as compact JSON with sorted keys (equal schemas, one
        entry), or the regex; GrammarError if the schema is not JSON, an object or a bool."""
        if self.kind == "regex" and isinstance(self.value, str):
            return self.kind, self.value
        if self.kind != "json":
            raise GrammarError(f"unknown grammar type {self.kind!r}; use one of {GRAMMAR_KINDS}")
        schema = self.value
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise GrammarError(f"the schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict | bool):
            raise GrammarError("a JSON schema must be an object (or true / false)")
        return self.kind, json.dumps(schema, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled, validated grammar; shared by every request that sends the same one."""

    kind: str
    """json or regex."""
    source: str
    """The canonical text it was compiled from (GrammarSpec.key)."""
    template: llguidance.LLMatcher = field(repr=False)
    """A matcher that never advances: each sequence starts from a deep copy of it."""

    def start(self) -> Constraint:
        """The constraint state of one new sequence."""
        return Constraint(self.template.deep_copy())


@dataclass(eq=False)
class Constraint:
    """One sequence's position in its grammar."""

    matcher: llguidance.LLMatcher

    def advance(self, token: int) -> None:
        """Consume an emitted token; RuntimeError if the grammar rejects it (the mask
        allowed it, so this is a bug, and it fails that request only)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar rejected token {token}: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """True when the grammar can take no further token: the sequence ends."""
        return self.matcher.is_stopped()


class GrammarCache:
    """Compiled grammars of one tokenizer, LRU-bounded, keyed by (kind, source)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, max_entries: int = CACHE_ENTRIES):
        self.tokenizer, self.max_entries = tokenizer, max_entries
        self._entries: OrderedDict[tuple[str, str], Grammar] = OrderedDict()
        self._lock = threading.Lock()  # requests are validated in worker threads
        self.hits = self.misses = 0

    def compile(self, spec: GrammarSpec) -> Grammar:
        """The grammar of `spec`, compiled on a miss; GrammarError naming the problem."""
        key = spec.key()
        with self._lock:
            if (found := self._entries.get(key)) is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found
        grammar = Grammar(*key, self._matcher(*key))  # outside the lock: it can take a while
        with self._lock:
            self.misses += 1
            self._entries[key] = grammar
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return grammar

    def _matcher(self, kind: str, source: str) -> llguidance.LLMatcher:
        if len(source) > GRAMMAR_MAX_CHARS:
            what = "schema" if kind == "json" else "regex"
            raise GrammarError(f"the {what} must have at most {GRAMMAR_MAX_CHARS} characters")
        try:
            if kind == "json":
                text = llguidance.LLMatcher.grammar_from_json_schema(source, overrides=JSON_OPTIONS)
            else:
                text = llguidance.LLMatcher.grammar_from_regex(source)
            matcher = llguidance.LLMatcher(self.tokenizer, text, log_level=0)
        except Exception as exc:  # llguidance raises ValueError for malformed input
            raise GrammarError(_first_line(str(exc))) from None
        if matcher.is_error():
            raise GrammarError(_first_line(matcher.get_error()))
        return matcher


def _first_line(message: str) -> str:
    """llguidance's messages carry a source excerpt after the first line; keep the cause."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    cause = next((line for line in lines if line.startswith("error:")), None)
    return f"{lines[0]} ({cause})" if cause and lines else (lines[0] if lines else message)


@functools.lru_cache(maxsize=4)  # one store's tokenizer per server: wrapped once (~1 s)
def grammar_cache(tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...]) -> GrammarCache:
    """The grammar cache of a Hugging Face fast tokenizer whose model scores `vocab_size`
    tokens (the mask's width); the grammar allows `eos_ids` wherever it may end."""
    wrapped = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_ids))
    return GrammarCache(wrapped)


@functools.lru_cache(maxsize=1)
def _executor() -> llguidance.LLExecutor:
    """llguidance's thread pool, computing every constrained row's mask at once."""
    return llguidance.LLExecutor()


def allowed_tokens(
    constraints: list[Constraint | None], scores: torch.Tensor
) -> torch.Tensor | None:
    """(rows, vocab) bool on the scores' device: True where row i's grammar allows the token,
    every token for an unconstrained row; None when no row is constrained (no cost)."""
    rows = [(c.matcher, i) for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return None
    vocab = scores.shape[1]
    bits = llguidance.torch.allocate_token_bitmask(len(constraints), vocab)  # -1: all allowed
    llguidance.torch.fill_next_token_bitmask_par(_executor(), rows, bits)
    # (rows, words) int32 -> (rows, words, 32) bits, token t = word t // 32, bit t % 32
    words = bits.to(scores.device, non_blocking=True)
    shifts = torch.arange(32, device=scores.device, dtype=torch.int32)
    unpacked = (words[:, :, None] >> shifts) & 1
    return unpacked.reshape(len(constraints), -1)[:, :vocab].bool()
