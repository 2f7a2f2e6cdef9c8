"""Outputs of `benchmarks.frontier`: the reward-vs-KL frontiers compared, and the PNG, CSV, JSON and markdown.

A point is one evaluation of one run: `method`, `setting`, `checkpoint` ("half", "end", "round r"), `final`, `step`,
`reward`/`reward_sem`, `kl`/`kl_sem`, and its cost so far (`train_seconds`, `train_gen_tokens`, `data_seconds`,
`data_gen_tokens`; best-of-k: `samples_per_query`, `inference_seconds`, `inference_gen_tokens`). Over several seeds a
point is the mean of the seeds' points, its `*_sem` the standard error over the seeds.
"""

import math
import platform
from pathlib import Path

from benchmarks.results_io import write_csv, write_figure, write_results


STYLES = {  # method → (marker, color)
    "SFT": ("*", "black"),
    "best-of-k": ("x", "tab:gray"),
    "DPO": ("o", "tab:blue"),
    "iterative DPO": ("D", "tab:purple"),
    "RLOO": ("s", "tab:red"),
    "Preferred-FT": ("^", "tab:green"),
}
CSV_COLUMNS = [
    "method", "setting", "checkpoint", "final", "step", "reward", "reward_sem", "kl", "kl_sem", "seeds",
    "train_seconds", "train_gen_tokens", "data_seconds", "data_gen_tokens", "samples_per_query",
]  # fmt: skip
# Who is compared with whom: each pair both ways.
COMPARISONS = [("DPO", "RLOO"), ("iterative DPO", "DPO"), ("iterative DPO", "RLOO"), ("best-of-k", "iterative DPO")]
AVERAGED = (
    "step", "reward", "kl", "train_seconds", "train_gen_tokens", "data_seconds", "data_gen_tokens",
    "inference_seconds", "inference_gen_tokens",
)  # fmt: skip


