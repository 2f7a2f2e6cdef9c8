"""Atomic writes of files and directories: a crash leaves the old one or the new one, never half of one.

The temp file or directory (`tempfile` makes them 0600 / 0700, private) gets, before it is renamed into place, the
mode a plain `open` or `mkdir` would give it: 0666 / 0777 less the process umask. Otherwise nobody but the owner could
read a trained adapter or a merged model, whatever the user's umask says.

A full disk: a write that fails with `ENOSPC` (or `EDQUOT`) leaves no temp file and raises
[`trl_dpo_ext.errors.DiskFullError`] naming the path ([`is_disk_full`] tells such a failure from others, whichever
library wrote). Writes made in place by transformers or peft go through [`removed_on_full_disk`]: what they wrote
before the disk filled up is removed, never left half-written.
"""

import contextlib
import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .errors import DiskFullError


_UMASK_LOCK = threading.Lock()
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How libraries that do not raise an `OSError` report one: Rust's io::Error (safetensors, tokenizers) and the strerror.
_DISK_FULL_WORDS = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), "os error 28", "os error 122")
# torch's zip writer (`torch.save` to a path: transformers' optimizer, scheduler and RNG files) reports a failed write
# without its cause (C++ stream errors, a position mismatch); a disk left with no free space tells that cause.
_UNEXPLAINED_WRITE_FAILURES = ("PytorchStreamWriter failed writing", "unexpected pos", "iostream error")
NO_SPACE_LEFT = 1 << 20  # bytes: less than this free after a failed write counts as a full disk


def current_umask() -> int:
    """
    The process umask. Linux shows it in /proc/self/status; elsewhere the only way to read it is to set it and set
    it back, which is process-wide: a file another thread creates in between would get the temporary mask, so that
    round trip happens under a lock (it guards our own threads; other code calling `os.umask` meanwhile is not).
    """
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def apply_umask_permissions(root: str | os.PathLike) -> None:
    """
    Give every file and directory under `root` (and `root`) at least the read/write permissions the umask allows.
    safetensors' `save_file` writes through a private temp file, so model weights saved by peft or transformers come
    out 0600 whatever the umask; everything else keeps its mode (execute bits included).
    """
    umask = current_umask()
    for path in [Path(root), *Path(root).rglob("*")]:
        if path.is_symlink():
            continue
        wanted = (0o777 if path.is_dir() else 0o666) & ~umask
        mode = path.stat().st_mode & 0o7777
        if mode | wanted != mode:
            path.chmod(mode | wanted)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temp file beside `path`, yield it, then fsync and rename it over `path` (rename is atomic on POSIX)."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as handle:
        yield handle


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """
    [`atomic_write`] for a writer that takes a file name, not a handle (safetensors' `save_file` writes from the
    tensors' own memory, where `save` first builds the whole file as bytes): yield the path of a temp file beside
    `path` to write; when the block succeeds, that file is fsynced and renamed over `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # Why: on a full disk the error must name the file (an `ENOSPC` from a write names none), and say nothing
        # half-written is left: the temp file goes, the old file (if any) is untouched.
        with disk_full_reported(path, "it was not written (an earlier version, if any, is unchanged)."):
            yield Path(tmp)
            # Opened again by name: a writer may have replaced the temp file with its own (safetensors does).
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fchmod(fd, 0o666 & ~current_umask())
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """
    Yield an empty temp directory beside `path` to write into; when the block succeeds it is renamed to `path`, when
    it fails it is removed. An existing `path` (a directory or a file) is replaced when `replace` (moved aside, then
    deleted: a crash in between leaves the old copy as `.NAME.old-*`); otherwise the rename raises `OSError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        # Why: as for `atomic_write`, a full disk is reported with the path; the staging directory goes.
        with disk_full_reported(path, "it was not written (an earlier version, if any, is unchanged)."):
            yield staging
        apply_umask_permissions(staging)  # the staging directory itself included
        old = None
        if replace and path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            path.rename(old / path.name)
        staging.rename(path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def free_space(path: str | os.PathLike) -> int:
    """Bytes an unprivileged write may still use on the filesystem of `path` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(candidate).free
    return 0


def is_disk_full(error: BaseException, path: str | os.PathLike) -> bool:
    """
    Whether `error`, raised by a write under `path`, or any exception it was raised from, says that the disk is full:
    an `OSError` with errno `ENOSPC`/`EDQUOT`, a message with their text (safetensors and tokenizers write in Rust),
    or a write failure reported without its cause (torch's zip writer) while the disk has (almost) no space left.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError):
            return True
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        text = str(error)
        if any(words in text for words in _DISK_FULL_WORDS):
            return True
        if any(words in text for words in _UNEXPLAINED_WRITE_FAILURES) and free_space(path) < NO_SPACE_LEFT:
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def disk_full_reported(path: str | os.PathLike, message: str) -> Iterator[None]:
    """Raise a failure of the block that [`is_disk_full`] as a `DiskFullError` naming `path`, with `message`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not is_disk_full(error, path):
            raise
        raise DiskFullError(path, message) from error


def _file_stamps(directory: Path, skip: Callable[[str], bool]) -> dict[Path, tuple[int, ...]]:
    stamps = {}
    for root, dirs, files in os.walk(directory):
        dirs[:] = [name for name in dirs if not skip(name)]
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                stat = os.stat(os.path.join(root, name))
                stamps[Path(root, name)] = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    return stamps


@contextlib.contextmanager
def removed_on_full_disk(
    directory: str | os.PathLike, message: str, skip: Callable[[str], bool] = lambda name: False
) -> Iterator[None]:
    """
    For writes made in place in `directory` by code we do not control (transformers' and peft's saves): when the block
    fails on a full disk, every file it created or changed there is removed (the one the disk filled up in is
    half-written, the others belong to a save that did not finish), and a `DiskFullError` naming `directory` is raised
    with `message` and the files removed. Files the block did not touch stay as they were.

    Args:
        directory (`str` or `os.PathLike`): where the block writes.
        message (`str`): what was being saved and what to do, for the error.
        skip (`Callable[[str], bool]`): names of subdirectories not to look into (what the block never writes:
            checkpoints, say).
    """
    directory = Path(directory)
    before = _file_stamps(directory, skip)
    try:
        yield
    except Exception as error:
        if not is_disk_full(error, directory):
            raise
        after = _file_stamps(directory, skip)
        written = sorted(path for path, stamp in after.items() if before.get(path) != stamp)
        for path in written:
            path.unlink(missing_ok=True)
        names = ", ".join(str(path.relative_to(directory)) for path in written) or "none"
        raise DiskFullError(directory, f"{message} Files of this save removed: {names}.") from error
