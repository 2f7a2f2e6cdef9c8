"""`trl-dpo-ext iterative` with a SIGKILL planted in a chosen round and step, for `tests/test_iterative.py`.

`python tests/iterative_run.py FLAGS` runs `trl_dpo_ext.recipe.iterative_main` as `trl-dpo-ext iterative` does. With
`KILL_AT=r:k` the process SIGKILLs itself when optimizer step k of round r ends (before it is logged or saved);
`KILL_SIGNAL=TERM` (or any other name) sends that signal instead, for `tests/test_preemption.py`.
"""

import logging
import os
import signal
from pathlib import Path

from transformers import TrainerCallback

from trl_dpo_ext import recipe
from trl_dpo_ext.iterative import IterativeDPOTrainer


class KillAt(TrainerCallback):
    def __init__(self, round_: int, step: int):
        self.round, self.step = round_, step

    def on_step_end(self, args, state, control, **kwargs):
        if Path(args.output_dir).name == f"round-{self.round}" and state.global_step == self.step:
            os.kill(os.getpid(), signal.Signals[f"SIG{os.environ.get('KILL_SIGNAL', 'KILL')}"])


class KillableIterative(IterativeDPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "KILL_AT" in os.environ:
            self.trainer.add_callback(KillAt(*map(int, os.environ["KILL_AT"].split(":"))))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    recipe.IterativeDPOTrainer = KillableIterative
    recipe.iterative_main(*recipe.parse_iterative())
