"""`accelerate launch tests/distributed_probe.py FLAGS`: run `recipes/dpo_qlora.py FLAGS` on every process, and print
what `tests/test_distributed.py` checks but the recipe does not print.

- The package logs its reference-cache decisions at INFO level ("... written to PATH" on the process that computed
  the cache, "Reference cache hit ... PATH" on a process that read it), and nothing shows INFO by default: here they
  go to stderr, prefixed with the process rank.
- Each process prints `distributed_probe: process R of W (TYPE)` from accelerate's state, the one the recipe trained
  with, so the test sees how many processes really ran (`accelerate launch --cpu --num_processes 2` starts one).

Not a test module (no `test_` prefix): pytest never collects it.
"""

import logging
import os
import runpy
import sys
from pathlib import Path

from accelerate import PartialState


RECIPE = Path(__file__).parents[1] / "recipes" / "dpo_qlora.py"


def main() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {os.environ.get('RANK', '-')}] %(name)s: %(message)s"))
    package_logger = logging.getLogger("trl_dpo_ext")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    sys.argv = [str(RECIPE), *sys.argv[1:]]
    try:
        runpy.run_path(str(RECIPE), run_name="__main__")
    except SystemExit as exit_:  # the recipe ends with its exit status; 0 goes on to the probe line
        if exit_.code:
            raise
    # PartialState is the state the Trainer's `args.world_size` and the data sharding come from; it keeps its values
    # after the recipe's `trainer.end()` has destroyed the process group.
    state = PartialState()
    # One write per line: the ranks share the launcher's stdout, and print() writes the text and its newline apart.
    sys.stdout.write(
        f"distributed_probe: process {state.process_index} of {state.num_processes} ({state.distributed_type})\n"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
