"""`accelerate launch tests/distributed_probe.py FLAGS`: run `recipes/dpo_qlora.py FLAGS` on every process, and print
what `tests/test_distributed.py` and `tests/test_sharded.py` check but the recipe does not print.

- The package logs its reference-cache decisions at INFO level ("... written to PATH" on the process that computed
  the cache, "Reference cache hit ... PATH" on a process that read it), and nothing shows INFO by default: here they
  go to stderr, prefixed with the process rank.
- Each process prints `distributed_probe: process R of W (TYPE)` from accelerate's state, the one the recipe trained
  with, so the test sees how many processes really ran (`accelerate launch --cpu --num_processes 2` starts one).
- After training, each process prints `distributed_probe: rank R holds {JSON}`: accelerate's distributed type, the
  FSDP version, and the parameter elements this rank holds against the model's, for the base's floating-point
  tensors (the 4-bit weights in their storage dtype, norms, embeddings) and for the adapter: a DTensor's local shard
  under FSDP2, a parameter's partition (`ds_tensor`) under ZeRO-3, the whole tensor otherwise; and their dtypes.
- After the recipe's report, each process prints `distributed_probe: rank R report {JSON}`: the report the recipe
  returns (held-out accuracies and the per-pair margins after training), and the margins before training.

**FSDP on the CPU.** accelerate 1.16 sets up FSDP only on an accelerator: with `--use_cpu true` its `PartialState` is
`DistributedType.MULTI_CPU` (a gloo group), and `AcceleratorState` turns `ACCELERATE_USE_FSDP=true` into
`DistributedType.FSDP` only for the accelerator types (`MULTI_GPU`, `MULTI_XPU`, ...): the plugin is dropped. Here
the CPU plays the GPU's part: a process whose state comes out `MULTI_CPU` while the launch asks for FSDP is relabelled
`MULTI_GPU` once its gloo group and its CPU device are set up (the device is not derived from the type again), so
accelerate's own code then sets up FSDP with the launch's plugin, as on GPUs. The library is not patched: its launch
checks see what they see on GPUs (a `MULTI_GPU` process state, then an FSDP accelerator). DeepSpeed needs no help:
with `DS_ACCELERATOR=cpu` and without `--use_cpu`, accelerate sets it up on the CPU as it is.

Not a test module (no `test_` prefix): pytest never collects it.
"""

import json
import logging
import os
import runpy
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType


RECIPE = Path(__file__).parents[1] / "recipes" / "dpo_qlora.py"


def emit(line: str) -> None:
    # One write per line: the ranks share the launcher's stdout, and print() writes the text and its newline apart.
    sys.stdout.write(f"distributed_probe: {line}\n")
    sys.stdout.flush()


def let_the_cpu_run_fsdp() -> None:
    """See the module docstring: a CPU process state relabelled `MULTI_GPU` when the launch asks for FSDP."""
    original = PartialState.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
            self.distributed_type = DistributedType.MULTI_GPU

    PartialState.__init__ = __init__


def held_elements(model) -> dict:
    """Floating-point parameter elements this rank holds (`local`) and the model has (`full`), and the dtypes it holds
    them in (the stored masters, not a compute cast), for the base and the adapter."""
    counts = {part: {"local": 0, "full": 0, "dtypes": set()} for part in ("base", "adapter")}
    for name, parameter in model.named_parameters():
        if not parameter.is_floating_point():
            continue
        if hasattr(parameter, "ds_tensor"):  # ZeRO-3: this rank's partition; the parameter's own data is gathered
            held, full = parameter.ds_tensor, parameter.ds_numel
        elif hasattr(parameter, "to_local"):  # FSDP2: a DTensor
            held, full = parameter.to_local(), parameter.numel()
        else:
            held, full = parameter, parameter.numel()
        part = counts["adapter" if "lora_" in name else "base"]
        part["local"] += held.numel()
        part["full"] += full
        part["dtypes"].add(str(held.dtype))
    return {name: {**part, "dtypes": sorted(part["dtypes"])} for name, part in counts.items()}


def report_from_the_recipe() -> None:
    """Wrap the recipe's train and report steps to print what each rank holds and what the recipe measured."""
    from trl_dpo_ext import recipe

    train, report = recipe.DPORecipe.train, recipe.DPORecipe.report

    def probed_train(self):
        trained = train(self)
        state = AcceleratorState()
        fsdp = state.fsdp_plugin.fsdp_version if state.distributed_type == DistributedType.FSDP else None
        held = {"type": str(state.distributed_type), "fsdp_version": fsdp, **held_elements(self.trainer.model)}
        emit(f"rank {state.process_index} holds {json.dumps(held)}")
        return trained

    def probed_report(self, before, trained, after):
        result = report(self, before, trained, after)
        margins = before["margins"].tolist() if before["margins"] is not None else None
        emit(f"rank {self.state.process_index} report {json.dumps({**result, 'heldout_margins_before': margins})}")
        return result

    recipe.DPORecipe.train, recipe.DPORecipe.report = probed_train, probed_report


def main() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {os.environ.get('RANK', '-')}] %(name)s: %(message)s"))
    package_logger = logging.getLogger("trl_dpo_ext")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    let_the_cpu_run_fsdp()
    report_from_the_recipe()
    sys.argv = [str(RECIPE), *sys.argv[1:]]
    try:
        runpy.run_path(str(RECIPE), run_name="__main__")
    except SystemExit as exit_:  # the recipe ends with its exit status; 0 goes on to the probe line
        if exit_.code:
            raise
    # PartialState is the state the Trainer's `args.world_size` and the data sharding come from; it keeps its values
    # after the recipe's `trainer.end()` has destroyed the process group.
    state = PartialState()
    emit(f"process {state.process_index} of {state.num_processes} ({state.distributed_type})")


if __name__ == "__main__":
    main()
