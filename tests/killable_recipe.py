"""The QLoRA recipe with a SIGKILL planted at a chosen point, for `tests/test_resume.py`.

`python tests/killable_recipe.py FLAGS` runs `trl_dpo_ext.recipe` as `recipes/dpo_qlora.py` does. With
`KILL_AT_STEP=k` the process SIGKILLs itself when optimizer step k ends (before that step is logged or saved); with
`KILL_IN_SAVE=k` it does so while checkpoint-k is being written (model and optimizer saved, trainer state not yet).
The package's INFO logs go to stderr, so the test can see reference-cache hits.
"""

import logging
import os
import signal

from transformers import TrainerCallback

from trl_dpo_ext import recipe


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            kill()


class KillableTrainer(recipe.DPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "KILL_AT_STEP" in os.environ:
            self.add_callback(KillAtStep(int(os.environ["KILL_AT_STEP"])))

    def _save_rng_state(self, output_dir):
        if output_dir.endswith(f"checkpoint-{os.environ.get('KILL_IN_SAVE')}"):
            kill()
        super()._save_rng_state(output_dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    recipe.DPOTrainer = KillableTrainer
    recipe.main(*recipe.parse())
