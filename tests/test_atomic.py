"""Atomic writes: after a failure (or a kill) the target holds the old content or the new one, never a mix; a full
disk is told from other failures and named."""

import errno
import os
import subprocess
import sys

import pytest

from trl_dpo_ext.atomic import atomic_dir, atomic_write, is_disk_full, removed_on_full_disk
from trl_dpo_ext.errors import DiskFullError


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


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a failed write reaches Python: no file name


def test_a_full_disk_is_told_from_other_failures_whichever_library_wrote(tmp_path, monkeypatch):
    assert is_disk_full(_enospc(), tmp_path) and is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
    rust = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors
    assert is_disk_full(RuntimeError(rust), tmp_path)
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = _enospc()
    assert is_disk_full(wrapped, tmp_path)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)
    # torch's zip writer says only that the write failed: a full disk only when no space is left.
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert not is_disk_full(torch_error, tmp_path)
    real_statvfs = os.statvfs
    monkeypatch.setattr(
        os, "statvfs", lambda path: os.statvfs_result((*real_statvfs(path)[:3], 0, 0, 0, 0, 0, 0, 255))
    )
    assert is_disk_full(torch_error, tmp_path / "missing" / "optimizer.pt")  # the nearest existing parent's disk
    assert is_disk_full(RuntimeError("basic_ios::clear: iostream error"), tmp_path)
    assert not is_disk_full(ValueError("bad value"), tmp_path)


def test_an_atomic_write_on_a_full_disk_names_the_file_and_leaves_the_old_one(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("old")
    with pytest.raises(DiskFullError) as error, atomic_write(path) as handle:
        handle.write("half of the new")
        raise _enospc()
    assert str(error.value) == (
        f"{path}: the disk is full (No space left on device): it was not written (an earlier version, if any, is "
        "unchanged)."
    )
    assert isinstance(error.value.__cause__, OSError) and path.read_text() == "old"
    assert os.listdir(tmp_path) == ["pairs.jsonl"]
    with pytest.raises(DiskFullError), atomic_dir(tmp_path / "merged") as staging:
        (staging / "model.safetensors").write_text("half")
        raise _enospc()
    assert os.listdir(tmp_path) == ["pairs.jsonl"]


def test_an_in_place_save_on_a_full_disk_removes_only_what_it_wrote(tmp_path):
    (tmp_path / "notes.txt").write_text("the user's")
    (tmp_path / "adapter_config.json").write_text("old config")
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "optimizer.pt").write_text("a checkpoint")
    skip = lambda name: name.startswith("checkpoint-")  # noqa: E731
    with pytest.raises(DiskFullError) as error, removed_on_full_disk(tmp_path, "the save did not finish.", skip):
        (tmp_path / "adapter_model.safetensors").write_text("new, whole")
        (tmp_path / "adapter_config.json").write_text("new, ha")
        (tmp_path / "checkpoint-4" / "optimizer.pt").write_text("skipped: not this save's")
        raise _enospc()
    assert str(error.value) == (
        f"{tmp_path}: the disk is full (No space left on device): the save did not finish. Files of this save "
        "removed: adapter_config.json, adapter_model.safetensors."
    )
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "notes.txt"]
    assert (tmp_path / "checkpoint-4" / "optimizer.pt").read_text() == "skipped: not this save's"
    with pytest.raises(ValueError), removed_on_full_disk(tmp_path, "unused"):  # other failures: nothing removed
        (tmp_path / "written.txt").write_text("kept")
        raise ValueError("not a full disk")
    assert (tmp_path / "written.txt").read_text() == "kept"
