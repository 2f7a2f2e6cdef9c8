"""Where a training step of ours goes on the CPU (issue #18): torch profiler over timed steps, grouped two ways.

    python -m benchmarks.profile_step                      # workload (a) prompt-heavy, cold reference
    python -m benchmarks.profile_step --workload c         # (a) with a warm reference cache
    python -m benchmarks.profile_step --out benchmarks/results

The model, data and `DPOConfig` are those of a `bench_throughput` CPU worker of ours at its default flags (the
32k-vocabulary NF4 Llama, batch 4, ~100 tokens per sequence, fp32, LoRA r=16 all-linear). Two tables, both as a
share of the profiled steps' wall time:

- **regions** (inclusive time, so a region holds the ops it ran): the collator, building the 4D layout mask (once
  per forward: policy and reference), the CPU head's log-softmax and statistics (`logps.head_statistics`, forward
  only), the reference forward, metric gathering, the optimizer step — marked with `record_function` by wrapping
  those functions here, not in the library;
- **op classes** (self time of every op, forward and backward): attention (SDPA), the 4-bit weight dequantization,
  matrix products, the LM head's log-softmax (TRL's chunked autograd function or a log-sum-exp; self time only: its
  matmuls count as matrix products), dtype casts and copies, elementwise ops, the rest.
"""

import argparse
import functools
import re
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks import bench_throughput
from benchmarks.bench_throughput import WORKLOADS
from benchmarks.results_io import command, write_results


# Self-time op classes, first match wins. Backward nodes carry their forward op's name.
OP_CLASSES = [
    ("attention (SDPA, fwd + bwd)", r"scaled_dot_product|ScaledDotProduct|_efficient_attention|flash_attention"),
    ("4-bit dequantize (bitsandbytes)", r"bitsandbytes|dequantize|quantize_4bit"),
    ("matrix products (mm, addmm, bmm, linear)", r"aten::(mm|addmm|bmm|matmul|linear)$|MmBackward|AddmmBackward"),
    # TRL's fused LM head (`fused_lm_head=True`) never calls the lm_head module: its own chunked autograd function.
    (
        "LM head log-softmax (TRL's chunked log-prob or ours, fwd + bwd)",
        r"ChunkedLogProb|[Ll]og_?[Ss]oftmax|[Ll]ogsumexp",
    ),
    ("dtype casts and copies", r"aten::(to|_to_copy|copy_|contiguous|clone)$"),
    ("elementwise (mul, add, silu, rms norm, ...)", r"aten::(mul|add|sub|div|silu|pow|rsqrt|mean|neg|cat|where)"),
]


def _mark(owner, name: str, label: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def marked(*args, **kwargs):
        with record_function(label):
            return original(*args, **kwargs)

    setattr(owner, name, marked)


def mark_regions(trainer) -> list[str]:
    """Wrap the functions whose inclusive time the region table reports; returns the labels."""
    import trl_dpo_ext.logps as logps
    import trl_dpo_ext.reference as reference
    from trl_dpo_ext.collator import PreferenceCollator

    _mark(PreferenceCollator, "torch_call", "## collator")
    _mark(logps, "_layout_mask", "## layout mask (4D, per forward)")
    _mark(logps, "head_statistics", "## LM head log-softmax (forward; the CPU head)")
    _mark(reference.Reference, "token_logps", "## reference forward")
    _mark(type(trainer), "_record_metrics", "## metrics (gather + record)")
    _mark(type(trainer), "training_step", "## training_step (forward + backward)")
    return [
        "## training_step (forward + backward)",
        "## reference forward",
        "## layout mask (4D, per forward)",
        "## LM head log-softmax (forward; the CPU head)",
        "## collator",
        "## metrics (gather + record)",
        "## optimizer step",
    ]


def _enter(label: str):
    context = record_function(label)
    context.__enter__()
    return context


def _exit(context) -> None:
    context.__exit__(None, None, None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["a", "b", "c"], default="a")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "trl_dpo_ext_bench")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from transformers import TrainerCallback

    import trl_dpo_ext

    # The worker `bench_throughput` would run for ours on this workload, its other flags at their defaults.
    worker = ["--worker", "--impl", "ours", "--workload", args.workload, "--workdir", str(args.workdir)]
    worker += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    worker = bench_throughput.parse_args(worker)
    bench_throughput.prepare_cpu(worker)
    base, tokenizer, rows, settings = bench_throughput.cpu_inputs(worker)
    config = bench_throughput.training_config("ours", args.workload, settings)
    trainer = bench_throughput._trainer(trl_dpo_ext.DPOTrainer, config, base, tokenizer, rows)
    labels = mark_regions(trainer)

    schedule = torch.profiler.schedule(wait=args.warmup, warmup=0, active=args.steps, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule) as prof:

        class Step(TrainerCallback):
            def on_pre_optimizer_step(self, *a, **k):
                self.optimizer_range = _enter("## optimizer step")

            def on_optimizer_step(self, *a, **k):
                _exit(self.optimizer_range)

            def on_step_end(self, *a, **k):
                prof.step()

        trainer.add_callback(Step())
        trainer.train()
    events = prof.key_averages()
    step_us = None
    rows_out = {}
    for event in events:
        if event.key.startswith("ProfilerStep#"):
            step_us = (step_us or 0) + event.cpu_time_total
        if event.key in labels:
            rows_out[event.key] = event.cpu_time_total
    # ProfilerStep#N runs from one step's end to the next: data loading, collator, forward, backward, optimizer.
    step_us = step_us or sum(e.self_cpu_time_total for e in events)
    classes = dict.fromkeys([name for name, _ in OP_CLASSES] + ["other ops"], 0.0)
    for event in (e for e in events if not e.key.startswith(("ProfilerStep#", "## "))):
        name = next((n for n, pattern in OP_CLASSES if re.search(pattern, event.key)), "other ops")
        classes[name] += event.self_cpu_time_total
    ms_per_step = step_us / 1000 / args.steps
    lines = [
        f"workload ({args.workload}) {WORKLOADS[args.workload][0]} · {args.steps} profiled steps after {args.warmup} "
        f"· {ms_per_step:.0f} ms per step under the profiler · torch {torch.__version__}",
        "",
        "| region (inclusive) | ms / step | share of step |",
        "|---|---|---|",
    ]
    for label in labels:
        value = rows_out.get(label, 0.0)
        lines.append(f"| {label[3:]} | {value / 1000 / args.steps:.0f} | {100 * value / step_us:.1f} % |")
    lines += ["", "| op class (self time, fwd + bwd) | ms / step | share of step |", "|---|---|---|"]
    for name, value in classes.items():
        lines.append(f"| {name} | {value / 1000 / args.steps:.0f} | {100 * value / step_us:.1f} % |")
    ops = [e for e in events if not e.key.startswith(("ProfilerStep#", "## "))]
    top = sorted(ops, key=lambda e: -e.self_cpu_time_total)
    lines += ["", "| top ops by self time | ms / step | share of step |", "|---|---|---|"]
    for event in top[:12]:
        lines.append(
            f"| `{event.key}` | {event.self_cpu_time_total / 1000 / args.steps:.0f} "
            f"| {100 * event.self_cpu_time_total / step_us:.1f} % |"
        )
    report = "\n".join(lines)
    print(report)
    if args.out:
        record = {"ms_per_step": ms_per_step, "regions_us": rows_out, "op_classes_us": classes}
        header = f"`{command('profile_step', '--workload', args.workload)}`"
        write_results(args.out, f"profile_cpu_{args.workload}", record, report, header=header)


if __name__ == "__main__":
    main()
