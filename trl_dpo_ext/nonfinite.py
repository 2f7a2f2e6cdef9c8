"""Skip optimizer steps whose loss or gradients are not finite, so one bad batch never reaches the weights.

A NaN or inf loss (an overflow, a degenerate row, a bad reference value) makes every LoRA gradient NaN, and one
optimizer step with them poisons the weights, the optimizer state and every later checkpoint. `NonFiniteGuard`
wraps the optimizer's `step`: the step runs only when the micro-batch losses since the last step and the gradients
are all finite; otherwise it is skipped (the gradients are then zeroed by the training loop as usual), counted in
`nonfinite/skipped_steps` and warned about (naming the step and its dataset rows). After `max_consecutive` skipped
steps in a row, training stops with a `NonFiniteLossError` naming each of those steps and its dataset rows.
"""

import functools
import logging
import warnings

import torch
from accelerate.utils import gather_object
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from .metrics import extend_log


logger = logging.getLogger(__name__)

METRIC = "nonfinite/skipped_steps"


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses or gradients in too many optimizer steps in a row."""


class NonFiniteGuard(TrainerCallback):
    """
    Guards an optimizer against non-finite steps (see the module docstring) and logs the running count of skipped
    steps as `nonfinite/skipped_steps`.

    Args:
        max_consecutive (`int`): Skipped steps in a row after which training stops with [`NonFiniteLossError`].
        accelerator (`accelerate.Accelerator`): Reduces the decision across processes, so every rank skips together.
    """

    def __init__(self, max_consecutive: int, accelerator):
        self.max_consecutive = max_consecutive
        self.accelerator = accelerator
        self.skipped = 0
        self.streak: list[tuple[int, list[int]]] = []  # (step, dataset rows) of the skipped steps in a row
        self.step = 0
        self._losses: list[torch.Tensor] = []
        self._examples: list[torch.Tensor] = []

    def observe(self, loss: torch.Tensor, example_index: torch.Tensor | None) -> None:
        """Record one micro-batch's loss and its dataset rows (device tensors: nothing syncs with the host here)."""
        self._losses.append(loss.detach().reshape(()))
        if example_index is not None:
            self._examples.append(example_index)

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Make `optimizer.step` a guarded step; returns `optimizer`."""
        step = optimizer.step

        @functools.wraps(step)
        def guarded_step(*args, **kwargs):
            if self._all_finite(optimizer):
                self.streak.clear()
                self._forget()
                return step(*args, **kwargs)
            self._skip()

        optimizer.step = guarded_step
        return optimizer

    def _all_finite(self, optimizer: torch.optim.Optimizer) -> bool:
        device = self.accelerator.device
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = torch.ones((), dtype=torch.bool, device=device)
        if grads:
            # One fused norm over every gradient: it is NaN or inf exactly when some gradient value is.
            norm = torch.nn.utils.get_total_norm(grads)
            if isinstance(norm, DTensor):
                # Why: under FSDP2 the gradients are sharded DTensors, and so is their norm; mixed with a plain tensor
                # it fails in DTensor dispatch. Every rank steps here together, so the gather is safe.
                norm = norm.full_tensor()
            finite &= torch.isfinite(norm).to(device)
        if self._losses:
            finite &= torch.isfinite(torch.stack(self._losses)).all().to(device)
        if self.accelerator.num_processes > 1:
            # Gradients are already all-reduced, but a loss is per rank: all ranks must skip or step together.
            finite = self.accelerator.reduce(finite.int(), reduction="sum") == self.accelerator.num_processes
        return bool(finite)

    def _skip(self) -> None:
        self.skipped += 1
        self.streak.append((self.step, self._example_rows()))
        self._forget()
        if len(self.streak) >= self.max_consecutive:
            steps = "; ".join(f"step {step}: rows {rows}" for step, rows in self.streak)
            raise NonFiniteLossError(
                f"Non-finite loss or gradients in {len(self.streak)} optimizer steps in a row "
                f"(max_consecutive_nonfinite={self.max_consecutive}), stopping at step {self.step}. Dataset rows of "
                f"those steps: {steps}. Check these rows, lower the learning rate, or train in a wider dtype."
            )
        step, rows = self.streak[-1]
        message = (
            f"Step {step}: non-finite loss or gradients; the optimizer step was skipped ({len(self.streak)} in a "
            f"row, {self.skipped} in total). Examples (dataset rows): {rows}."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        logger.warning(message)

    def _example_rows(self) -> list[int]:
        rows = torch.cat(self._examples).tolist() if self._examples else []
        if self.accelerator.num_processes > 1:
            # Only reached on a skip, which every rank takes together, so the collective is safe.
            rows = gather_object(rows)
        return sorted(rows)

    def _forget(self) -> None:
        self._losses.clear()
        self._examples.clear()

    # --- TrainerCallback: the step number for messages, the count in the logs ---

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run continues the count it logged before the checkpoint.
        logged = [row[METRIC] for row in state.log_history if METRIC in row]
        self.skipped = int(logged[-1]) if logged else 0
        self.streak.clear()

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            extend_log(state, logs, {METRIC: float(self.skipped)})
