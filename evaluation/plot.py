"""PNG of the fronts (like the paper's Figures 8-10): each method's mean rewards (on the
store's fixed scale r~), one point per preference. Two objectives: one panel, a line per
method in preference order, each point labelled with its mu_1; more: one panel per pair of
objectives (pairwise projections of the front), markers only, since the simplex grid has no
order to draw a line along. Methods at gamma = 1 (`@g1`) are left out to keep the panels
readable; their numbers are in table.md."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def plot_fronts(results: dict, path: Path) -> Path:
    """Plot every method's front; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or CI
    import matplotlib.pyplot as plt

    names = results["objectives"]
    # two objectives: the preferences form one ordered sweep, drawn as a labelled line;
    # more: the simplex grid has no order, so each projection gets markers only
    sweep = len(names) == 2
    pairs = list(combinations(range(len(names)), 2))
    fig, axes = plt.subplots(
        1, len(pairs), figsize=(8 if len(pairs) == 1 else 6 * len(pairs), 6), dpi=110, squeeze=False
    )
    colours = plt.get_cmap("tab20")
    shown = {k: v for k, v in results["mean_rewards"].items() if not k.endswith("@g1")}
    for ax, (x, y) in zip(axes[0], pairs, strict=True):
        for i, (method, rows) in enumerate(shown.items()):
            xs, ys = [r[x] for r in rows], [r[y] for r in rows]
            ax.plot(  # distinct colour, marker and dash per method: identical fronts stay visible
                xs,
                ys,
                color=colours(i % 20),
                marker=MARKERS[i % len(MARKERS)],
                linestyle=("-" if i % 2 == 0 else "--") if sweep else "none",
                markersize=4 if sweep else 6,
                linewidth=1,
                label=method,
            )
            if sweep:
                for mu, px, py in zip(results["preferences"], xs, ys, strict=True):
                    ax.annotate(
                        f"{mu[0]:g}",
                        (px, py),
                        fontsize=6,
                        xytext=(2, 2),
                        textcoords="offset points",
                    )
        ax.set_xlabel(f"mean {names[x]} (r~)")
        ax.set_ylabel(f"mean {names[y]} (r~)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    reference = ", ".join(f"{v:g}" for v in results["reference_point"])
    labels = f"labels: preference for {names[0]}; " if sweep else ""
    fig.suptitle(
        f"Fronts on {results['prompts']} {results['split']} prompts ({labels}"
        f"HV reference r~ = ({reference}))",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_training_curves(report: dict, path: Path) -> Path:
    """Training curves of a demo build (build_report.json): each backbone's and specialist's
    mean r~ per objective on its sampled completions, in blocks of steps, one panel per
    adapter, the KL to the base on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adapters = [*report.get("backbones", []), *report.get("specialists", [])]
    objectives = report["settings"]["objectives"]
    fig, axes = plt.subplots(
        1, len(adapters), figsize=(4 * len(adapters), 3.6), dpi=110, squeeze=False
    )
    for ax, adapter in zip(axes[0], adapters, strict=True):
        curve = adapter.get("curve", [])
        steps = [block["steps"][1] for block in curve]
        for objective in objectives:  # one its run never logged is left out (_curve)
            if all(objective in block for block in curve):
                ax.plot(steps, [block[objective] for block in curve], marker=".", label=objective)
        kl = ax.twinx()
        kl.plot(steps, [block["kl"] for block in curve], color="grey", linestyle=":", label="KL")
        kl.set_ylabel("KL", color="grey", fontsize=7)
        ax.set_title(f"{adapter['name']} w={adapter['weights']}", fontsize=8)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean r~ of sampled completions")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":  # python -m evaluation.plot BUILD_REPORT.json OUT.png
    import json
    import sys

    plot_training_curves(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
