"""How every benchmark records a run: the command line that reproduces it, and its results files.

Each file is written atomically (`trl_dpo_ext.atomic.atomic_write`), so an interrupted run leaves the previous record
whole, never half a file. JSON records are indented by one space; a markdown report is an optional header paragraph
(the command, or the device and versions), the body, and a final newline.
"""

import csv
import json
from pathlib import Path

from trl_dpo_ext.atomic import atomic_write


def command(script: str, *flags) -> str:
    """The command line that runs the benchmark `script` with `flags`, as its results record it."""
    return " ".join(["python", "-m", f"benchmarks.{script}", *map(str, flags)])


def write_text(path: Path, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


def write_json(path: Path, record, *, indent: int | None = 1, final_newline: bool = False) -> None:
    write_text(path, json.dumps(record, indent=indent) + ("\n" if final_newline else ""))


def write_results(
    out: Path, name: str, record, body: str, *, header: str | None = None, final_newline: bool = False
) -> None:
    """
    `out/NAME.json` (the record) and `out/NAME.md` (`header`, a blank line, `body`). `final_newline`: whether the
    JSON ends with a newline, as `lm_head_cpu.json` always has and the other records never have (kept, so that a
    rerun differs from a committed record only in its numbers).
    """
    write_json(out / f"{name}.json", record, final_newline=final_newline)
    write_text(out / f"{name}.md", (f"{header}\n\n" if header is not None else "") + body + "\n")


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """One row per dict, `columns` in order; a missing key is an empty cell, a key not in `columns` is left out."""
    with atomic_write(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_figure(fig, path: Path, dpi: int) -> None:
    """Save a matplotlib figure as PNG, and close it."""
    import matplotlib.pyplot as plt

    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    plt.close(fig)
