"""The engine's deterministic simulation (tests/simulation.py): hundreds of seeded schedules
of submits, fan-outs, cancels, deadlines and overload refusals, each checked against the
invariants; benchmarks/sim_soak.py plays many more. A failure names its seed and the command
that replays it."""

from __future__ import annotations

import pytest
import torch

from guidance.batch import Batch
from model_store.loader import load_store
from tests.simulation import AloneRuns, InvariantError, play, run

SCHEDULES = 200
"""Seeds played in every `make test`."""


@pytest.fixture(scope="module")
def loaded(tiny_store):
    return load_store(tiny_store, "cpu", "float32")


@pytest.fixture
def one_thread():
    """The tiny model's ops take microseconds; on a busy machine more threads only contend
    (a schedule runs tens of times slower with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_random_schedules_keep_every_invariant(loaded, one_thread):
    seen = run(loaded, range(SCHEDULES))
    # The schedules reach every ending they are meant to exercise, and the prefix cache.
    assert {"success", "cancelled", "timeout", "refused", "prefix reused"} <= set(seen), seen


def test_a_seed_replays_exactly(loaded, one_thread):
    first, again = play(loaded, 7), play(loaded, 7)
    events = [[c.events for c in p.schedule.clients] for p in (first, again)]
    assert events[0] == events[1] and first.steps == again.steps
    assert any(c.events for c in first.schedule.clients)


original_keep = Batch.keep


def _keep_with_a_float_index(self, index):
    """Batch.keep as it was: `torch.tensor([])` is a float tensor, which cannot index."""
    if self._prompts is not None and not index:
        ids = self._prompts[0]
        _ = ids[torch.tensor(index, device=ids.device)]  # raises IndexError
    return original_keep(self, index)


def test_the_simulation_finds_an_abandoned_prefill_that_breaks_the_step(
    loaded, one_thread, monkeypatch
):
    """With Batch.keep's empty-index bug back, some of the seeds make test plays abandon a
    whole prefilling group mid-prefill, and the simulation reports the first with its seed
    (it stops there: seed 17 today)."""
    monkeypatch.setattr(Batch, "keep", _keep_with_a_float_index)
    with pytest.raises(InvariantError) as failure:
        run(loaded, range(SCHEDULES), AloneRuns(loaded))
    message = str(failure.value)
    assert message.startswith("seed ") and "IndexError" in message
    assert "replay: python benchmarks/sim_soak.py --seed" in message
