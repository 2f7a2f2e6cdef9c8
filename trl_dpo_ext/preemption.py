"""Preemption-safe training: a stop signal ends training with a complete checkpoint, not with lost steps.

A scheduler preempting a job (SLURM, Kubernetes, a spot instance) sends SIGTERM and, some seconds later, SIGKILL;
SLURM's `--signal` sends SIGUSR1 ahead of time; a person types Ctrl-C. Python's default handlers end the process at
once, so every step since the last scheduled checkpoint is lost. While [`trl_dpo_ext.DPOTrainer`] trains (with
`save_on_preemption=True`, the default), [`PreemptionCallback`] handles these signals instead:

1. the handler only records the signal (a signal handler runs between two bytecodes of the main thread, in the middle
   of a forward or an optimizer update: nothing can be saved from there);
2. when the current optimizer step ends, every process agrees on the decision (under DDP the signal may reach one
   rank only, and a checkpoint needs every rank at the same step), and the Trainer writes its normal checkpoint
   (`checkpoint-N`: weights, optimizer, scheduler, RNG states, trainer state) and stops;
3. `DPOTrainer.train` then raises [`trl_dpo_ext.errors.Preempted`], which names the checkpoint and ends the process
   with status 75 (`errors.EXIT_PREEMPTED`). The run lock is held until then.

The same command with `--resume_from_checkpoint last` continues from that checkpoint and ends with the adapter an
uninterrupted run ends with, bit for bit. A second Ctrl-C stops at once (`KeyboardInterrupt`, status 130). The
handlers are installed only while `train()` runs, on the main thread, and the previous ones are put back after it:
a signal before training or after it acts as it would without this package.
"""

import logging
import signal
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .errors import Preempted


logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionCallback(TrainerCallback):
    """
    Record a stop signal during training; at the end of the optimizer step, have the Trainer save a checkpoint and
    stop (see the module docstring). After `train()` returns, [`raise_if_preempted`] raises
    [`trl_dpo_ext.errors.Preempted`].

    Args:
        accelerator (`accelerate.Accelerator`): the trainer's; with several processes, the decision to stop is the
            sum over processes of "this process got a signal", so that all of them stop at the same step.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.received: signal.Signals | None = None  # the first signal this process got in this train()
        self.checkpoint: str | None = None  # the checkpoint written on the way out
        self.stopped_at: int | None = None  # the step training stopped after, on a signal (this one's or another's)
        self._previous: dict[int, object] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.received, self.checkpoint, self.stopped_at = None, None, None
        # Why: `signal.signal` works only on the main thread; a trainer run elsewhere keeps the default behaviour.
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: the person does not want to wait for the checkpoint
        if self.received is None:
            self.received = signal.Signals(signum)

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed_to_stop():
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
            logger.warning("%s: stopping after step %d and writing a checkpoint.", self._cause(), state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.stopped_at is not None:
            self.checkpoint = str(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()
        if self.received is not None and self.stopped_at is None:
            # The signal came after the last step's decision (during the final log or save): nothing was saved for
            # it, so it gets the treatment it would have had without this callback.
            signal.raise_signal(self.received)

    def restore(self) -> None:
        """Put back the signal handlers that were there before `train()` (also after an error in training)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def raise_if_preempted(self) -> None:
        """Raise [`trl_dpo_ext.errors.Preempted`] if training stopped on a signal, naming the checkpoint written."""
        if self.stopped_at is None:
            return
        # Why: a launcher (torchrun) ends the other ranks as soon as one exits non-zero: none may leave while another
        # still writes its part of the checkpoint.
        self.accelerator.wait_for_everyone()
        message = (
            f"{self._cause()}: training stopped after step {self.stopped_at}, checkpoint written to "
            f"{self.checkpoint}. Run the same command with `--resume_from_checkpoint last` to continue."
        )
        if self.accelerator.is_main_process:
            logger.warning(message)
        raise Preempted(message, self.checkpoint)

    def _agreed_to_stop(self) -> bool:
        got_one = self.received is not None
        if self.accelerator.num_processes == 1:
            return got_one
        # One small all-reduce per optimizer step: every rank calls it at every step end, so they stay in step.
        flag = torch.tensor([float(got_one)], device=self.accelerator.device)
        return self.accelerator.reduce(flag, reduction="sum").item() > 0

    def _cause(self) -> str:
        return self.received.name if self.received is not None else "A stop signal to another process"
