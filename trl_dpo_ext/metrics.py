"""Metric math (pure functions on per-pair tensors) and the `TrainerCallback`s that report it.

The pure functions return per-example tensors; the trainer gathers them across processes before averaging, so every
logged number is a global mean. The callbacks read and extend the logs, so `ThroughputCallback` and
`MetricsHistoryCallback` work on any TRL trainer that logs `num_tokens` (SFT, DPO, ...).
"""

import json
import logging
import math
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .atomic import atomic_write
from .config import extension_setting


logger = logging.getLogger(__name__)


def reward_metrics(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """
    Per-pair implicit-reward metrics, named as `trl.DPOTrainer` logs them, plus the reference log-probs and the
    displacement of the chosen completion.

    The implicit reward is r(x, y) = β·(log π(y|x) − log π_ref(y|x)) (Rafailov et al. 2023, Eq. 5). `displacement` is
    log π_ref(y_w|x) − log π(y_w|x): positive when training has *lowered* the chosen completion's likelihood.

    Args:
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: `(B,)` sequence log-probs.
        beta: the DPO β.

    Returns:
        `dict[str, torch.Tensor]`: metric name → `(B,)` tensor (detached).
    """
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": strictly_preferred(chosen_rewards, rejected_rewards),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
        "logps/ref_chosen": ref_chosen_logps.detach(),
        "logps/ref_rejected": ref_rejected_logps.detach(),
        "displacement": (ref_chosen_logps - chosen_logps).detach(),
    }


# Two accuracies of an implicit reward, which differ only on ties (a pair whose two rewards are equal, as every pair is
# at step 0 with π = π_ref):


