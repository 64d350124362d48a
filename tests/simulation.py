"""A deterministic simulation of the serving engine, in the spirit of FoundationDB's and
TigerBeetle's: one seed draws a whole schedule (engine limits; submits of random prompts
crossing the prefill chunk, with random modes, preferences, merge methods, sampling and stop
sequences; fan-outs like OpenAI's `n`, queued all or none as the HTTP layer does; client
cancels and deadlines landing while queued, prefilling, decoding or between choices;
overload refusals), which is played by calling `Engine.step()` on this thread against an
explicit clock. Nothing depends on wall time or thread timing, so a seed replays exactly.

After each schedule `check` verifies the invariants; a broken one raises InvariantError
whose message starts with the seed and ends with the command that replays it.
tests/test_simulation.py runs hundreds of seeds, benchmarks/sim_soak.py many more.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from guidance.engine import Engine, EngineConfig, EngineObserver, QueueFullError
from guidance.requests import (
    ErrorEvent,
    Event,
    GenerationRequest,
    RequestHandle,
    SamplingParams,
    TokenEvent,
)
from model_store.loader import LoadedStore
from server.relay import submit_all

MODES = ("none", "explicit", "explicit-ensemble", "implicit", "implicit-ensemble")
PREFERENCES = ((1.0, 0.0), (0.7, 0.3), (0.5, 0.5), (0.2, 0.8), (0.0, 1.0))
PROMPT_LENGTHS = (1, 3, 6, 11, 19)
"""Prompt tokens, one fixed prompt of each length (so run-alone references are shared across
schedules); the prefill chunks drawn are 6 and 12 token-rows, so prompts cross them."""
STOPS = ("e", "th", " a", "o")
LAST_ARRIVAL = 8
"""Requests arrive at steps 0..LAST_ARRIVAL."""
MAX_STEPS = 400
"""A schedule not drained after this many steps has a stuck request."""
LOGPROB_TOLERANCE = 1e-4
"""fp32: batched and chunked forwards differ from a request's own run by rounding only."""
FIRST_TOKEN = 3
"""Prompt tokens are drawn above the tiny tokenizer's special tokens (ids 0-2)."""


class InvariantError(AssertionError):
    """A schedule broke an invariant; the message names the seed and how to replay it."""


class Clock:
    """The engine's time (EngineConfig.clock): moves one unit per step, when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Outcomes(EngineObserver):
    """What mage_requests_total counts from the engine, by outcome."""

    def __init__(self) -> None:
        self.counted: Counter[str] = Counter()
        self.reused = 0
        """Prompts that started from the prefix cache's KV."""

    def finished(self, outcome: str, seconds: float, generated: int, running: int) -> None:
        self.counted[outcome] += 1

    def prefix_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.reused += cached_tokens > 0


@dataclass(eq=False)
class Client(RequestHandle):
    """One engine request of the schedule and what its client saw (a fan-out's choice is
    one too)."""

    arrives: int = 0
    """Step at which its fan-out is submitted."""
    cancel_at: int | None = None
    """Step at which its client goes away, if it does."""
    events: list[Event] = field(default_factory=list)
    settles: int = 0
    """Calls of settle(): the engine's one, plus the HTTP layer's own on a refusal."""
    accepted: bool = False
    gone: bool = False
    """Its client went away (cancel called)."""

    def __post_init__(self) -> None:
        self.on_event = self.events.append

    def settle(self) -> bool:
        self.settles += 1
        return super().settle()


def _unset(event: Event) -> None:
    raise AssertionError("replaced in Client.__post_init__")


@dataclass
class Schedule:
    seed: int
    config: EngineConfig
    groups: list[list[Client]]
    """Fan-outs: the clients of one HTTP request, queued all or none; the first counted."""

    @property
    def clients(self) -> list[Client]:
        return [client for group in self.groups for client in group]


