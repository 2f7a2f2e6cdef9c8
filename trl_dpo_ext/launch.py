"""**What a launch asked for against what accelerate set up**: a run that would train as something else stops, with
one line naming the flag to change, instead of falling back silently.

`accelerate launch` tells each process what its config asked for through environment variables (accelerate 1.16,
`accelerate.utils.launch`): torchrun's `WORLD_SIZE` for every multi-process launch, `ACCELERATE_USE_FSDP=true` with
`FSDP_VERSION` for `distributed_type: FSDP`, `ACCELERATE_USE_DEEPSPEED=true` for `distributed_type: DEEPSPEED`. The
Trainer's own `--fsdp` and `--deepspeed` flags ask for the same. accelerate 1.16 sets up what it can and drops the
rest without a word:

- without an accelerator and without `--use_cpu true`, each launched process is a world of 1: N unrelated runs in one
  output directory;
- `--ddp_backend gloo` without `--use_cpu true` and without an accelerator: a process group, but
  `DistributedType.NO`, so no DDP wrapper and no gradient averaging (measured: step 2's loss stays at log 2);
- `--use_cpu true` with FSDP or DeepSpeed: `DistributedType.MULTI_CPU`, the plugin dropped: DDP, every process
  holding the whole model.

FSDP1 is refused too: peft 0.21.2 names the adapter's keys with FSDP1's `_fsdp_wrapped_module` inside, so the saved
`adapter_model.safetensors` holds no tensors (issue #27). FSDP2 (`recipes/accelerate/fsdp2_qlora.yaml`) has no
wrapper modules.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass

from accelerate.utils import DistributedType

from .errors import UserError


FSDP2_CONFIG = "recipes/accelerate/fsdp2_qlora.yaml"


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "false").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Launch:
    """
    What the launcher and the training arguments asked for.

    Args:
        world_size (`int` or `None`): processes the launcher started (`WORLD_SIZE`); `None` without a launcher.
        sharding (`str` or `None`): `"FSDP"`, `"DeepSpeed"`, or `None` for plain data parallelism.
        fsdp_version (`int` or `None`): the FSDP version asked for; `None` without FSDP.
    """

    world_size: int | None
    sharding: str | None
    fsdp_version: int | None

    @classmethod
    def requested(cls, args, environ: Mapping[str, str] | None = None) -> "Launch":
        """Read from `environ` (default: `os.environ`) and the `TrainingArguments` `args` (`--fsdp`, `--deepspeed`)."""
        environ = os.environ if environ is None else environ
        world_size = int(environ["WORLD_SIZE"]) if "WORLD_SIZE" in environ else None
        plugin_args = getattr(args, "fsdp_plugin_args", None)  # built by TrainingArguments from `--fsdp`
        if plugin_args:
            return cls(world_size, "FSDP", int(plugin_args.get("fsdp_version", 1)))
        if _flag(environ, "ACCELERATE_USE_FSDP"):
            # accelerate's FullyShardedDataParallelPlugin reads FSDP_VERSION the same way (1 when unset).
            return cls(world_size, "FSDP", int(environ.get("FSDP_VERSION", "1")))
        if getattr(args, "deepspeed", None) or _flag(environ, "ACCELERATE_USE_DEEPSPEED"):
            return cls(world_size, "DeepSpeed", None)
        return cls(world_size, None, None)

    @property
    def described(self) -> str:
        return f"FSDP{self.fsdp_version}" if self.sharding == "FSDP" else str(self.sharding)


def check_launch(state, args, environ: Mapping[str, str] | None = None) -> None:
    """
    Stop before any model loads when accelerate's process state (`state`, an `accelerate.PartialState`) is not the
    world the launch asked for, or the launch asks for FSDP1.

    Raises:
        [`UserError`]: one line naming what accelerate set up, what was asked for, and the flag to change.
    """
    launch = Launch.requested(args, environ)
    launched = launch.world_size if launch.world_size is not None else state.num_processes
    if state.num_processes != launched:
        raise UserError(
            f"The launcher started {launched} processes, but this one trains in a world of {state.num_processes}. "
            "Without CUDA, pass --use_cpu true to the recipe."
        )
    if launched > 1 and state.distributed_type == DistributedType.NO:
        raise UserError(
            f"The launcher started {launched} processes, but accelerate set up no distributed training "
            f"(DistributedType.NO{', backend ' + state.backend if state.backend else ''}): their gradients would "
            "never be averaged. Without CUDA, pass --use_cpu true to the recipe (--ddp_backend "
            f"{getattr(args, 'ddp_backend', None) or 'gloo'} alone does not make CPU processes train together)."
        )
    if launch.sharding is not None and state.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU):
        cause = "with --use_cpu true" if getattr(args, "use_cpu", False) else "on no accelerator"
        change = "drop --use_cpu true" if getattr(args, "use_cpu", False) else "launch on GPUs"
        raise UserError(
            f"The launch asks for {launch.described}, but accelerate 1.16 {cause} sets up "
            f"{state.distributed_type} and drops it: the run would train unsharded. To shard, {change}; for DDP on "
            "the CPU, launch with --config_file recipes/accelerate/ddp_cpu.yaml."
        )
    if launch.sharding == "FSDP" and launch.fsdp_version == 1:
        raise UserError(
            "FSDP1 (fsdp_version: 1) saves an empty LoRA adapter with peft 0.21 (its keys carry "
            f"_fsdp_wrapped_module). Launch FSDP2 instead: --config_file {FSDP2_CONFIG}."
        )


def check_accelerator(accelerator, args, environ: Mapping[str, str] | None = None) -> None:
    """
    After the `accelerate.Accelerator` exists: stop when its distributed type (and FSDP version) is not what the
    launch asked for, whatever the reason accelerate had. Asking for nothing in particular is never refused.

    Raises:
        [`UserError`]: one line naming both.
    """
    launch = Launch.requested(args, environ)
    if launch.sharding is None:
        return
    wanted = DistributedType.FSDP if launch.sharding == "FSDP" else DistributedType.DEEPSPEED
    got = str(accelerator.distributed_type)
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.distributed_type == DistributedType.FSDP and plugin is not None:
        got = f"FSDP{plugin.fsdp_version}"
    if accelerator.distributed_type != wanted or (wanted == DistributedType.FSDP and got != launch.described):
        raise UserError(
            f"The launch asks for {launch.described}, but accelerate set up {got}: the run would not train as "
            "asked. Check the launch config's distributed_type and --use_cpu."
        )
