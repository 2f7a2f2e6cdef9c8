"""How the command line and the recipe end on a mistake the user can fix: one line on stderr, exit status 2.

    error: data.jsonl: line 17, character 12: invalid JSON (Unterminated string starting at character 12)

Errors the user acts on from the message are the ones in `USER_ERRORS`: bad settings and data (`ValueError`, raised
by the config dataclasses and the data loader with the field, file, line or row named), files and directories that
cannot be read or written (`OSError`) and our own `UserError` (a run already holding the output directory, a write
on a full disk: `DiskFullError`, ...). Anything else is a bug: it keeps its traceback. `TRL_DPO_EXT_DEBUG=1` (or
`trl-dpo-ext --debug COMMAND`) re-raises user errors too, with the traceback.

A run stopped by a preemption signal (SIGTERM, SIGUSR1, a first Ctrl-C) after writing a checkpoint ends with
`EXIT_PREEMPTED` (75, `EX_TEMPFAIL` of `sysexits.h`: "try again later"): a scheduler or a wrapper script can tell it
from a failure (1, 2) and from a process killed before it could save (143 = 128 + SIGTERM, as a shell reports it),
and requeue the same command with `--resume_from_checkpoint last`. See `trl_dpo_ext.preemption`.
"""

import os
import sys
from collections.abc import Callable


DEBUG_ENV = "TRL_DPO_EXT_DEBUG"
EXIT_USER_ERROR = 2  # as argparse exits on a bad flag: the input needs changing
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention for Ctrl-C
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was written, run the same command again to resume


class UserError(Exception):
    """An error whose message says what to change; the command line prints it without a traceback."""


class DiskFullError(UserError):
    """
    A write failed because its disk is full (`ENOSPC`, or `EDQUOT`: the user's quota). Raised where the package knows
    what the write was, so the message names the path, says that the disk is full, what was left behind (nothing
    half-written that a later run would take as complete) and what to do. A `UserError`: the command line prints it as
    one `error:` line with status 2.

    Args:
        path (`str` or `os.PathLike`): the file or directory that could not be written.
        message (`str`): what was being written, what is left, what to do; appended to the path and the reason.
    """

    def __init__(self, path: str | os.PathLike, message: str = ""):
        self.path = os.fspath(path)
        text = f"{self.path}: the disk is full (No space left on device)"
        super().__init__(f"{text}{': ' if message else '.'}{message}")


class Preempted(SystemExit):
    """
    Training stopped on a preemption signal after writing a checkpoint. A `SystemExit` with status `EXIT_PREEMPTED`, so
    that any script training with [`trl_dpo_ext.DPOTrainer`] ends with that status and no traceback, and that
    `except Exception` handlers between the trainer and the script's end do not swallow it.

    Args:
        message (`str`): what stopped, at which step, and where the checkpoint is.
        checkpoint (`str`, *optional*): the checkpoint written.
    """

    def __init__(self, message: str, checkpoint: str | None = None):
        super().__init__(EXIT_PREEMPTED)
        self.message, self.checkpoint = message, checkpoint

    def __str__(self) -> str:
        return self.message


USER_ERRORS = (UserError, ValueError, OSError)


def debug_requested() -> bool:
    """Whether `TRL_DPO_EXT_DEBUG` asks for tracebacks (any value but empty, `0`, `false` or `no`)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def exit_status_of(function: Callable[..., int | None], *args, debug: bool = False) -> int:
    """
    Call `function(*args)` and return its exit status (0 when it returns None). A user error is printed as
    `error: MESSAGE` on stderr and gives status 2, Ctrl-C gives 130, both without a traceback unless `debug` or
    `TRL_DPO_EXT_DEBUG` is set; a preemption (`Preempted`, whose message the trainer has logged) gives 75; any other
    exception propagates with its traceback.
    """
    debug = debug or debug_requested()
    try:
        status = function(*args)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"error: {describe(error)}", file=sys.stderr)
        print(f"(set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Preempted as preempted:
        return preempted.code
    return 0 if status is None else status


def describe(error: BaseException) -> str:
    """The message of `error`; an `OSError` from the system reads as its reason and the path, without the errno."""
    if isinstance(error, OSError) and error.strerror:
        paths = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
        return f"{error.strerror}: {paths}" if paths else error.strerror
    return str(error) or type(error).__name__