def aggregate_seeds(per_seed: list[dict]) -> dict:
    """
    The seeds' runs as one: each point (method, setting, checkpoint) the mean over the seeds, `reward_sem`/`kl_sem`
    the standard error over the seeds (with one seed: the point's own standard error over its samples); the pairs'
    statistics and the SFT time averaged; the seeds' own points and wall times kept.
    """
    groups: dict[tuple, list[dict]] = {}
    for run in per_seed:
        for p in run["points"]:
            groups.setdefault((p["method"], p["setting"], p["checkpoint"]), []).append(p)
    points = []
    for (method, setting, checkpoint), same in groups.items():
        point = {"method": method, "setting": setting, "checkpoint": checkpoint, "final": same[0]["final"]}
        for key in AVERAGED:
            if key in same[0]:
                point[key] = mean([p[key] for p in same])
        if "samples_per_query" in same[0]:
            point["samples_per_query"] = same[0]["samples_per_query"]
        for key in ("reward", "kl"):
            values = [p[key] for p in same]
            point[f"{key}_sem"] = same[0][f"{key}_sem"] if len(same) == 1 else sem(values)
            point[f"{key}_seeds"] = values
        point["seeds"] = len(same)
        points.append(point)
    pairs = {key: mean([run["pairs"][key] for run in per_seed]) for key in per_seed[0]["pairs"]}
    return {
        "points": points,
        "pairs": pairs,
        "sft_seconds": mean([run["sft_seconds"] for run in per_seed]),
        "seed_seconds": {str(run["seed"]): run["total_seconds"] for run in per_seed},
        "per_seed": per_seed,
    }


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def sem(values: list[float]) -> float:
    """Standard error of the mean (sample standard deviation / √n)."""
    m = mean(values)
    return (sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point beats on both axes (reward ≥ and KL ≤, one of them strictly), by increasing KL."""

    def beaten(p: dict) -> bool:
        return any(
            q["reward"] >= p["reward"] and q["kl"] <= p["kl"] and (q["reward"], q["kl"]) != (p["reward"], p["kl"])
            for q in points
        )

    return sorted((p for p in points if not beaten(p)), key=lambda p: p["kl"])


def best_at_kl(points: list[dict], kl: float) -> dict:
    """
    The highest-reward point among `points` whose KL is at most `kl` (`points` must hold one with KL 0). A KL estimated
    from few samples can come out below 0 (the true KL cannot): it counts as 0, so π_ref is always within reach.
    """
    return max((p for p in points if p["kl"] <= max(kl, 0.0)), key=lambda p: p["reward"])


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


def method_costs(points: list[dict]) -> list[dict]:
    """
    What a finished run of each method cost, averaged over its settings: wall time (training, plus the pair building
    for the offline methods, plus the rounds' sampling for iterative DPO, which is inside its training time) and
    generated tokens. Best-of-k trains nothing; its cost is k samples per query at inference.
    """
    rows = []
    for method in STYLES:
        final = [p for p in points if p["method"] == method and p["final"]]
        if not final or method == "SFT":
            continue
        rows.append(
            {
                "method": method,
                "runs": len(final),
                "seconds": mean([p["train_seconds"] + p["data_seconds"] for p in final]),
                "train_seconds": mean([p["train_seconds"] for p in final]),
                "gen_tokens": mean([p["train_gen_tokens"] + p["data_gen_tokens"] for p in final]),
                "samples_per_query": [p.get("samples_per_query", 1) for p in final],
                "inference_gen_tokens": [p.get("inference_gen_tokens", 0) for p in final],
            }
        )
    return rows


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
        "vaderSentiment": _version("vaderSentiment"),  # the movies task's reward
        "machine": platform.machine(),
        "torch_threads": str(torch.get_num_threads()),
    }


def write_outputs(results: dict, out: Path) -> None:
    """Add the frontier comparisons to `results` and write frontier.json, .csv, .md and .png to `out` (atomically)."""
    points = results["points"]
    methods = {p["method"] for p in points}
    results["comparison"] = [
        compare(x, y, points) for a, b in COMPARISONS for x, y in ((a, b), (b, a)) if {x, y} <= methods
    ]
    results["costs"] = method_costs(points)
    write_results(out, "frontier", results, markdown(results))
    write_csv(out / "frontier.csv", points, CSV_COLUMNS)
    title = f"Reward vs KL ({results['mode']} mode, {len(results['seeds'])} seed(s))"
    plot(points, out / "frontier.png", title=title)


def markdown(results: dict) -> str:
    """The results table, the frontier comparisons and each method's cost, as markdown."""
    pairs, seeds = results["pairs"], results["seeds"]
    seed_times = ", ".join(f"seed {k} {v / 60:.1f} min" for k, v in results["seed_seconds"].items())
    threads = results["environment"]["torch_threads"]
    lines = [
        f"# Reward-vs-KL frontier ({results['mode']} mode)",
        "",
        f"Command: `{results['command']}`; wall time {results['total_seconds'] / 60:.1f} min for {len(seeds)} "
        f"seed(s) {seeds}, {results['jobs']} at a time, {threads} thread(s) each ({seed_times}; "
        f"π_ref: {results['sft_seconds']:.0f} s; pairs {pairs['data_seconds']:.0f} s). "
        f"Environment: {', '.join(f'{k} {v}' for k, v in results['environment'].items())}.",
        "",
        f"Preference pairs (mean over seeds): {pairs['count']:.0f} from {pairs['prompts']:.0f} prompts (mean reward "
        f"chosen {pairs['score_chosen']:.3f}, rejected {pairs['score_rejected']:.3f}).",
        "",
        "Reward and KL(π‖π_ref) on the held-out prompts: the mean over the seeds ± one standard error over the seeds "
        "(one seed: over its samples). Best-of-k's KL is the bound log k − (k−1)/k. Cost columns are counted up to "
        "that evaluation (means over the seeds); *pairs* is the one-off sampling that built the preference set (DPO "
        "and Preferred-FT); iterative DPO's and RLOO's sampling is inside their training time.",
        "",
        "| method | setting | checkpoint | step | reward | KL (nats) | train s | generated tokens (training) "
        "| pairs s | generated tokens (pairs) | samples per query |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results["points"]:
        cost = {key: p.get(key, 0) for key in ("train_seconds", "train_gen_tokens", "data_seconds", "data_gen_tokens")}
        lines.append(
            f"| {p['method']} | {p['setting']} | {p['checkpoint']} | {p['step']:.0f} "
            f"| {p['reward']:.3f} ± {p['reward_sem']:.3f} | {p['kl']:.2f} ± {p['kl_sem']:.2f} "
            f"| {cost['train_seconds']:.0f} | {cost['train_gen_tokens']:,.0f} "
            f"| {cost['data_seconds']:.0f} | {cost['data_gen_tokens']:,.0f} | {p.get('samples_per_query', 1)} |"
        )
    for c in results["comparison"]:
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
                f"| {r['setting']} step {r['step']:.0f} | {r['kl']:.2f} | {r[f'{b}_reward']:.3f} "
                f"| {r[f'{a}_reward']:.3f} | {r['difference']:+.3f} | {'yes' if r['significant'] else 'no'} |"
            )
    lines += [
        "",
        "## Compute: one finished run of each method (mean over its settings and the seeds)",
        "",
        "| method | runs | wall time s | of which training s | generated tokens | samples per query at inference |",
        "|---|---|---|---|---|---|",
    ]
    for c in results["costs"]:
        if c["method"] == "best-of-k":
            inference = ", ".join(
                f"k={k}: {tokens:,.0f} tokens" for k, tokens in zip(c["samples_per_query"], c["inference_gen_tokens"])
            )
            lines.append(f"| best-of-k | {c['runs']} | 0 | 0 | 0 | {inference} (for the held-out queries) |")
        else:
            lines.append(
                f"| {c['method']} | {c['runs']} | {c['seconds']:.0f} | {c['train_seconds']:.0f} "
                f"| {c['gen_tokens']:,.0f} | 1 |"
            )
    return "\n".join(lines)


def plot(points: list[dict], path: Path, title: str) -> None:
    """
    Reward (y) against KL (x), one marker per method, hollow before the end of training; error bars ± one standard
    error; lines join each method's frontier. Left: every method; right: the trained methods only, zoomed (best-of-k
    would otherwise squash them).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, skip in zip(axes, ((), ("best-of-k",))):
        for method, (marker, color) in STYLES.items():
            mine = [p for p in points if p["method"] == method]
            if not mine or method in skip:
                continue
            for p in mine:
                ax.errorbar(
                    p["kl"],
                    p["reward"],
                    xerr=p["kl_sem"],
                    yerr=p["reward_sem"],
                    marker=marker,
                    color=color,
                    markerfacecolor=color if p["final"] else "white",
                    markersize=11 if method == "SFT" else 7,
                    elinewidth=0.8,
                    capsize=2,
                    linestyle="none",
                )
                if p["final"] and method != "SFT":
                    ax.annotate(
                        p["setting"], (p["kl"], p["reward"]), xytext=(5, 4), textcoords="offset points", size=7
                    )
            front = pareto(mine)
            ax.plot([p["kl"] for p in front], [p["reward"] for p in front], color=color, alpha=0.5)
            ax.plot([], [], marker=marker, color=color, label=method)  # the legend shows marker and line together
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("KL(π ‖ π_ref), nats per completion (symlog scale)")
        ax.set_ylabel("mean reward on held-out prompts")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_title("every method", fontsize=10)
    axes[1].set_title("trained methods (zoom)", fontsize=10)
    fig.suptitle(
        title + "\nfilled: end of training, hollow: halfway or an earlier round; lines: each method's frontier",
        fontsize=10,
    )
    fig.tight_layout()
    write_figure(fig, path, dpi=110)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
