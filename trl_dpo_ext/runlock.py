"""One run per output directory: a lock file that a second run on the same `output_dir` is refused by.

Two trainings on one `output_dir` would both report success while their checkpoints, `metrics.jsonl` and adapter
files interleave. The lock file, `output_dir/_trl_dpo_ext.lock`, holds the pid, host, start time and command of the
run that holds it (the leading `_` keeps it out of what `push_to_hub` uploads). It is removed when the run ends, also
on an exception. A lock left by a killed run is stale when its host is this one and its process is gone (or its pid
now belongs to a process started later): the next run takes it over with a warning. A lock from another host cannot
be checked and is never taken over: the message says which file to delete if that run is gone.
"""

import contextlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from .errors import UserError


logger = logging.getLogger(__name__)

LOCK_NAME = "_trl_dpo_ext.lock"


class RunLockedError(UserError):
    """Another run holds the output directory."""


def _process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None if there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # it exists, owned by someone else
        return 0.0


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}: {holder.get('command')}"


def is_stale(holder: dict) -> bool:
    """Whether the run that wrote `holder` is gone: same host, and its pid is dead or now a younger process."""
    if holder.get("host") != socket.gethostname():
        return False
    started = _process_start_time(int(holder.get("pid", -1)))
    # A process created after the lock was written is not the run that wrote it (the pid was reused).
    return started is None or started > holder.get("process_start", float("inf")) + 1


class RunLock(contextlib.AbstractContextManager):
    """
    Hold `output_dir` for this run (creating the directory): `with RunLock(output_dir): ...`. Raises
    [`RunLockedError`] naming the run that holds it; takes over a stale lock with a warning.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.held = False

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "time": time.time(),
            "process_start": _process_start_time(os.getpid()),
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
            "token": self.token,
        }
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self._remove_if_stale()
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(holder, handle)
            self.held = True
            return self
        raise RunLockedError(f"{self.path.parent}: another run keeps taking its lock ({self.path}).")

    def _remove_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:  # released meanwhile
            return
        except (OSError, ValueError):
            # Empty or half written: another run is writing it right now, or died doing so; nothing to check.
            holder = None
        if holder is None or not is_stale(holder):
            who = _describe(holder) if holder else "unreadable lock file"
            raise RunLockedError(
                f"output_dir {self.path.parent} is in use by another run ({who}). Wait for it to finish or pick "
                f"another --output_dir; if that run is gone, delete {self.path}."
            )
        logger.warning(f"Taking over the lock of a run that is gone ({_describe(holder)}): {self.path}")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __exit__(self, *exc_info) -> None:
        if not self.held:
            return
        self.held = False
        # Only our own lock: if it was taken over (deleted by hand, then re-taken), it is someone else's now.
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
