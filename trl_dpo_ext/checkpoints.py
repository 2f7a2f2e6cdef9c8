"""Resume only from checkpoints that were written completely.

`transformers.Trainer` writes a checkpoint in place: the model, then the optimizer, scheduler and RNG states, and
`trainer_state.json` last. A process killed in between (an OOM kill, a preemption) leaves a `checkpoint-N` directory
that looks like the newest one but lacks files or holds a truncated `trainer_state.json`; resuming from it fails, or
worse, continues from a mix of two steps. A checkpoint is complete when its `trainer_state.json` parses and records
step N. Sharded checkpoints are accepted by the same test: FSDP2's per-rank shards (`pytorch_model_fsdp_0/`,
`optimizer_0/`, saved collectively by torch.distributed.checkpoint) and DeepSpeed's partitions (`global_stepN/`) are
saved by every rank before rank 0 writes `trainer_state.json` (tests/test_sharded.py resumes from them). Resuming picks
the newest complete checkpoint; incomplete ones newer than it are re-written when training reaches their step again, so
they are moved out of the way, never deleted: ours (they hold `dpo_config.json`, which every save of ours writes right
after the weights) into `output_dir/_incomplete/checkpoint-N-TIME`, a name the Trainer's checkpoint rotation
(`checkpoint-*`) and `push_to_hub` (which skips `_*`) never touch; a directory named like a checkpoint that is not ours
is left where it is, with a warning.
"""

import json
import logging
import re
import shutil
from datetime import datetime
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


logger = logging.getLogger(__name__)

# `dpo_config.json`, written by `saved_run.save_training_config` in every save of this package, checkpoints included
# (defined here, the lowest layer that needs it: it tells our checkpoints from others').
TRAINING_CONFIG_FILE = "dpo_config.json"
INCOMPLETE_DIR = "_incomplete"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# `--resume_from_checkpoint` words (any case) that mean "the newest complete checkpoint in output_dir, if any", and
# those that mean "start fresh" (what a YAML or a shell script writes for no).
LATEST = ("last", "latest", "true")
FRESH = ("", "false", "none", "no")


def resume_request(value: str | bool | None) -> bool | str | None:
    """
    The one reading of `resume_from_checkpoint`, for every trainer and command: `None` (start fresh) for `None`,
    `False` or a word of `FRESH`; `True` (the newest complete checkpoint in output_dir, or a fresh start where there
    is none) for `True` or a word of `LATEST`; else the value, a checkpoint path.
    """
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in FRESH):
        return None
    if value is True or value.strip().lower() in LATEST:
        return True
    return value


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or `None` when it is complete."""
    path = Path(path)
    match = _CHECKPOINT.match(path.name)
    state_file = path / TRAINER_STATE_NAME
    if not path.is_dir():
        return f"{path} is not a directory"
    if not state_file.is_file():
        return f"{state_file} is missing (the run was killed while writing this checkpoint)"
    try:
        step = json.loads(state_file.read_text())["global_step"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        return f"{state_file} is truncated or corrupt (the run was killed while writing it)"
    if match and step != int(match.group(1)):
        return f"{state_file} records step {step}, not {match.group(1)}"
    return None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` directories in `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def resolve_resume(value: str | bool | None, output_dir: str | Path) -> str | None:
    """
    The checkpoint to resume from, for a `resume_from_checkpoint` value.

    Args:
        value: read by [`resume_request`]. Fresh: `None`. Latest: the newest complete checkpoint in `output_dir`
            (incomplete newer ones of ours are moved into `output_dir/_incomplete/`, others are left in place, both
            with a warning), or a fresh start when there is none, so a preemptible job can always pass it. A path:
            that checkpoint, which must be complete.
        output_dir: the run's output directory.

    Raises:
        `ValueError`: a named checkpoint is incomplete or missing.
    """
    value = resume_request(value)
    if value is None:
        return None
    if value is True:
        complete = None
        for path in reversed(checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                complete = path
                break
            set_aside(path, problem)
        if complete is None:
            logger.warning("No complete checkpoint in %s: training starts from the beginning.", output_dir)
            return None
        logger.info("Resuming from %s", complete)
        return str(complete)
    problem = checkpoint_problem(value)
    if problem is not None:
        raise ValueError(
            f"resume_from_checkpoint={value!r}: cannot resume: {problem}. Pass `--resume_from_checkpoint last` to "
            "resume from the newest complete checkpoint."
        )
    return str(value)


def set_aside(path: Path, problem: str) -> None:
    """Move the incomplete checkpoint `path` into `_incomplete/` beside it if this package wrote it; else leave it."""
    if not (path / TRAINING_CONFIG_FILE).is_file():
        logger.warning(
            "Skipping %s: %s, and it is not a checkpoint of this package (no %s): left as it is.",
            path,
            problem,
            TRAINING_CONFIG_FILE,
        )
        return
    target = path.parent / INCOMPLETE_DIR / f"{path.name}-{datetime.now():%Y%m%d-%H%M%S-%f}"
    target.parent.mkdir(exist_ok=True)
    path.rename(target)
    logger.warning("Moved incomplete checkpoint %s aside to %s: %s.", path, target, problem)


def newest_complete(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in `output_dir`, or `None`; nothing is moved."""
    return next((path for path in reversed(checkpoints(output_dir)) if checkpoint_problem(path) is None), None)


def discard_failed_save(path: Path, created: bool) -> str:
    """
    Take the checkpoint `path` whose save just failed out of the way, and say how: removed when that save created it
    (it holds only what the failed save wrote, and a full disk needs the space back), else moved aside as an incomplete
    one.
    """
    if created:
        shutil.rmtree(path, ignore_errors=True)
        return "the partly written checkpoint was removed"
    set_aside(path, "its save failed")
    if path.exists():  # not ours: left where it is, as `set_aside` does with any such directory
        return "the partly written checkpoint is incomplete and will not be resumed from"
    return f"the partly written checkpoint was moved aside into {path.parent / INCOMPLETE_DIR}"
