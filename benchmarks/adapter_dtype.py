"""fp32 adapter master weights against TRL's bf16 cast, on the real model at a DPO learning rate (issue #16).

    python -m benchmarks.adapter_dtype                      # 200 steps per arm at lr 5e-6 (~30 min on 2 CPU cores)
    python -m benchmarks.adapter_dtype --steps 20           # a quick look

Both arms: SmolLM2-135M-Instruct in 4-bit NF4 (fp32 compute) + LoRA r=16 on every linear layer, the same seed (so
the same LoRA init), the bundled `smollm2-concise` pairs, β = 0.1, constant learning rate, the same `DPOConfig`; the
only difference is `adapter_dtype` (`float32`, this package's default, against `bfloat16`, TRL's cast). Each arm runs
in its own process, so its peak RSS is its own. Recorded per arm: the training loss and reward margin of every step,
the held-out implicit-reward accuracy every `--eval_every` steps (TRL's `eval_rewards/accuracies` on the test pairs),
steps/s, peak RSS, and the share of each LoRA matrix's entries that moved from their initial value.

Writes `benchmarks/results/adapter_dtype.json`, `.md` and `.png`.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.results_io import command, write_figure, write_json, write_text


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ARMS = ("float32", "bfloat16")


def run_arm(adapter_dtype: str, steps: int, lr: float, eval_every: int, batch: int, out: Path) -> dict:
    """One arm, in this process: train, and return its curves and costs."""
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, set_seed

    from trl_dpo_ext import DPOConfig, DPOTrainer, load_qlora_model
    from trl_dpo_ext.preference_data import bundled_preference_dataset
    from trl_dpo_ext.smollm2 import smollm2_path

    set_seed(0)
    path = str(smollm2_path())
    data = bundled_preference_dataset("smollm2-concise")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_qlora_model(
        path, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), compute_dtype="float32"
    )
    args = DPOConfig(
        output_dir=str(out / adapter_dtype),
        adapter_dtype=adapter_dtype,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_steps=steps,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=8,
        eval_strategy="steps",
        eval_steps=eval_every,
        logging_steps=1,
        max_length=256,
        beta=0.1,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_pin_memory=False,
        save_strategy="no",
        report_to="none",
        save_metrics_plot=False,
        disable_tqdm=True,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"], processing_class=tokenizer
    )
    initial = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    # Step 0: the policy is the reference, so every margin is 0 and accuracy (margin > 0) reads 0; train() resets
    # log_history, hence kept here.
    step0 = trainer.evaluate()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if steps % eval_every:
        trainer.evaluate()
    moved = {"lora_A": [], "lora_B": []}
    for name, param in trainer.model.named_parameters():
        if name in initial:
            kind = "lora_A" if "lora_A" in name else "lora_B"
            moved[kind].append((param.detach().float() != initial[name]).float().mean().item())
    history = trainer.state.log_history
    return {
        "adapter_dtype": adapter_dtype,
        "trainable_dtype": str(next(p.dtype for p in trainer.model.parameters() if p.requires_grad)),
        "steps": steps,
        "seconds": seconds,
        "steps_per_second": steps / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss": [(h["step"], h["loss"]) for h in history if "loss" in h],
        "margin": [(h["step"], h["rewards/margins"]) for h in history if "rewards/margins" in h and "loss" in h],
        **{
            f"heldout_{name}": [(0, step0[f"eval_{key}"])]
            + [(h["step"], h[f"eval_{key}"]) for h in history if "eval_loss" in h]
            for name, key in (("accuracy", "rewards/accuracies"), ("loss", "loss"), ("margin", "rewards/margins"))
        },
        "moved_fraction_mean": {k: sum(v) / len(v) for k, v in moved.items()},
        "moved_fraction_min": {k: min(v) for k, v in moved.items()},
        "torch": torch.__version__,
    }


def report(results: list[dict], lr: float, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for r in results:
        for key in ("heldout_accuracy", "heldout_loss", "heldout_margin"):
            r[key] = sorted(dict(r[key]).items())  # one point per step
    for r in results:
        label = f"{r['adapter_dtype']} masters"
        for ax, key in zip(axes, ("loss", "margin", "heldout_loss", "heldout_accuracy")):
            steps, values = zip(*r[key])
            if key.startswith("heldout"):
                ax.plot(steps, values, marker="o", label=label)
            else:  # one point per step is noisy: a 10-step running mean, raw points faint
                ax.plot(steps, values, alpha=0.25)
                ax.plot(steps, _running_mean(values, 10), label=label, color=ax.lines[-1].get_color())
    titles = (
        "training loss",
        "reward margin (train batch)",
        "held-out loss (16 pairs)",
        "held-out accuracy (16 pairs)",
    )
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.suptitle(f"SmolLM2-135M-Instruct, 4-bit NF4 + LoRA r=16, lr {lr:g} constant, {batch} pairs/step")
    fig.tight_layout()
    write_figure(fig, RESULTS / "adapter_dtype.png", dpi=100)

    eval_steps = [step for step, _ in results[0]["heldout_accuracy"] if step > 0]  # step 0: every margin is 0
    at = "/".join(map(str, eval_steps))
    lines = [
        "| adapter masters | steps/s | peak RSS (MiB) | train loss (mean of last 20 steps) | train margin (last 20) "
        f"| held-out loss at steps {at} | held-out margin at {eval_steps[-1]} "
        f"| held-out accuracy at steps {at} | lora_A entries moved | lora_B entries moved |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        loss = [v for _, v in r["loss"]][-20:]
        margin = [v for _, v in r["margin"]][-20:]
        accuracy = " / ".join(f"{value:.3f}" for step, value in r["heldout_accuracy"] if step > 0)
        heldout_loss = " / ".join(f"{value:.4f}" for step, value in r["heldout_loss"] if step > 0)
        lines.append(
            f"| {r['adapter_dtype']} ({r['trainable_dtype']}) | {r['steps_per_second']:.3f} | {r['peak_rss_mib']:.0f} "
            f"| {sum(loss) / len(loss):.4f} | {sum(margin) / len(margin):.4f} | {heldout_loss} "
            f"| {r['heldout_margin'][-1][1]:.4f} | {accuracy} "
            f"| {100 * r['moved_fraction_mean']['lora_A']:.1f} % | {100 * r['moved_fraction_mean']['lora_B']:.1f} % |"
        )
    write_text(RESULTS / "adapter_dtype.md", "\n".join(lines) + "\n")


def _running_mean(values, window: int) -> list[float]:
    windows = [values[max(0, i - window + 1) : i + 1] for i in range(len(values))]
    return [sum(w) / len(w) for w in windows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: run one arm in this process
    parser.add_argument("--out", default="/tmp/adapter_dtype_bench", help="where the arms' output_dirs go")
    parser.add_argument("--report_only", action="store_true", help="rewrite the report from the arms in --out")
    args = parser.parse_args()
    out = Path(args.out)
    if args.arm:
        result = run_arm(args.arm, args.steps, args.lr, args.eval_every, args.batch, out)
        write_json(out / f"{args.arm}.json", result, indent=None)
        return
    out.mkdir(parents=True, exist_ok=True)
    for arm in ARMS if not args.report_only else ():
        flags = ["--steps", str(args.steps), "--lr", str(args.lr), "--batch", str(args.batch)]
        flags += ["--eval_every", str(args.eval_every), "--out", str(out), "--arm", arm]
        subprocess.run([sys.executable, "-m", "benchmarks.adapter_dtype", *flags], check=True)
    results = [json.loads((out / f"{arm}.json").read_text()) for arm in ARMS]
    run = command("adapter_dtype", "--steps", args.steps, "--lr", f"{args.lr:g}", "--batch", args.batch)
    # Before `report`, which sorts the held-out curves in place.
    write_json(RESULTS / "adapter_dtype.json", {"command": run, "results": results})
    report(results, args.lr, args.batch)


if __name__ == "__main__":
    main()
