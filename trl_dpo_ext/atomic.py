"""Atomic writes of files and directories: a crash leaves the old one or the new one, never half of one.

The temp file or directory (`tempfile` makes them 0600 / 0700, private) gets, before it is renamed into place, the
mode a plain `open` or `mkdir` would give it: 0666 / 0777 less the process umask. Otherwise nobody but the owner could
read a trained adapter or a merged model, whatever the user's umask says.
"""

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO


_UMASK_LOCK = threading.Lock()


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            os.fsync(handle.fileno())
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
