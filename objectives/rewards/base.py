"""The reward interface: a named, lazily loaded, batched score of (prompt, response) pairs.

A reward turns a batch of (prompt, response) pairs into one float per pair. Subclasses implement
``_load`` (heavy state such as a model, built once on first use and cached on the instance) and
``_score`` (score one chunk of pairs). ``Reward.__call__`` does the rest: it checks the inputs,
loads the state, splits the batch into chunks of ``batch_size``, checks every output is a finite
number and that there is exactly one per pair, and turns any failure into a :class:`RewardError`
that names the reward and the (truncated) offending input.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Callable, Sequence
from typing import Any

_SNIPPET_CHARS = 80


def _snippet(text: object, limit: int = _SNIPPET_CHARS) -> str:
    """``repr`` of ``text`` cut to about ``limit`` characters, noting the full length if cut."""
    if not isinstance(text, str):
        return f"<{type(text).__name__}>"
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} chars)"


class RewardError(Exception):
    """A reward could not be loaded, failed on an input, or produced an invalid output.

    ``reward`` is the reward's name; ``prompt`` and ``response`` are the offending input when
    one pair can be blamed (``None`` otherwise). The message names the reward and shows the input
    truncated to a readable length.
    """

    def __init__(
        self,
        reward: str,
        problem: str,
        *,
        prompt: str | None = None,
        response: str | None = None,
        index: int | None = None,
    ) -> None:
        self.reward = reward
        self.problem = problem
        self.prompt = prompt
        self.response = response
        self.index = index
        message = f"reward {reward!r}: {problem}"
        if prompt is not None or response is not None:
            where = "" if index is None else f" #{index}"
            message += f" [input{where}: prompt={_snippet(prompt)}, response={_snippet(response)}]"
        super().__init__(message)


class RewardSpecError(RewardError, ValueError):
    """A reward spec names no registered reward or is malformed."""

    def __init__(self, spec: str, problem: str) -> None:
        self.spec = spec
        super().__init__(spec, problem)


def _as_float(value: object) -> float:
    """A real number as a float; anything else (strings, None, complex, arrays) is a TypeError."""
    if isinstance(value, numbers.Real) and not isinstance(value, str):
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return _as_float(value.item())  # 0-d numpy array or torch tensor
    raise TypeError(f"expected a real number, got {type(value).__name__}")


class Reward:
    """Base class of all rewards. Call it as ``reward(prompts, responses) -> list[float]``.

    Thread-safe: the state is loaded once under a lock; scoring itself holds no lock.
    """

    name: str = "reward"
    batch_size: int | None = None
    """Largest number of pairs handed to ``_score`` at once; ``None`` means the whole batch."""

    def __init__(self, name: str | None = None, *, batch_size: int | None = None) -> None:
        if name is not None:
            self.name = name
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            self.batch_size = batch_size
        self._state: Any = None
        self._loaded = False
        self._lock = threading.Lock()

    # -- to implement -------------------------------------------------------------------------

    def _load(self) -> Any:
        """Build the heavy state (models, lexicons); called once, on first use."""
        return None

    def _score(self, state: Any, prompts: list[str], responses: list[str]) -> Sequence[Any]:
        """Score one chunk of pairs; returns one real number per pair."""
        raise NotImplementedError

    # -- public API ---------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """Whether the heavy state has been built already."""
        return self._loaded

    def load(self) -> Reward:
        """Build the state now instead of on the first call (e.g. at server start-up)."""
        self._ensure_loaded()
        return self

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        prompts, responses = self._check_inputs(prompts, responses)
        if not prompts:
            return []
        state = self._ensure_loaded()
        step = self.batch_size or len(prompts)
        scores: list[float] = []
        for start in range(0, len(prompts), step):
            scores.extend(
                self._score_chunk(
                    state, prompts[start : start + step], responses[start : start + step], start
                )
            )
        return scores

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}{' loaded' if self._loaded else ''}>"

    # -- machinery ----------------------------------------------------------------------------

    def _check_inputs(
        self, prompts: Sequence[str], responses: Sequence[str]
    ) -> tuple[list[str], list[str]]:
        for label, seq in (("prompts", prompts), ("responses", responses)):
            if isinstance(seq, str) or not isinstance(seq, Sequence):
                raise RewardError(
                    self.name, f"{label} must be a list of strings, got {type(seq).__name__}"
                )
        if len(prompts) != len(responses):
            raise RewardError(
                self.name,
                f"got {len(prompts)} prompts but {len(responses)} responses; they must pair up",
            )
        for index, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise RewardError(
                    self.name,
                    "prompts and responses must be strings",
                    prompt=prompt,
                    response=response,
                    index=index,
                )
        return list(prompts), list(responses)

    def _ensure_loaded(self) -> Any:
        if self._loaded:
            return self._state
        with self._lock:
            if not self._loaded:
                try:
                    self._state = self._load()
                except RewardError:
                    raise
                except Exception as exc:
                    raise RewardError(
                        self.name, f"could not be loaded: {type(exc).__name__}: {exc}"
                    ) from exc
                self._loaded = True
        return self._state

    def _score_chunk(
        self, state: Any, prompts: list[str], responses: list[str], offset: int
    ) -> list[float]:
        try:
            raw = self._score(state, prompts, responses)
        except Exception as exc:
            raise self._blame(state, prompts, responses, offset, exc) from exc
        return self._check_outputs(raw, prompts, responses, offset)

    def _blame(
        self,
        state: Any,
        prompts: list[str],
        responses: list[str],
        offset: int,
        exc: Exception,
    ) -> RewardError:
        """The error for a failed chunk, naming the first pair that fails on its own."""
        cause = f"{type(exc).__name__}: {exc}"
        if len(prompts) > 1:
            for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
                try:
                    self._score(state, [prompt], [response])
                except Exception as single_exc:
                    cause = f"{type(single_exc).__name__}: {single_exc}"
                    return RewardError(
                        self.name,
                        f"failed: {cause}",
                        prompt=prompt,
                        response=response,
                        index=offset + i,
                    )
            return RewardError(
                self.name,
                f"failed on a batch of {len(prompts)} pairs starting at #{offset} "
                f"(each pair scores fine alone): {cause}",
                prompt=prompts[0],
                response=responses[0],
                index=offset,
            )
        return RewardError(
            self.name, f"failed: {cause}", prompt=prompts[0], response=responses[0], index=offset
        )

    def _check_outputs(
        self, raw: object, prompts: list[str], responses: list[str], offset: int
    ) -> list[float]:
        if hasattr(raw, "tolist"):  # numpy array or torch tensor
            raw = raw.tolist()
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
            raise RewardError(
                self.name,
                f"returned {type(raw).__name__}, expected a list of {len(prompts)} floats",
                prompt=prompts[0],
                response=responses[0],
                index=offset,
            )
        if len(raw) != len(prompts):
            raise RewardError(
                self.name,
                f"returned {len(raw)} scores for a batch of {len(prompts)} pairs "
                f"starting at #{offset}",
                prompt=prompts[0],
                response=responses[0],
                index=offset,
            )
        scores: list[float] = []
        for i, value in enumerate(raw):
            try:
                score = _as_float(value)
            except TypeError as exc:
                raise RewardError(
                    self.name,
                    f"returned an invalid score: {exc}",
                    prompt=prompts[i],
                    response=responses[i],
                    index=offset + i,
                ) from None
            if not math.isfinite(score):
                raise RewardError(
                    self.name,
                    f"returned a non-finite score ({score})",
                    prompt=prompts[i],
                    response=responses[i],
                    index=offset + i,
                )
            scores.append(score)
        return scores


class FunctionReward(Reward):
    """A reward backed by a plain callable ``fn(prompts, responses) -> list[float]``."""

    def __init__(
        self,
        name: str,
        fn: Callable[[list[str], list[str]], Sequence[Any]],
        *,
        batch_size: int | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"reward {name!r}: {fn!r} is not callable")
        super().__init__(name, batch_size=batch_size)
        self.fn = fn

    def _score(self, state: Any, prompts: list[str], responses: list[str]) -> Sequence[Any]:
        return self.fn(prompts, responses)
