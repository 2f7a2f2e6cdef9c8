"""Outputs of `benchmarks/frontier.py`: the reward-vs-KL frontiers compared, and the PNG, CSV, JSON and markdown.

A point is one evaluation of one run: `method`, `setting`, `step`/`max_steps`, `reward`/`reward_sem`, `kl`/`kl_sem`,
and its cost so far (`train_seconds`, `train_gen_tokens`, `data_seconds`, `data_gen_tokens`).
"""

import csv
import io
import json
import math
import platform
from pathlib import Path

from trl_dpo_ext.atomic import atomic_write


STYLES = {  # method → (marker, color)
    "SFT": ("*", "black"),
    "DPO": ("o", "tab:blue"),
    "RLOO": ("s", "tab:red"),
    "Preferred-FT": ("^", "tab:green"),
}
CSV_COLUMNS = [
    "method", "setting", "step", "max_steps", "reward", "reward_sem", "kl", "kl_sem",
    "train_seconds", "train_gen_tokens", "data_seconds", "data_gen_tokens",
]  # fmt: skip


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point beats on both axes (reward ≥ and KL ≤, one of them strictly), by increasing KL."""

    def beaten(p: dict) -> bool:
        return any(
            q["reward"] >= p["reward"] and q["kl"] <= p["kl"] and (q["reward"], q["kl"]) != (p["reward"], p["kl"])
            for q in points
        )

    return sorted((p for p in points if not beaten(p)), key=lambda p: p["kl"])


def best_at_kl(points: list[dict], kl: float) -> dict:
    """The highest-reward point among `points` whose KL is at most `kl` (`points` must hold one with KL 0)."""
    return max((p for p in points if p["kl"] <= kl), key=lambda p: p["reward"])


def compare(a: str, b: str, points: list[dict]) -> dict:
    """
    Does method `a`'s frontier dominate method `b`'s? For each point on `b`'s frontier, the best reward `a` reaches at
    no more KL (π_ref itself counts), the difference, and whether it exceeds twice the combined standard error (else:
    within noise). `a` dominates `b` when every point of `b`'s frontier has an `a` point at least as good on both axes.
    """
    # Every method can stay at π_ref (no training), so the SFT point belongs to both frontiers.
    a_points = [p for p in points if p["method"] in (a, "SFT")]
    rows = []
    for p in pareto([p for p in points if p["method"] == b]):
        q = best_at_kl(a_points, p["kl"])
        row = {"kl": p["kl"], "setting": p["setting"], "step": p["step"], f"{b}_reward": p["reward"]}
        difference = q["reward"] - p["reward"]
        noise = 2 * math.hypot(q["reward_sem"], p["reward_sem"])
        row.update({f"{a}_reward": q["reward"], "difference": difference, "significant": abs(difference) > noise})
        rows.append(row)
    dominates = all(r["difference"] >= 0 for r in rows)
    return {"a": a, "b": b, "dominates": dominates, "rows": rows}


def compute_ratio(points: list[dict]) -> dict:
    """
    Mean cost of a finished DPO run and of a finished RLOO run, and their ratios: once with the pair building charged
    to every DPO run (the cost of a single run), once without it (the cost of one more β, the pairs being shared).
    """

    def final(method: str) -> list[dict]:
        return [p for p in points if p["method"] == method and p["step"] == p["max_steps"]]

    def average(runs: list[dict], key) -> float:
        return sum(map(key, runs)) / len(runs)

    dpo, rloo = final("DPO"), final("RLOO")
    if not dpo or not rloo:
        return {}
    costs = {
        "dpo_seconds": average(dpo, lambda p: p["train_seconds"] + p["data_seconds"]),
        "dpo_train_seconds": average(dpo, lambda p: p["train_seconds"]),
        "dpo_gen_tokens": average(dpo, lambda p: p["train_gen_tokens"] + p["data_gen_tokens"]),
        "rloo_seconds": average(rloo, lambda p: p["train_seconds"]),
        "rloo_gen_tokens": average(rloo, lambda p: p["train_gen_tokens"]),
    }
    return {
        **costs,
        "seconds_ratio_rloo_over_dpo": costs["rloo_seconds"] / costs["dpo_seconds"],
        "seconds_ratio_rloo_over_one_more_dpo_beta": costs["rloo_seconds"] / costs["dpo_train_seconds"],
        "tokens_ratio_rloo_over_dpo": costs["rloo_gen_tokens"] / costs["dpo_gen_tokens"],
    }


def environment() -> dict[str, str]:
    import bitsandbytes
    import peft
    import torch
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "machine": platform.machine(),
        "torch_threads": str(torch.get_num_threads()),
    }


def write_outputs(results: dict, out: Path) -> None:
    """Add the frontier comparisons to `results` and write frontier.json, .csv, .md and .png to `out` (atomically)."""
    points = results["points"]
    results["comparison"] = {
        "dpo_vs_rloo": compare("DPO", "RLOO", points),
        "rloo_vs_dpo": compare("RLOO", "DPO", points),
        "compute": compute_ratio(points),
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "frontier.json") as handle:
        json.dump(results, handle, indent=1)
    with atomic_write(out / "frontier.csv", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)
    with atomic_write(out / "frontier.md") as handle:
        handle.write(markdown(results))
    plot(points, out / "frontier.png", title=f"Reward vs KL ({results['mode']} mode)")


def markdown(results: dict) -> str:
    """The results table, the frontier comparison and the compute ratio, as markdown."""
    pairs = results["pairs"]
    lines = [
        f"# Reward-vs-KL frontier ({results['mode']} mode)",
        "",
        f"Command: `{results['command']}`; wall time {results['total_seconds'] / 60:.1f} min "
        f"(SFT model {results['sft_seconds']:.0f} s; pairs {pairs['data_seconds']:.0f} s). "
        f"Environment: {', '.join(f'{k} {v}' for k, v in results['environment'].items())}.",
        "",
        f"Preference pairs: {pairs['count']} from {pairs['prompts']} prompts (mean reward chosen "
        f"{pairs['score_chosen']:.3f}, rejected {pairs['score_rejected']:.3f}).",
        "",
        "Reward and KL(π‖π_ref) are means over the held-out samples ± one standard error. Cost columns are counted up "
        "to that evaluation; *pairs* is the one-off sampling that built the preference set (DPO and Preferred-FT).",
        "",
        "| method | setting | step | reward | KL (nats) | train s | generated tokens (training) | pairs s | "
        "generated tokens (pairs) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results["points"]:
        cost = {key: p.get(key, 0) for key in ("train_seconds", "train_gen_tokens", "data_seconds", "data_gen_tokens")}
        lines.append(
            f"| {p['method']} | {p['setting']} | {p['step']}/{p['max_steps']} "
            f"| {p['reward']:.3f} ± {p['reward_sem']:.3f} | {p['kl']:.2f} ± {p['kl_sem']:.2f} "
            f"| {cost['train_seconds']:.0f} | {cost['train_gen_tokens']:,} "
            f"| {cost['data_seconds']:.0f} | {cost['data_gen_tokens']:,} |"
        )
    comparison = results["comparison"]
    for key in ("dpo_vs_rloo", "rloo_vs_dpo"):
        c = comparison[key]
        a, b = c["a"], c["b"]
        lines += [
            "",
            f"## Does {a}'s frontier dominate {b}'s? {'Yes' if c['dominates'] else 'No'}",
            "",
            f"For each point on {b}'s frontier: the best {a} reward at no more KL (π_ref counts, KL 0). "
            "*Significant*: the difference exceeds twice the combined standard error.",
            "",
            f"| {b} point | KL | {b} reward | best {a} reward at ≤ KL | difference | significant |",
            "|---|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            lines.append(
                f"| {r['setting']} step {r['step']} | {r['kl']:.2f} | {r[f'{b}_reward']:.3f} | {r[f'{a}_reward']:.3f} "
                f"| {r['difference']:+.3f} | {'yes' if r['significant'] else 'no'} |"
            )
    compute = comparison["compute"]
    if compute:
        lines += [
            "",
            "## Compute (mean over the finished runs of each method)",
            "",
            f"- DPO: {compute['dpo_seconds']:.0f} s ({compute['dpo_train_seconds']:.0f} s training + the pair "
            f"building), {compute['dpo_gen_tokens']:,.0f} generated tokens, all of them in the pair building.",
            f"- RLOO: {compute['rloo_seconds']:.0f} s, {compute['rloo_gen_tokens']:,.0f} generated tokens.",
            f"- Ratio RLOO / DPO for one run: {compute['seconds_ratio_rloo_over_dpo']:.1f}× wall time, "
            f"{compute['tokens_ratio_rloo_over_dpo']:.1f}× generated tokens. The pairs are built once for every β, "
            f"so one more DPO β costs only its training: RLOO / DPO "
            f"{compute['seconds_ratio_rloo_over_one_more_dpo_beta']:.1f}× wall time, and no new tokens.",
        ]
    return "\n".join(lines) + "\n"


def plot(points: list[dict], path: Path, title: str) -> None:
    """Reward (y) against KL (x), one marker per method, hollow at the halfway checkpoint; lines join each frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method, (marker, color) in STYLES.items():
        mine = [p for p in points if p["method"] == method]
        if not mine:
            continue
        for p in mine:
            final = p["step"] == p["max_steps"]
            ax.errorbar(
                p["kl"],
                p["reward"],
                xerr=p["kl_sem"],
                yerr=p["reward_sem"],
                marker=marker,
                color=color,
                markerfacecolor=color if final else "white",
                markersize=11 if method == "SFT" else 7,
                elinewidth=0.8,
                capsize=2,
                linestyle="none",
            )
            if final and method != "SFT":
                ax.annotate(p["setting"], (p["kl"], p["reward"]), xytext=(5, 4), textcoords="offset points", size=7)
        front = pareto(mine)
        ax.plot([p["kl"] for p in front], [p["reward"] for p in front], color=color, alpha=0.5)
        ax.plot([], [], marker=marker, color=color, label=method)  # the legend shows marker and line together
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL(π ‖ π_ref), nats per completion (symlog scale)")
    ax.set_ylabel("mean reward on held-out prompts")
    ax.set_title(title + "\nfilled: end of training, hollow: halfway; lines: each method's frontier", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
