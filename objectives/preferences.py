"""The preference grids that evaluation, tuning and the baselines' training share, so a
baseline trained per preference (MORLHF, MODPO) answers exactly the preferences `mage eval`
asks for."""

from __future__ import annotations


def preference_sweep(n_objectives: int, steps: int | None = None) -> tuple[tuple[float, ...], ...]:
    """(1, 0), (0.9, 0.1), ..., (0, 1) for two objectives (steps 10); the simplex grid of
    step 1/steps otherwise (default 4: 15 points for three objectives)."""
    steps = steps or (10 if n_objectives == 2 else 4)
    if n_objectives == 2:
        return tuple((round(1 - i / steps, 6), round(i / steps, 6)) for i in range(steps + 1))
    grid = []

    def fill(prefix: list[int], left: int, slots: int) -> None:
        if slots == 1:
            grid.append(tuple(round(v / steps, 6) for v in [*prefix, left]))
            return
        for v in range(left, -1, -1):
            fill([*prefix, v], left - v, slots - 1)

    fill([], steps, n_objectives)
    return tuple(grid)


def preference_label(mu) -> str:
    """A folder name for a preference: (0.3, 0.7) -> 'mu-0.3-0.7' (the MORLHF and MODPO
    adapters' folders, and their names in a store's training costs)."""
    return "mu-" + "-".join(f"{round(float(w), 6):g}" for w in mu)
