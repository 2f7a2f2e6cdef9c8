"""One short run of the default recipe, shared by the ecosystem tests (CLI, export, logging, model card, rewards).

Training is the slow part of those tests, so it happens once per session: `trained_run(tmp_path_factory)` runs
`trl_dpo_ext.recipe` in-process with `--config tiny` (tiny model built in a temporary cache, bundled toy set),
with TensorBoard logging on, and returns what the recipe printed and returned.
"""

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from trl_dpo_ext import recipe


HELDOUT_PAIRS = 16


@dataclass(frozen=True)
class RecipeRun:
    output_dir: Path
    stdout: str
    result: dict


_RUN: RecipeRun | None = None


def trained_run(tmp_path_factory) -> RecipeRun:
    global _RUN
    if _RUN is None:
        root = tmp_path_factory.mktemp("recipe_run")
        argv = [
            "--config", "tiny", "--output_dir", str(root / "run"), "--max_steps", "4", "--logging_steps", "2",
            "--heldout_pairs", str(HELDOUT_PAIRS), "--report_to", "tensorboard", "--save_strategy", "no",
            "--disable_tqdm", "true",
        ]  # fmt: skip
        previous = os.environ.get("TRL_DPO_EXT_CACHE")
        os.environ["TRL_DPO_EXT_CACHE"] = str(root / "cache")
        stdout = io.StringIO()
        try:
            with contextlib.redirect_stdout(stdout):
                result = recipe.main(*recipe.parse(argv))
        finally:
            if previous is None:
                del os.environ["TRL_DPO_EXT_CACHE"]
            else:
                os.environ["TRL_DPO_EXT_CACHE"] = previous
        _RUN = RecipeRun(root / "run", stdout.getvalue(), result)
    return _RUN
