"""The LM head on the CPU (issue #18): TRL's fused head against the model's own projection + `head_statistics`.

    python -m benchmarks.lm_head_cpu
    python -m benchmarks.lm_head_cpu --out benchmarks/results

For the answer positions of one step (`positions` rows of `hidden`) and a vocabulary of `vocab` entries, forward +
backward (gradient to the hidden states, as in LoRA training: the head itself is frozen) and forward alone without
gradients (the reference's pass), of:

- TRL's fused head (`trl.kernels.ChunkedLogProbFunction`, what `add_fused_lm_head` runs): off CUDA/XPU its tiles fall
  back to torch ops, a dozen passes over each `(positions, vocab)` tile; with the four outputs `trl.DPOTrainer` asks
  for (log-probs, entropy, mean logit, top-1) and with the log-probs alone;
- ours on the CPU (`trl_dpo_ext.logps.head_statistics` on the model's own `hidden @ W.T`): with the statistics (the
  policy) and without (the reference).

Shapes: the tiny benchmark model's head (32k vocabulary, hidden 256) at the answer positions of workload (a) (4 pairs
of ~20-token answers: 160 positions) and SmolLM2-135M-Instruct's (49k vocabulary, hidden 576) at those of the real
chat pairs (4 pairs of ~60-token answers: 480 positions). Medians of `--repeats` timed calls after 3 warm-up calls.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.results_io import command, write_results


SHAPES = {"tiny-32k (a)": (160, 256, 32000), "smollm2 (s)": (480, 576, 49152)}
STATISTICS = ("log_probs", "entropy", "mean_logits", "is_top1")


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(positions: int, hidden_size: int, vocab: int, repeats: int) -> dict[str, float]:
    from trl.kernels import ChunkedLogProbFunction

    from trl_dpo_ext.logps import head_statistics

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(positions, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5
    targets = torch.randint(0, vocab, (positions,), generator=generator)

    def trl_head(outputs, grad):
        h = hidden.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            log_probs = ChunkedLogProbFunction.apply(h, weight, None, targets, 1.0, 32768, None, 1.0, outputs)[0]
            if grad:
                log_probs.sum().backward()

    def our_head(with_statistics, grad):
        h = hidden.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            log_probs = head_statistics(h @ weight.T, targets, with_statistics)["log_probs"]
            if grad:
                log_probs.sum().backward()

    return {
        "trl_policy_fwd_bwd_ms": _median_ms(lambda: trl_head(STATISTICS, True), repeats),
        "ours_policy_fwd_bwd_ms": _median_ms(lambda: our_head(True, True), repeats),
        "trl_reference_fwd_ms": _median_ms(lambda: trl_head(STATISTICS, False), repeats),
        "trl_reference_log_probs_only_fwd_ms": _median_ms(lambda: trl_head(("log_probs",), False), repeats),
        "ours_reference_fwd_ms": _median_ms(lambda: our_head(False, False), repeats),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results = {name: measure(*shape, args.repeats) for name, shape in SHAPES.items()}
    lines = [
        f"torch {torch.__version__} · {torch.get_num_threads()} threads · median of {args.repeats} calls",
        "",
        "| head shape (positions × hidden → vocab) | policy fwd + bwd: TRL / ours | reference fwd: TRL (4 outputs) "
        "/ TRL (log-probs only) / ours |",
        "|---|---|---|",
    ]
    for name, r in results.items():
        positions, hidden_size, vocab = SHAPES[name]
        lines.append(
            f"| {name}: {positions} × {hidden_size} → {vocab} "
            f"| {r['trl_policy_fwd_bwd_ms']:.1f} / {r['ours_policy_fwd_bwd_ms']:.1f} ms "
            f"({r['trl_policy_fwd_bwd_ms'] / r['ours_policy_fwd_bwd_ms']:.1f}×) "
            f"| {r['trl_reference_fwd_ms']:.1f} / {r['trl_reference_log_probs_only_fwd_ms']:.1f} / "
            f"{r['ours_reference_fwd_ms']:.1f} ms ({r['trl_reference_fwd_ms'] / r['ours_reference_fwd_ms']:.1f}×) |"
        )
    report = "\n".join(lines)
    print(report)
    if args.out:
        header = f"`{command('lm_head_cpu')}`"
        write_results(args.out, "lm_head_cpu", results, report, header=header, final_newline=True)


if __name__ == "__main__":
    main()
