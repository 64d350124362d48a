"""Emit: a sampled token becomes its request's event, and ends the request when it should.

The last stage of the engine's step. It is kept apart from the engine because it depends on
nothing the scheduler holds, only on the tokenizer, the clock and the metrics hooks: what it
must do to end a request (settle the count, call the handle) is the engine's `finish`,
handed in. A fault while emitting one token ends that request alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from guidance.engine_config import EngineObserver
from guidance.requests import ErrorEvent, TokenEvent, TopToken
from guidance.sampling import Pick
from guidance.sequence import Sequence
from model_store.loader import LoadedStore

log = logging.getLogger("mage.engine")
Finish = Callable[[Sequence, str, TokenEvent | ErrorEvent | None], None]
"""Ends a sequence with its outcome and last event (guidance.engine.Engine._finish)."""
NOT_FINITE = (
    "the guided scores log pi + gamma V are not finite (NaN or infinity); "
    "try a smaller guidance.gamma"
)


class Emitter:
    """Turns each running sequence's pick into a TokenEvent, or into its last event."""

    def __init__(
        self,
        store: LoadedStore,
        clock: Callable[[], float],
        observer: EngineObserver,
        finish: Finish,
    ):
        self.tokenizer = store.tokenizer
        self.clock, self.observer, self.finish = clock, observer, finish
        self.special_ids = set(store.tokenizer.all_special_ids)
        self.eos_ids = store.eos_ids

    def emit(self, seq: Sequence, pick: Pick) -> None:
        """Send the token to the request, or end it: a non-finite row (Eq. 25 overflowed)
        or a failure here fails that request only."""
        if seq.finished:
            return
        if not pick.finite:
            self.finish(seq, "error", ErrorEvent(NOT_FINITE, "generation"))
            return
        try:
            self._emit_token(seq, pick)
        except Exception as exc:
            log.exception("emitting failed for %s", seq.request.request_id)
            self.finish(seq, "error", ErrorEvent(f"generation failed: {exc}", "generation"))

    def _emit_token(self, seq: Sequence, pick: Pick) -> None:
        now = self.clock()
        self.observer.token(now - seq.last_token_at, first=seq.generated == 0)
        seq.last_token_at = now
        token, logprob = pick.token, pick.logprob
        seq.ids.append(token)
        seq.generated += 1
        if seq.seen is not None:
            seq.seen[token] = True
        if seq.constraint is not None:
            seq.constraint.advance(token)
        special = token in self.special_ids
        text = self.tokenizer.convert_ids_to_tokens(token) if special else seq.detok.push(token)
        top = tuple(self._top_token(i, lp) for i, lp in pick.top)
        reason = self.finish_reason(seq, token, len(text))
        if reason is None:
            seq.handle.on_event(TokenEvent(token, text, logprob, special, top_tokens=top))
            return
        if not special:
            text += seq.detok.flush()
        details = seq.details(reason, self.token_text)
        event = TokenEvent(token, text, logprob, special, seq.detok.text, details, top)
        self.finish(seq, "success", event)

    def _top_token(self, token: int, logprob: float) -> TopToken:
        text, special = self.token_text(token)
        return TopToken(token, text, logprob, special)

    def token_text(self, token: int) -> tuple[str, bool]:
        """A token's text on its own (alternatives and prompt tokens), and whether special."""
        if token in self.special_ids:
            return self.tokenizer.convert_ids_to_tokens(token), True
        return self.tokenizer.decode([token]), False

    def finish_reason(self, seq: Sequence, token: int, new_chars: int) -> str | None:
        """Why the sequence ends with `token` (TGI's finish reasons), or None to go on."""
        if token in self.eos_ids and not seq.request.ignore_eos:
            return "eos_token"
        if seq.constraint is not None and seq.constraint.complete:
            return "eos_token"  # the grammar takes nothing more: as if EOS came (TGI, vLLM)
        # Only text that includes the new characters can hold a stop sequence not seen before.
        longest = max((len(s) for s in seq.request.stop), default=0)
        tail = seq.detok.text[-(longest + new_chars) :] if new_chars else ""
        if any(stop in tail for stop in seq.request.stop):
            return "stop_sequence"
        if seq.generated >= seq.request.max_new_tokens:
            return "length"
        return None
