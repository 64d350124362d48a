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
        "| ctrl [95% CI] | ms/token | forwards/token | peak MiB | adapters | train CPU h |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in results["metrics"].items():
        gamma = results["variants"][label]["gamma"]
        ctrl = f"{m['controllability']:.3f}{_ci(m.get('controllability_ci'), '.3f')}"
        lines.append(
            f"| {label} | {gamma:g} | {m['hv']:.4f}{_ci(m.get('hv_ci'))} | "
            f"{m['inner_product']:.4f} | {m['sparsity']:.4f} | {m['spacing']:.4f} | "
            f"{m['front_length']} | {ctrl}"
            f" | {_opt(m.get('ms_per_token'), '.1f')} | {_opt(m.get('forwards_per_token'), '.1f')}"
            f" | {_opt(m.get('peak_mib'), '.0f')} | {_opt(m.get('adapters'), 'd')}"
            f" | {_train_cost(m)} |"
        )
    return lines


def _train_cost(m: dict) -> str:
    """CPU hours of the recorded parts, with the count of parts whose cost is not on record."""
    seconds, missing = m.get("train_cpu_s"), len(m.get("unrecorded") or [])
    hours = None if seconds is None else seconds / 3600
    if missing:
        return f"{_opt(hours, '.2f')} + {missing} unrecorded"
    return _opt(hours, ".2f")


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
        + " | ".join(f"{o}: share above chord, mean gap [95% CI]" for o in names)
        + " |",
        "|---|---|---|",
    ]
    for label, gap in lmc.items():
        cells = " | ".join(
            f"{gap['share_above'][k]:.2f}, {gap['mean_gap'][k]:+.4f} "
            f"[{gap['mean_gap_ci'][k][0]:+.4f}, {gap['mean_gap_ci'][k][1]:+.4f}]"
            for k in range(2)
        )
        lines.append(f"| {label} | {cells} |")
    return lines


def markdown_table(results: dict) -> str:
    lines = _rewards(results) + _metrics(results) + _comparisons(results) + _lmc(results)
    return "\n".join(lines) + "\n"


def seed_spread(runs: list[dict]) -> dict:
    """One comparison run on stores trained with different seeds (`mage seeds`): per method
    label and per paired comparison found in every run, the value of each seed, the mean and
    the spread (max - min). The runs must share the HV reference point, or HVs don't compare."""
    if len(runs) < 2:
        raise ValueError("give the results of at least two seeds")
    if len({tuple(r["reference_point"]) for r in runs}) != 1:
        raise ValueError("the runs use different HV reference points; HVs would not compare")

    def summary(values: list[float]) -> dict:
        return {
            "per_seed": values,
            "mean": sum(values) / len(values),
            "spread": max(values) - min(values),
        }

    methods = {
        label: {
            "hv": summary([r["metrics"][label]["hv"] for r in runs]),
            "controllability": summary([r["metrics"][label]["controllability"] for r in runs]),
        }
        for label in runs[0]["metrics"]
        if all(label in r["metrics"] for r in runs[1:])
    }
    keyed = [{(c["a"], c["b"]): c for c in r.get("comparisons") or []} for r in runs]
    comparisons = {
        f"{a} − {b}": {
            **summary([k[(a, b)]["hv_diff"] for k in keyed]),
            "holds_in": sum(k[(a, b)]["holds"] for k in keyed),
        }
        for a, b in keyed[0]
        if all((a, b) in k for k in keyed[1:])
    }
    reference = runs[0]["reference_point"]
    return {"reference_point": reference, "methods": methods, "comparisons": comparisons}


def seed_spread_table(names: list[str], spread: dict) -> str:
    """Markdown of `seed_spread`: a column per seed, then mean and spread."""
    point = ", ".join(f"{v:g}" for v in spread["reference_point"])
    seeds = " | ".join(names)
    lines = [
        f"HV reference point: r~ = ({point})",
        "",
        f"| method | HV: {seeds} | mean | spread | ctrl: {seeds} | mean | spread |",
        "|---|" + "---|" * (2 * len(names) + 4),
    ]
    for label, m in spread["methods"].items():
        cells = []
        for key, fmt in (("hv", ".4f"), ("controllability", ".3f")):
            s = m[key]
            cells += [format(v, fmt) for v in s["per_seed"]]
            cells += [format(s["mean"], fmt), format(s["spread"], fmt)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"| comparison a − b | ΔHV: {seeds} | mean | spread | interval excludes 0 in |",
        "|---|" + "---|" * (len(names) + 3),
    ]
    for label, c in spread["comparisons"].items():
        cells = [format(v, "+.4f") for v in c["per_seed"]]
        cells += [format(c["mean"], "+.4f"), format(c["spread"], ".4f")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {c['holds_in']} of {len(names)} |")
    return "\n".join(lines) + "\n"