def draw(store: LoadedStore, seed: int, clock: Clock) -> Schedule:
    """The schedule of one seed."""
    rng = random.Random(seed)
    config = EngineConfig(
        max_queue=rng.choice([0, 1, 2, 4, 16]),
        max_running=rng.choice([1, 2, 3, 4]),
        prefill_tokens=rng.choice([6, 12, None]),
        kv_budget_tokens=rng.choice([None, None, 120, 300]),
        prefix_cache_bytes=rng.choice([0, 1 << 20]),  # on: later prompts reuse cached KV
        prefix_block_tokens=rng.choice([4, 8]),
        clock=clock,
    )
    vocab = len(store.tokenizer)
    groups = []
    for g in range(rng.randint(1, 6)):
        base = _draw_request(rng, vocab, f"s{seed}-g{g}")
        arrives = rng.randint(0, LAST_ARRIVAL)
        group = []
        for i in range(rng.choice([1, 1, 1, 2, 3])):  # OpenAI's n
            request = dataclasses.replace(base, request_id=f"{base.request_id}-{i}")
            if base.sampling.seed is not None:  # choice i samples with seed + i
                sampling = dataclasses.replace(base.sampling, seed=base.sampling.seed + i)
                request = dataclasses.replace(request, sampling=sampling)
            if rng.random() < 0.2:  # expires queued, prefilling, decoding or not at all
                deadline = clock.now + arrives + rng.randint(0, 9) + 0.5
                request = dataclasses.replace(request, deadline=deadline)
            cancel_at = arrives + rng.randint(0, 10) if rng.random() < 0.25 else None
            client = Client(request, _unset, 0.0, counted=i == 0, arrives=arrives)
            client.cancel_at = cancel_at
            group.append(client)
        groups.append(group)
    return Schedule(seed, config, groups)


def _draw_request(rng: random.Random, vocab: int, name: str) -> GenerationRequest:
    length = rng.choice(PROMPT_LENGTHS)
    fixed = random.Random(length)
    prompt = tuple(fixed.randrange(FIRST_TOKEN, vocab) for _ in range(length))
    sampling = SamplingParams()
    if rng.random() < 0.3:  # seeded sampling: reproducible whatever the batch
        top_k = rng.choice([None, 5, 20])
        sampling = SamplingParams(temperature=1.0, top_k=top_k, seed=rng.randrange(2**20))
    return GenerationRequest(
        request_id=name,
        prompt_ids=prompt,
        preference=torch.tensor(rng.choice(PREFERENCES), dtype=torch.float64),
        mode=rng.choice(MODES),
        gamma=rng.choice([0.0, 2.0]),
        sampling=sampling,
        max_new_tokens=rng.randint(1, 5),
        stop=tuple(rng.sample(STOPS, rng.randint(0, 2))),
        merge_method=rng.choice(["bone-soup", "bone-soup", "rewarded-soup"]),
        ignore_eos=rng.random() < 0.5,
    )


def replay_command(seed: int) -> str:
    return f"python benchmarks/sim_soak.py --seed {seed} --schedules 1"


def fail(seed: int, problem: str) -> InvariantError:
    return InvariantError(f"seed {seed}: {problem}\n  replay: {replay_command(seed)}")


@dataclass
class Played:
    schedule: Schedule
    engine: Engine
    outcomes: Outcomes
    steps: int


class EngineErrors(logging.Handler):
    """Errors the engine logs: with no fault injected, every one is a bug, even one the
    engine contained."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def first(self) -> str | None:
        if not self.records:
            return None
        record = self.records[0]
        error = record.exc_info[1] if record.exc_info else None
        return (
            f"{record.getMessage()}: {type(error).__name__}: {error}"
            if error
            else record.getMessage()
        )


def play(store: LoadedStore, seed: int) -> Played:
    """Draw the seed's schedule and run it until the engine is idle (see _play); the
    engine must log no error meanwhile."""
    errors, logger = EngineErrors(), logging.getLogger("mage.engine")
    logger.addHandler(errors)
    try:
        played = _play(store, seed)
    finally:
        logger.removeHandler(errors)
    if errors.first() is not None:
        raise fail(seed, f"the engine logged an error: {errors.first()}")
    return played


def _play(store: LoadedStore, seed: int) -> Played:
    clock = Clock()
    schedule = draw(store, seed, clock)
    outcomes = Outcomes()
    engine = Engine(store, schedule.config, outcomes)
    last = max([LAST_ARRIVAL] + [c.cancel_at or 0 for c in schedule.clients])
    for step in range(MAX_STEPS):
        for group in schedule.groups:
            if group[0].arrives == step:
                _arrive(engine, group, clock)
        for client in schedule.clients:
            if client.accepted and client.cancel_at == step:
                client.gone = True
                client.cancel()
        if step > last and not engine._busy():
            return Played(schedule, engine, outcomes, step)
        if engine._busy():
            try:
                engine.step()
            except Exception as exc:  # the loop's catch-all would fail every running request
                raise fail(seed, f"step {step} raised {type(exc).__name__}: {exc}") from exc
        clock.now += 1.0
    raise fail(seed, f"not idle after {MAX_STEPS} steps")


def _arrive(engine: Engine, group: list[Client], clock: Clock) -> None:
    for client in group:
        client.submitted_at = clock.now
    try:
        submit_all(engine, list(group))
    except QueueFullError:
        return
    for client in group:
        client.accepted = True


def outcome_of(client: Client) -> str:
    """The outcome its events show: success, the error's type, or cancelled (no event)."""
    last = client.events[-1] if client.events else None
    if isinstance(last, ErrorEvent):
        return last.error_type
    if isinstance(last, TokenEvent) and last.details is not None:
        return "success"
    return "cancelled"