def strictly_preferred(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """
    Per pair, 1.0 where the chosen answer's implicit reward is strictly above the rejected one's, else 0.0: **a tie
    counts 0**. Its mean is the logged `rewards/accuracies` (TRL's definition, so the number compares with stock TRL's
    logs; it starts at 0 when every pair ties).

    Args:
        chosen_rewards, rejected_rewards: `(B,)` implicit rewards.

    Returns:
        `torch.Tensor` of shape `(B,)`, float.
    """
    return (chosen_rewards > rejected_rewards).float()


def preference_accuracy(margins: torch.Tensor) -> float:
    """
    Share of pairs whose chosen answer has the higher implicit reward, **a tie counting ½** (chance level, where
    [`strictly_preferred`] counts it 0): the held-out accuracy of the recipe, of `trl-dpo-ext score` and of
    [`trl_dpo_ext.ImplicitReward.accuracy`], so an untrained policy (every pair tied) scores 0.5.

    Args:
        margins (`torch.Tensor`): r(x, y_w) − r(x, y_l) per pair, e.g. from [`trl_dpo_ext.reward_margins`].
    """
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()


def kl_terms(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """
    Per-token terms of an estimate of KL(π‖π_ref): k3 = (ρ − 1) − log ρ with ρ = π_ref/π at the observed token
    (Schulman 2020, "Approximating KL divergence"). Summed over a sequence's tokens they estimate its sequence-level
    KL; k3 is never negative and is unbiased when the tokens are sampled from π. On the chosen answers of a preference
    set it measures how far the policy has moved on that data.

    Args:
        policy_logps, ref_logps: per-token log-probs of the same tokens, any (equal) shape.

    Returns:
        `torch.Tensor` of the same shape, detached.
    """
    log_ratio = (ref_logps - policy_logps).detach()
    return torch.expm1(log_ratio) - log_ratio


def peak_memory_mib() -> float:
    """Peak memory of this process in MiB: `torch.cuda.max_memory_allocated` with CUDA, else the peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class ThroughputCallback(TrainerCallback):
    """
    Adds `tokens_per_second` (tokens between two training logs over the wall time between them, from TRL's
    cumulative `num_tokens`) and `memory/peak_mib` (see [`peak_memory_mib`]) to every training log.
    """

    def __init__(self):
        self._last: tuple[float, float] | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._last = None

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._last is None:  # start the clock at the first step, after data loading and model placement
            self._last = (time.perf_counter(), 0.0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "num_tokens" not in logs or self._last is None:
            return
        now, tokens = time.perf_counter(), float(logs["num_tokens"])
        last_time, last_tokens = self._last
        if tokens > last_tokens and now > last_time:
            extend_log(state, logs, {"tokens_per_second": (tokens - last_tokens) / (now - last_time)})
        extend_log(state, logs, {"memory/peak_mib": peak_memory_mib()})
        self._last = (now, tokens)


class DisplacementAlarmCallback(TrainerCallback):
    """
    Warns once about likelihood displacement: the mean chosen log-prob has fallen more than `margin` nats below the
    reference's (`displacement > margin`) while reward accuracy is above its first logged value — DPO is separating
    the pair by pushing *both* completions down (Razin et al. 2024, "Unintentional Unalignment").
    """

    def __init__(self, margin: float):
        self.margin = margin
        self.first_accuracy: float | None = None
        self.fired_at: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "displacement" not in logs or "rewards/accuracies" not in logs:
            return
        accuracy = logs["rewards/accuracies"]
        if self.first_accuracy is None:
            self.first_accuracy = accuracy
            return
        if self.fired_at is None and logs["displacement"] > self.margin and accuracy > self.first_accuracy:
            self.fired_at = state.global_step
            message = (
                f"Likelihood displacement at step {state.global_step}: the mean chosen log-prob is "
                f"{logs['displacement']:.3f} nats below the reference (margin {self.margin}) while reward accuracy "
                f"rose from {self.first_accuracy:.3f} to {accuracy:.3f}. DPO is lowering the chosen completions too; "
                "consider a larger beta, a lower learning rate, or an SFT term (loss_type=['sigmoid', 'sft'])."
            )
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            logger.warning(message)


class MetricsHistoryCallback(TrainerCallback):
    """
    Keeps the metric history safe and readable: every log is appended to `output_dir/metrics.jsonl` as it happens
    (a crash loses nothing already logged), and at the end of training `metrics_history.json` (the trainer state's
    history, one entry per log) and `metrics.png` are written atomically.

    When training (re)starts, `metrics.jsonl` is cut back to the step it starts from: a resumed run would otherwise
    log the steps between its checkpoint and the crash a second time (and a kill mid-append leaves half a line).
    """

    PLOTTED = ("loss", "rewards/accuracies", "rewards/margins", "kl")

    def on_train_begin(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / "metrics.jsonl"
        if not state.is_world_process_zero or not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the half-written last line of a killed run
            if row.get("step", 0) <= state.global_step:
                kept.append(line)
        with atomic_write(path) as handle:
            handle.writelines(line + "\n" for line in kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not state.is_world_process_zero:
            return
        path = Path(args.output_dir) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        out = Path(args.output_dir)
        with atomic_write(out / "metrics_history.json") as handle:
            json.dump(state.log_history, handle, indent=1)
        if extension_setting(args, "save_metrics_plot"):
            plot_metrics(state.log_history, out / "metrics.png")


def plot_metrics(
    history: list[dict], path: str | Path, keys: tuple[str, ...] = MetricsHistoryCallback.PLOTTED
) -> Path:
    """Plot `keys` of a `log_history` against the step, one panel each, and save a PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # squeeze=False: one key still gives a row of axes, not a bare Axes.
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(row["step"], row[key]) for row in history if key in row and math.isfinite(row[key])]
        if points:
            ax.plot(*zip(*points), marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def add_metric_callbacks(trainer, callbacks: list[TrainerCallback]) -> None:
    """
    Put `callbacks` at the front of `trainer`'s callback list: the values they add to a log must be in it before the
    reporting callbacks (TensorBoard, W&B, the progress bar) read it. Works on any `transformers.Trainer`.
    """
    for callback in reversed(callbacks):
        trainer.callback_handler.callbacks.insert(0, callback)


def extend_log(state: TrainerState, logs: dict, values: dict[str, float]) -> None:
    """Add `values` to a log from a callback's `on_log`: to `logs` and to its copy in `state.log_history`."""
    # `Trainer.log` appends a copy of the logs to the history before calling `on_log`, so update both.
    logs.update(values)
    if state.log_history:
        state.log_history[-1].update(values)
