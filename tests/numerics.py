"""Tolerances for comparing one fp32 computation done two ways, derived from the computation, not from a machine.

Why the same math gives different floats. Floating-point addition is not associative, and the order of every long
reduction depends on things a test does not fix: the batch shape (MKL / oneDNN pick their GEMM blocking from M, N and
K and the CPU's ISA), the layout (a packed row is a longer sequence for SDPA's blocked softmax), the thread count
(how a reduction is split), and ATen's vector width (8 fp32 lanes with AVX2, 16 with AVX-512). A test that compares
two such computations can only ask for agreement up to the rounding error of the computation.

The bound used here (Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput.
41(5), 2019, Thm 2.4). Model: every elementary operation rounds with a relative error δ, |δ| ≤ u = 2^-24 (fp32 unit
roundoff), the δ independent with mean zero. Then a quantity that went through n rounded operations in sequence (a
sum or dot product of length n, or a chain of them) has a relative error at most

    γ̃_n(λ) = exp(λ·√n·u + n·u²/(1 − u)) − 1  ≈  λ·√n·u

with probability at least 1 − 2n·exp(−λ²(1 − u)²/2); λ = 7 makes that ≥ 1 − 10⁻⁶ for every n used here. (The
deterministic worst case, γ_n = n·u / (1 − n·u), is never attained in practice and would hide real differences.) Two
computations that each carry that error differ by at most twice it.

- A sum of L terms of one sign (per-token log-probs are all ≤ 0, so Σ|ℓ_t| = |Σ ℓ_t|), in any order: relative error
  `sum_rtol(L)` = 2·γ̃_L of |the sum|.
- A forward pass: the error of a per-token log-prob is that of the chain of reductions it went through (RMSNorm's
  mean of squares, every projection, the attention scores, softmax normaliser and P·V over the context, the MLP, the
  LM head and the log-sum-exp over the vocabulary); `forward_reductions` counts their lengths for a Llama config and
  `forward_rtol` = 2·γ̃_n of that count. Assumption: the network is well conditioned stage by stage (an RMSNorm in
  front of every block), so relative errors add up rather than grow — checked by the measured differences, which sit
  two to three orders of magnitude below these bounds (see `NUMERICS_REPORT` below).
- A sequence log-prob Σ_t ℓ_t: every token carries `forward_rtol` (correlated across the tokens of a row, which share
  a prefix and the weights, so added linearly), then the sum: `sequence_logps_tol`.
- A DPO loss: −log σ(β·m) has a derivative of magnitude ≤ 1 (1/2 at m = 0), m = (π_c − ref_c) − (π_r − ref_r):
  `sigmoid_loss_tol` = β · mean over pairs of the four sequence tolerances. The hinge loss max(0, 1 − β·m) is
  1-Lipschitz in β·m too. IPO's (m̄ − 1/(2β))², on the per-token margin m̄, is not Lipschitz: `ipo_loss_tol`.
- A mean of logged metrics: n − 1 additions and a division, relative to the mean of the |terms|: `mean_rtol`.
- A gradient: a backward pass is a second chain as long as the forward plus the sum over every token of the batch
  (the weight gradient); compared norm-wise, relative to the largest entry of the tensor: `backward_rtol`.

What stays exact. Results of the same code path on the same shapes in one process (bit-identical base tensors,
token counts, a value read back from a cache), and small-integer arithmetic, are compared with `==`. So is a step-1
loss where the policy (a fresh adapter, B = 0, adds exactly 0) and the reference run the same kernels on the same
batch: the margins are exactly 0 and the loss is `zero_margin_loss`, log 2 in fp32.

Out of this model: bitsandbytes' CPU inference path. On a CPU with AVX512-BF16, `bnb.nn.Linear4bit` repacks its
weights and computes in bf16 (u = 2^-9) whenever it runs in eval mode without grad; `fp32_4bit_kernels` turns that
off for a model a test builds, so that an fp32 test compares fp32 with fp32 on every CPU.

Set `NUMERICS_REPORT=/some/file.jsonl` to make every check below append what it measured (the largest difference, the
tolerance, their ratio) to that file: that is how the margins in the report of issue #15 were measured.
"""

import json
import math
import os

import torch


U = 2.0**-24  # fp32 unit roundoff: |fl(x) − x| ≤ u·|x|
LAMBDA = 7.0  # confidence of the probabilistic bound: failure probability ≤ 2n·exp(−λ²/2) < 1e-6 for n ≤ 10⁴


def gamma(n: int, u: float = U, lam: float = LAMBDA) -> float:
    """γ̃_n(λ): relative error bound of n rounded operations in sequence (Higham & Mary 2019, Thm 2.4)."""
    return math.expm1(lam * math.sqrt(n) * u + n * u * u / (1 - u))


def sum_rtol(terms: int) -> float:
    """Two summation orders of `terms` terms of one sign: relative difference ≤ 2·γ̃_L."""
    return 2 * gamma(max(terms - 1, 1))


