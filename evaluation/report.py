"""table.md of a `mage eval` run: mean rewards per preference (rescaled and raw), the front
metrics with their bootstrap intervals, and the paired comparisons, each percentage printed
beside the reference point it depends on."""

from __future__ import annotations


def _opt(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _ci(ci, fmt: str = ".4f") -> str:
    return "" if not ci else f" [{format(ci[0], fmt)}, {format(ci[1], fmt)}]"


def reference_text(results: dict) -> str:
    point = ", ".join(f"{v:g}" for v in results["reference_point"])
    return f"r~ = ({point})"


def _rewards(results: dict) -> list[str]:
    objectives = results["objectives"]
    head = (
        "| method | gamma | preference | " + " | ".join(f"{o} r~ (raw)" for o in objectives) + " |"
    )
    lines = [head, "|" + "---|" * (3 + len(objectives))]
    for label, rows in results["mean_rewards"].items():
        gamma = results["variants"][label]["gamma"]
        raw = results["mean_raw_rewards"][label]
        for mu, row, raw_row in zip(results["preferences"], rows, raw, strict=True):
            values = " | ".join(f"{v:+.3f} ({r:.3f})" for v, r in zip(row, raw_row, strict=True))
            lines.append(f"| {label} | {gamma:g} | {tuple(mu)} | {values} |")
    return lines


def _metrics(results: dict) -> list[str]:
    lines = [
        "",
        f"HV reference point: {reference_text(results)} ({results.get('reference_source', '')});"
        f" intervals: paired bootstrap over {results['prompts']} prompts, 95%.",
        "",
        "| method | gamma | HV [95% CI] | inner product | sparsity | spacing | front "
        "| ctrl [95% CI] | ms/token | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in results["metrics"].items():
        gamma = results["variants"][label]["gamma"]
        ctrl = f"{m['controllability']:.3f}{_ci(m.get('controllability_ci'), '.3f')}"
        lines.append(
            f"| {label} | {gamma:g} | {m['hv']:.4f}{_ci(m.get('hv_ci'))} | "
            f"{m['inner_product']:.4f} | {m['sparsity']:.4f} | {m['spacing']:.4f} | "
            f"{m['front_length']} | {ctrl}"
            f" | {_opt(m.get('ms_per_token'), '.1f')} | {_opt(m.get('peak_mib'), '.0f')} |"
        )
    return lines


def _comparisons(results: dict) -> list[str]:
    rows = results.get("comparisons") or []
    if not rows:
        return []
    ref = reference_text(results)
    lines = [
        "",
        "| comparison a − b | ΔHV [95% CI] | ΔHV % of b [95% CI] (reference) | Δctrl [95% CI] "
        "| interval excludes 0 |",
        "|---|---|---|---|---|",
    ]
    for c in rows:
        pct = _opt(c["hv_pct"], "+.1f")
        lines.append(
            f"| {c['a']} − {c['b']} | {c['hv_diff']:+.4f}{_ci(c['hv_diff_ci'], '+.4f')} | "
            f"{pct}%{_ci(c['hv_pct_ci'], '+.1f')} ({ref}) | "
            f"{c['ctrl_diff']:+.3f}{_ci(c['ctrl_diff_ci'], '+.3f')} | "
            f"{'yes' if c['holds'] else 'no'} |"
        )
    return lines


def _lmc(results: dict) -> list[str]:
    lmc = {label: m["lmc"] for label, m in results["metrics"].items() if "lmc" in m}
    if not lmc:
        return []
    names = results["objectives"]
    lines = [
        "",
        "| LMC (Observation 3) | "
        + " | ".join(f"{o}: share above chord, mean gap" for o in names)
        + " |",
        "|---|---|---|",
    ]
    for label, gap in lmc.items():
        cells = " | ".join(
            f"{gap['share_above'][k]:.2f}, {gap['mean_gap'][k]:+.4f}" for k in range(2)
        )
        lines.append(f"| {label} | {cells} |")
    return lines


def markdown_table(results: dict) -> str:
    lines = _rewards(results) + _metrics(results) + _comparisons(results) + _lmc(results)
    return "\n".join(lines) + "\n"
