"""Atomic writes: after a failure (or a kill) the target holds the old content or the new one, never a mix."""

import os
import subprocess
import sys

import pytest

from trl_dpo_ext.atomic import atomic_dir, atomic_write


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "metrics_history.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path) as handle:
        handle.write("half of the new")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics_history.json"]
    with atomic_write(path) as handle:
        handle.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["metrics_history.json"]


def test_a_killed_writer_leaves_the_old_file(tmp_path):
    """SIGKILL between the write and the rename: the target is untouched (only a dot-temp file remains)."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("old\n")
    script = (
        "import os, signal, sys\n"
        "from trl_dpo_ext.atomic import atomic_write\n"
        "with atomic_write(sys.argv[1]) as handle:\n"
        "    handle.write('new\\n' * 1000)\n"
        "    handle.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True)
    assert result.returncode == -9
    assert path.read_text() == "old\n"
    leftovers = [name for name in os.listdir(tmp_path) if name != "pairs.jsonl"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".pairs.jsonl.")


def test_atomic_dir_replaces_on_success_and_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "preference_pairs"
    with atomic_dir(target) as staging:
        (staging / "data.arrow").write_text("first")
    assert (target / "data.arrow").read_text() == "first"

    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "data.arrow").write_text("half")
        raise RuntimeError("crash mid-save")
    assert (target / "data.arrow").read_text() == "first"

    with atomic_dir(target) as staging:
        (staging / "other.arrow").write_text("second")
    assert os.listdir(target) == ["other.arrow"]
    assert os.listdir(tmp_path) == ["preference_pairs"]

    with pytest.raises(OSError), atomic_dir(target, replace=False) as staging:
        (staging / "x").write_text("never moved in")
    assert os.listdir(target) == ["other.arrow"] and os.listdir(tmp_path) == ["preference_pairs"]


def test_atomic_dir_replaces_a_file_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "merged"
    target.write_text("a file where the directory goes")
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "model.safetensors").write_text("half")
        raise RuntimeError("crash mid-save")
    assert target.read_text() == "a file where the directory goes"
    with atomic_dir(target) as staging:
        (staging / "model.safetensors").write_text("whole")
    assert (target / "model.safetensors").read_text() == "whole"
    assert os.listdir(tmp_path) == ["merged"]