def check(store: LoadedStore, played: Played, alone: AloneRuns) -> None:
    """Every invariant of one played schedule; raises InvariantError on the first broken."""
    schedule, engine, seed = played.schedule, played.engine, played.schedule.seed
    for client in schedule.clients:
        _check_client(seed, client)
    idle = {
        "running": engine.running,
        "queue": engine.queue_size,
        "kv bytes": engine.kv_bytes(),
        "accepted": engine._accepted,
    }
    if any(idle.values()):
        raise fail(seed, f"idle engine still holds {idle}")
    accepted = [group for group in schedule.groups if group[0].accepted]
    expected = Counter(outcome_of(group[0]) for group in accepted)
    if played.outcomes.counted != expected or sum(expected.values()) != len(accepted):
        raise fail(seed, f"counted {dict(played.outcomes.counted)}, expected {dict(expected)}")
    for client in schedule.clients:
        if client.accepted and outcome_of(client) == "success":
            alone.compare(seed, client)


def _check_client(seed: int, client: Client) -> None:
    name = client.request.request_id
    finals = [i for i, e in enumerate(client.events) if _final(e)]
    if not client.accepted:
        queued = client.cancelled.is_set()  # queued before its fan-out was refused
        # Queued ones are settled by the refusal (its one outcome), then dropped by the
        # engine, which must count nothing more.
        if client.events or client.settles != (2 if queued else 0):
            problem = f"{name}, of a refused request: {client.settles} settles, {client.events}"
            raise fail(seed, problem)
        return
    if client.settles != 1:
        raise fail(seed, f"{name} ended {client.settles} times")
    if len(finals) > 1 or (finals and finals[0] != len(client.events) - 1):
        raise fail(seed, f"{name}: events after its last one: {client.events}")
    outcome, last = outcome_of(client), client.events[-1] if client.events else None
    allowed = {
        "success": True,
        "cancelled": client.gone,
        "timeout": client.request.deadline is not None,
        "validation": "KV budget" in getattr(last, "message", ""),
    }
    if not allowed.get(outcome, False):
        raise fail(seed, f"{name} ended {outcome!r} through no fault of its own: {last}")


def _final(event: Event) -> bool:
    return isinstance(event, ErrorEvent) or event.details is not None


class AloneRuns:
    """Each request run on its own in a fresh engine, once per distinct request."""

    def __init__(self, store: LoadedStore) -> None:
        self.store = store
        self.runs: dict[tuple, list[Event]] = {}

    def compare(self, seed: int, client: Client) -> None:
        request = client.request
        key = (
            request.prompt_ids,
            tuple(request.preference.tolist()),
            request.mode,
            request.gamma,
            request.sampling,
            request.max_new_tokens,
            request.stop,
            request.merge_method,
            request.ignore_eos,
        )
        if key not in self.runs:
            own = dataclasses.replace(request, deadline=None)
            self.runs[key] = Engine(self.store).run_to_completion(own)
        reference = self.runs[key]
        got = [(e.id, e.logprob) for e in client.events]
        want = [(e.id, e.logprob) for e in reference if isinstance(e, TokenEvent)]
        same_ids = [i for i, _ in got] == [i for i, _ in want]
        if not same_ids or any(
            abs(a - b) > LOGPROB_TOLERANCE for (_, a), (_, b) in zip(got, want, strict=True)
        ):
            name = request.request_id
            raise fail(seed, f"{name} differs from its own run: {got} != {want}")


def run(store: LoadedStore, seeds: range, alone: AloneRuns | None = None) -> Counter[str]:
    """Play and check every seed; the requests seen by outcome (`refused`: by overload), and
    `prefix reused`: prompts that started from cached KV (for the caller's summary)."""
    alone = alone or AloneRuns(store)
    seen: Counter[str] = Counter()
    for seed in seeds:
        played = play(store, seed)
        check(store, played, alone)
        for client in played.schedule.clients:
            seen[outcome_of(client) if client.accepted else "refused"] += 1
        seen["prefix reused"] += played.outcomes.reused
    return seen
