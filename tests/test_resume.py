"""Kill and resume: a run SIGKILLed mid-run and again while writing a checkpoint, then resumed, ends with the same LoRA
weights as an uninterrupted run, logs every step exactly once, and reuses its reference cache."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trl_dpo_ext.checkpoints import (
    INCOMPLETE_DIR,
    TRAINING_CONFIG_FILE,
    checkpoint_problem,
    resolve_resume,
    resume_request,
)


ROOT = Path(__file__).parents[1]
STEPS = 12
FLAGS = [
    "--config", "tiny", "--max_steps", str(STEPS), "--save_steps", "4", "--save_total_limit", "2",
    "--logging_steps", "1", "--heldout_pairs", "8", "--report_to", "none", "--save_metrics_plot", "false",
]  # fmt: skip


def run(tmp_path: Path, name: str, *flags: str, **kill: int) -> subprocess.CompletedProcess:
    """The recipe in a fresh process (tests/killable_recipe.py), output in tmp_path/name, its own reference cache."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRL_DPO_EXT_CACHE": str(tmp_path / "cache"),
        "CUDA_VISIBLE_DEVICES": "",
    }
    env.update({key.upper(): str(value) for key, value in kill.items()})
    command = [
        sys.executable, str(ROOT / "tests" / "killable_recipe.py"), *FLAGS, "--output_dir", str(tmp_path / name),
        "--ref_cache_dir", str(tmp_path / f"ref_cache_{name}"), *flags,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    expected = -signal.SIGKILL if kill else 0
    assert result.returncode == expected, result.stderr[-3000:]
    return result


def logged_steps(path: Path) -> list[int]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [row["step"] for row in rows if "loss" in row]


def cache_file(tmp_path: Path) -> Path:
    (path,) = (tmp_path / "ref_cache_killed").iterdir()
    return path


def test_killed_twice_then_resumed_equals_an_uninterrupted_run(tmp_path):
    run(tmp_path, "straight")
    out = tmp_path / "killed"

    first = run(tmp_path, "killed", kill_at_step=6)
    assert "Reference cache for the train dataset written to" in first.stderr
    cache, stamp = cache_file(tmp_path), cache_file(tmp_path).stat().st_mtime_ns
    assert checkpoint_problem(out / "checkpoint-4") is None
    assert logged_steps(out / "metrics.jsonl") == [1, 2, 3, 4, 5]

    second = run(tmp_path, "killed", "--resume_from_checkpoint", "last", kill_in_save=8)
    assert "Reference cache hit for the train dataset" in second.stderr
    assert "written to" not in second.stderr
    assert checkpoint_problem(out / "checkpoint-8").endswith(
        "is missing (the run was killed while writing this checkpoint)"
    )
    assert (out / "checkpoint-8" / "adapter_model.safetensors").exists()  # half a checkpoint, the bait
    # What marks a checkpoint as ours even when killed mid-save: written right after the weights.
    assert (out / "checkpoint-8" / TRAINING_CONFIG_FILE).is_file()

    third = run(tmp_path, "killed", "--resume_from_checkpoint", "latest")  # every word of LATEST, any command
    # Moved aside, not deleted (issue #28): out of the Trainer's `checkpoint-*` rotation, whole.
    (aside,) = (out / INCOMPLETE_DIR).iterdir()
    assert f"Moved incomplete checkpoint {out / 'checkpoint-8'} aside to {aside}" in third.stderr
    assert aside.name.startswith("checkpoint-8-") and (aside / "adapter_model.safetensors").is_file()
    assert "Resuming from" in third.stderr
    assert "Reference cache hit for the train dataset" in third.stderr
    assert cache_file(tmp_path) == cache and cache.stat().st_mtime_ns == stamp  # reused, never rewritten

    # Exact, not a rounding tolerance: the resumed process replays the uninterrupted run's computation (same machine,
    # thread count and kernels, the same batches and shapes, weights, optimizer and RNG state restored bit for bit),
    # so it computes the same floats. A tolerance would also be meaningless here: a rounding difference in a gradient
    # entry near zero flips the sign of its AdamW step, a difference of 2·lr (1e-2 at the recipe's 5e-3), as large as
    # the effect of a wrong resume (optimizer state or data order lost).
    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(out / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys() and len(straight) > 0
    for name, weight in straight.items():
        assert resumed[name].dtype == weight.dtype and torch.equal(resumed[name], weight), name

    every_step = list(range(1, STEPS + 1))
    assert logged_steps(out / "metrics.jsonl") == every_step
    history = json.loads((out / "metrics_history.json").read_text())
    assert [row["step"] for row in history if "loss" in row] == every_step
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]
    assert all(checkpoint_problem(p) is None for p in out.glob("checkpoint-*"))
    # The losses of the resumed steps are the uninterrupted run's, step by step, exactly (as the weights above).
    straight_history = json.loads((tmp_path / "straight" / "metrics_history.json").read_text())
    assert [r["loss"] for r in history if "loss" in r] == [r["loss"] for r in straight_history if "loss" in r]


def test_a_named_incomplete_checkpoint_is_refused(tmp_path):
    partial = tmp_path / "checkpoint-3"
    partial.mkdir()
    (partial / "trainer_state.json").write_text('{"global_step": 3, "log_hi')  # killed mid-write
    with pytest.raises(ValueError) as error:
        resolve_resume(str(partial), tmp_path)
    assert str(error.value) == (
        f"resume_from_checkpoint={str(partial)!r}: cannot resume: {partial / 'trainer_state.json'} is truncated or "
        "corrupt (the run was killed while writing it). Pass `--resume_from_checkpoint last` to resume from the "
        "newest complete checkpoint."
    )


def test_last_picks_the_newest_complete_checkpoint_and_starts_fresh_without_one(tmp_path):
    assert resolve_resume("last", tmp_path / "missing") is None
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-6").mkdir()  # ours, killed before its trainer state was written
    (tmp_path / "checkpoint-6" / TRAINING_CONFIG_FILE).write_text("{}")
    (tmp_path / "checkpoint-10").mkdir()  # ours, with the wrong step
    (tmp_path / "checkpoint-10" / TRAINING_CONFIG_FILE).write_text("{}")
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 8}))
    assert resolve_resume("last", tmp_path) == str(tmp_path / "checkpoint-4")
    # Issue #28: moved aside into _incomplete/, no longer deleted.
    assert sorted(p.name for p in tmp_path.iterdir()) == [INCOMPLETE_DIR, "checkpoint-2", "checkpoint-4"]
    aside = sorted(p.name.rsplit("-", 3)[0] for p in (tmp_path / INCOMPLETE_DIR).iterdir())
    assert aside == ["checkpoint-10", "checkpoint-6"]
    assert resolve_resume(None, tmp_path) is None and resolve_resume(False, tmp_path) is None
    assert resolve_resume(True, tmp_path) == str(tmp_path / "checkpoint-4")


def test_an_incomplete_checkpoint_that_is_not_ours_is_left_in_place(tmp_path, caplog):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    theirs = tmp_path / "checkpoint-5"  # another tool's directory, or ours killed before its first file
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with caplog.at_level("WARNING", logger="trl_dpo_ext.checkpoints"):
        assert resolve_resume("last", tmp_path) == str(tmp_path / "checkpoint-2")
    assert (theirs / "notes.txt").read_text() == "keep me" and not (tmp_path / INCOMPLETE_DIR).exists()
    assert f"Skipping {theirs}: {theirs / 'trainer_state.json'} is missing" in caplog.text
    assert f"it is not a checkpoint of this package (no {TRAINING_CONFIG_FILE}): left as it is." in caplog.text


@pytest.mark.parametrize(
    "value, expected",
    [(None, None), (False, None), ("false", None), ("None", None), ("", None), (True, True), ("last", True),
     ("Latest", True), ("TRUE", True), ("runs/x/checkpoint-4", "runs/x/checkpoint-4")],
)  # fmt: skip
def test_one_reading_of_resume_from_checkpoint(value, expected):
    # What DPOTrainer.train, IterativeDPOTrainer.train, the PPO-shaped API and both commands all go through.
    assert resume_request(value) == expected
