"""Recording what training costs (model_store/costs.py reads it): the clock that appends to a
run folder's ledger at each checkpoint, timed stages that are no optimizer step (sampling),
and a demo build's record in its store."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from model_store.costs import COST_FILE, SAMPLES, record_store_cost, recorded_cost, run_cost

__all__ = [
    "SAMPLES",
    "CostClock",
    "record_build_costs",
    "record_store_cost",
    "recorded_cost",
    "run_cost",
    "timed",
]


class CostClock:
    """Wall and CPU time of a training call, appended to ``out/cost.jsonl`` at every
    checkpoint and at the end (one line each, so a resumed run, or one stopped between
    checkpoints, adds up): what a method's training cost (Sec. 6.1) is read from."""

    def __init__(self, out: Path, step: int = 0) -> None:
        self.out, self.step = Path(out), step
        self.wall, self.cpu = time.monotonic(), time.process_time()

    def record(self, step: int, stage: str | None = None) -> None:
        """Append the steps, wall seconds and CPU seconds (all threads) since the last record,
        up to optimizer step (or epoch) `step`. A `stage` (e.g. "sampling") is recorded even
        without steps: work a method needs that is no optimizer step."""
        import torch

        line = {
            "steps": step - self.step,
            # milliseconds: a tiny run's step is under the 0.05 s a coarser rounding drops
            "wall_s": round(time.monotonic() - self.wall, 3),
            "cpu_s": round(time.process_time() - self.cpu, 3),
            "threads": torch.get_num_threads(),
        }
        if stage:
            line["stage"] = stage
        if line["steps"] > 0 or stage:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / COST_FILE).open("a") as ledger:
                ledger.write(json.dumps(line) + "\n")
        self.step, self.wall, self.cpu = step, time.monotonic(), time.process_time()

    def callback(self):
        """A transformers TrainerCallback that records at every checkpoint save."""
        from transformers import TrainerCallback

        clock = self

        class _CostCallback(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                clock.record(state.global_step)

        return _CostCallback()


@contextmanager
def timed(out: Path, stage: str) -> Iterator[None]:
    """Record the block's time in ``out``'s ledger as `stage` (when it finishes)."""
    clock = CostClock(out)
    yield
    clock.record(0, stage)


def record_build_costs(store: Path, report: dict, reused_from: Path | None) -> None:
    """The store's record from a demo build's report (`mage store build-demo`): each trained
    part's ledger sum; a part copied from the store `reused_from` keeps the cost that store
    recorded for it (none where it recorded none: unknown, not zero)."""
    parts = [
        *(("backbones", entry) for entry in report["backbones"]),
        *(("specialists", entry) for entry in report["specialists"]),
        *(("values", {"path": f"values/{o}", **e}) for o, e in report["value_models"].items()),
    ]
    for component, entry in parts:
        name = Path(entry["path"]).name
        if "reused_from" in entry:
            cost = recorded_cost(reused_from, component, name) if reused_from else None
        else:
            cost = entry.get("cost")
        record_store_cost(store, component, name, cost)
