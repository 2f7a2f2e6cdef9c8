"""How the command line and the recipe end on a mistake the user can fix: one line on stderr, exit status 2.

    error: data.jsonl: line 17, character 12: invalid JSON (Unterminated string starting at character 12)

Errors the user acts on from the message are the ones in `USER_ERRORS`: bad settings and data (`ValueError`, raised
by the config dataclasses and the data loader with the field, file, line or row named), files and directories that
cannot be read or written (`OSError`) and our own `UserError` (a run already holding the output directory, ...).
Anything else is a bug: it keeps its traceback. `TRL_DPO_EXT_DEBUG=1` (or `trl-dpo-ext --debug COMMAND`) re-raises
user errors too, with the traceback.
"""

import os
import sys
from collections.abc import Callable


DEBUG_ENV = "TRL_DPO_EXT_DEBUG"
EXIT_USER_ERROR = 2  # as argparse exits on a bad flag: the input needs changing
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention for Ctrl-C


class UserError(Exception):
    """An error whose message says what to change; the command line prints it without a traceback."""


USER_ERRORS = (UserError, ValueError, OSError)


def debug_requested() -> bool:
    """Whether `TRL_DPO_EXT_DEBUG` asks for tracebacks (any value but empty, `0`, `false` or `no`)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def exit_status_of(function: Callable[..., int | None], *args, debug: bool = False) -> int:
    """
    Call `function(*args)` and return its exit status (0 when it returns None). A user error is printed as
    `error: MESSAGE` on stderr and gives status 2, Ctrl-C gives 130, both without a traceback unless `debug` or
    `TRL_DPO_EXT_DEBUG` is set; any other exception propagates with its traceback.
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
    return 0 if status is None else status


def describe(error: BaseException) -> str:
    """The message of `error`; an `OSError` from the system reads as its reason and the path, without the errno."""
    if isinstance(error, OSError) and error.strerror:
        paths = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
        return f"{error.strerror}: {paths}" if paths else error.strerror
    return str(error) or type(error).__name__