def forward_reductions(config, seq_len: int, lora_r: int = 0) -> int:
    """Σ of the reduction lengths a per-token log-prob goes through in a Llama-style forward over `seq_len` tokens."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    per_layer = (
        hidden  # input RMSNorm: mean of squares
        + hidden  # q / k / v projections (+ the LoRA path: K = hidden, then r)
        + lora_r
        + head_dim  # attention scores q·k
        + 2 * seq_len  # softmax normaliser and P·V over the context
        + config.num_attention_heads * head_dim  # o projection
        + hidden  # post-attention RMSNorm
        + hidden  # gate / up projections
        + config.intermediate_size  # down projection
    )
    return layers * per_layer + hidden + hidden + config.vocab_size  # final norm, LM head, log-sum-exp over the vocab


def forward_rtol(config, seq_len: int, lora_r: int = 0) -> float:
    """Relative difference of one per-token quantity (log-prob, logit) computed by two kernel orders: 2·γ̃_n."""
    return 2 * gamma(forward_reductions(config, seq_len, lora_r))


def backward_rtol(config, seq_len: int, tokens: int, lora_r: int = 0) -> float:
    """Relative (to the tensor's largest entry) difference of a weight gradient: forward + backward chain, then the
    sum over the `tokens` positions of the batch."""
    return 2 * gamma(2 * forward_reductions(config, seq_len, lora_r) + tokens)


def sequence_logps_tol(logps: torch.Tensor, lengths, config, seq_len: int, lora_r: int = 0) -> torch.Tensor:
    """Per-sequence tolerance of Σ_t ℓ_t (all ℓ_t ≤ 0, so Σ|ℓ_t| = |Σ ℓ_t|): (forward_rtol + sum_rtol(L))·|Σ ℓ_t|."""
    lengths = torch.as_tensor(lengths, dtype=torch.float64)
    rtol = forward_rtol(config, seq_len, lora_r) + torch.tensor([sum_rtol(int(n)) for n in lengths.tolist()])
    return rtol * logps.detach().double().abs()


def sigmoid_loss_tol(beta: float, *sequence_tols: torch.Tensor) -> float:
    """Tolerance of the mean sigmoid (or hinge) DPO loss from the tolerances of the sequence log-probs in its margin
    (|d loss/d βm| ≤ 1).

    `sequence_tols`: tensors of shape (pairs,), one per log-prob in the margin (chosen, rejected, ref chosen, ...)."""
    per_pair = sum(t.double() for t in sequence_tols)
    return beta * per_pair.mean().item()


def ipo_loss_tol(beta: float, margins: torch.Tensor, margin_tols: torch.Tensor) -> float:
    """Tolerance of the mean IPO loss (m̄ − c)², c = 1/(2β), from each pair's per-token margin m̄ and its tolerance δ
    (the sequence tolerances of its four log-probs, each divided by its answer length): for |e| ≤ δ,
    |(m̄ + e − c)² − (m̄ − c)²| = |2(m̄ − c)·e + e²| ≤ 2|m̄ − c|·δ + δ²."""
    slack = (margins.double() - 1 / (2 * beta)).abs()
    margin_tols = margin_tols.double()
    return (2 * slack * margin_tols + margin_tols**2).mean().item()


def mean_rtol(terms: int, roundings: int = 0) -> float:
    """Two fp32 evaluations of the mean of `terms` values that agree in exact arithmetic (a mean of differences
    against a difference of means, say), each value the result of at most `roundings` rounded elementwise operations
    on exact fp32 inputs: each side is a chain of ≤ terms + roundings roundings, whose error is relative to the mean of
    the |values| (not to |the mean|, for values of mixed signs), so they differ by ≤ 2·γ̃_{terms + roundings} times
    that mean of |values|."""
    return 2 * gamma(terms + roundings)


def _report(what: str, diff: float, tol: float) -> None:
    path = os.environ.get("NUMERICS_REPORT")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(path, "a") as handle:
            row = {"test": test, "what": what, "diff": diff, "tol": tol, "ratio": diff / tol if tol else None}
            handle.write(json.dumps(row) + "\n")


def assert_within(got, want, tol, what: str = "") -> None:
    """|got − want| ≤ tol elementwise (tol a number or a tensor broadcastable to got), with the worst entry shown."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    tol = torch.as_tensor(tol, dtype=torch.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    diff = (got - want).abs()
    ratio = diff / tol
    worst = int(ratio.flatten().argmax()) if ratio.numel() else 0
    tol_at = tol.expand_as(diff).flatten()[worst].item() if diff.numel() else 0.0
    diff_at = diff.flatten()[worst].item() if diff.numel() else 0.0
    _report(what, diff_at, tol_at)
    assert bool((diff <= tol).all()), f"{what}: |got − want| = {diff_at:.3g} > tolerance {tol_at:.3g} (entry {worst})"


def assert_effect(effect, tol, factor: float = 10.0, what: str = "") -> None:
    """The effect a test is about must dwarf the rounding tolerance, or the comparison could not fail: effect > factor
    · tol, elementwise when both are tensors (each answer's effect against its own tolerance)."""
    effect, tol = torch.as_tensor(effect, dtype=torch.float64), torch.as_tensor(tol, dtype=torch.float64)
    ratio = (effect / tol).flatten()
    worst = int(ratio.argmin())
    effect_at = effect.flatten()[worst if effect.numel() > 1 else 0].item()
    tol_at = tol.flatten()[worst if tol.numel() > 1 else 0].item()
    _report(f"effect: {what}", effect_at, tol_at)
    assert effect_at > factor * tol_at, f"{what}: effect {effect_at:.3g} is not {factor}x the tolerance {tol_at:.3g}"


def zero_margin_loss(pairs: int, beta: float = 0.1) -> float:
    """The trainer's sigmoid loss of a batch of `pairs` pairs whose margins are all exactly 0 (π and π_ref computed
    by identical passes): −log σ(0) = log 2 in fp32, averaged over the batch by the trainer's own code, so exact."""
    from trl_dpo_ext.losses import preference_loss

    zeros, ones = torch.zeros(pairs), torch.ones(pairs)
    return preference_loss(["sigmoid"], [1.0], zeros, zeros, ones, ones, beta).item()


def fp32_4bit_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """A model a test builds itself, on bitsandbytes' fp32 4-bit path on every CPU (`keep_fp32_cpu_kernels`)."""
    from trl_dpo_ext.models import keep_fp32_cpu_kernels

    return keep_fp32_cpu_kernels(model)
