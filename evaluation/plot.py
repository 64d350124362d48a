"""PNG of the fronts (like the paper's Figures 8-10): one line per method through its mean
rewards in preference order, each point labelled with its mu_1."""

from __future__ import annotations

from pathlib import Path

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def plot_fronts(results: dict, path: Path) -> Path:
    """Plot the first two objectives of every method's front; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or CI
    import matplotlib.pyplot as plt

    x_name, y_name = results["objectives"][:2]
    fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
    colours = plt.get_cmap("tab20")
    for i, (method, rows) in enumerate(results["mean_rewards"].items()):
        xs, ys = [r[0] for r in rows], [r[1] for r in rows]
        ax.plot(  # distinct colour, marker and dash per method: identical fronts stay visible
            xs,
            ys,
            color=colours(i % 20),
            marker=MARKERS[i % len(MARKERS)],
            linestyle="-" if i % 2 == 0 else "--",
            markersize=4,
            linewidth=1,
            label=method,
        )
        for mu, x, y in zip(results["preferences"], xs, ys, strict=True):
            ax.annotate(f"{mu[0]:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel(f"mean {x_name} reward")
    ax.set_ylabel(f"mean {y_name} reward")
    ax.set_title(
        f"Fronts on {results['prompts']} {results['split']} prompts "
        f"(labels: preference for {x_name})"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
