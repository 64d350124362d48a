"""The training-cost files (the paper's Sec. 6.1 compares methods by what they cost to train),
read here and written by training/costs.py:

- ``<run folder>/cost.jsonl``: a ledger, one line per checkpoint (a value model: per epoch),
  per end of a call and per sampling pass, with the steps, wall seconds and CPU seconds since
  the line before. A run stopped between sessions and resumed adds up; `run_cost` sums it.
- ``<store>/training_costs.json``: the summed cost of every trained part of a store, by
  component (backbones, specialists, values, morlhf, modpo, ric) and name. `mage store
  assemble` carries it over and `mage eval` puts a training cost beside each method.
"""

from __future__ import annotations

import json
from pathlib import Path

COST_FILE = "cost.jsonl"
STORE_COSTS = "training_costs.json"
FIELDS = ("steps", "wall_s", "cpu_s")
SAMPLES = "samples"
"""The name of a method's shared data pass in the store's record (MODPO's sampled pairs): a
cost of the method, not an adapter."""


def run_cost(*folders: Path) -> dict:
    """The ledgers of run folders summed over their calls: steps, wall_s, cpu_s (zeros if
    none). Each folder's own ledger only, not its subfolders'."""
    lines = []
    for out in folders:
        path = Path(out) / COST_FILE
        if path.is_file():
            lines += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {k: round(sum(x[k] for x in lines), 1) for k in FIELDS}


def read_store_costs(store: Path) -> dict[str, dict[str, dict]]:
    """``{component: {name: cost}}`` of a store ({} when it has none recorded)."""
    path = Path(store) / STORE_COSTS
    return json.loads(path.read_text()) if path.is_file() else {}


def recorded_cost(store: Path, component: str, name: str) -> dict | None:
    """The cost `store` recorded for one part (None: not on record, i.e. unknown): what a
    part copied from that store costs."""
    return read_store_costs(store).get(component, {}).get(name)


def record_store_cost(store: Path, component: str, name: str, cost: dict | None) -> None:
    """Set one part's cost in the store's record (None: remove it, e.g. a part whose cost is
    unknown replaced one whose cost was known)."""
    costs = read_store_costs(store)
    part = costs.setdefault(component, {})
    if cost is None:
        part.pop(name, None)
    else:
        part[name] = {k: cost[k] for k in FIELDS if k in cost}
    path = Path(store) / STORE_COSTS
    path.write_text(json.dumps(costs, indent=2, sort_keys=True) + "\n")
