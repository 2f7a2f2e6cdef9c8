"""A launch that accelerate would set up as something else stops with one line naming the flag to change: a world of
1 or no DDP under a multi-process launcher, FSDP or DeepSpeed dropped under `--use_cpu`, FSDP1 (empty adapters).

The environments are what `accelerate launch` 1.16 exports for each config (`accelerate.utils.launch`); the states are
what accelerate's `PartialState` sets up from them on a machine without CUDA (measured, issue #27)."""

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from trl_dpo_ext.errors import UserError
from trl_dpo_ext.launch import FSDP2_CONFIG, Launch, check_accelerator, check_launch


ROOT = Path(__file__).parents[1]
TORCHRUN = {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "RANK": "0"}
FSDP1 = {**TORCHRUN, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}
FSDP2 = {**TORCHRUN, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
ZERO3 = {**TORCHRUN, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


def state(distributed_type, processes=2, backend="gloo"):
    return SimpleNamespace(distributed_type=distributed_type, num_processes=processes, backend=backend)


def args(use_cpu=False, **fields):
    return SimpleNamespace(**{"use_cpu": use_cpu, "fsdp_plugin_args": None, "deepspeed": None, **fields})


def refusal(state, args, environ) -> str:
    with pytest.raises(UserError) as error:
        check_launch(state, args, environ)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_world_of_1_under_a_two_process_launcher_is_refused():
    # No CUDA, no --use_cpu: accelerate finds no backend and each process trains alone.
    message = refusal(state(DistributedType.NO, 1, None), args(), TORCHRUN)
    assert "started 2 processes, but this one trains in a world of 1" in message and "--use_cpu true" in message


def test_gloo_without_use_cpu_is_refused():
    # --ddp_backend gloo without --use_cpu: a 2-process gloo group, but DistributedType.NO (no DDP wrapper).
    message = refusal(state(DistributedType.NO, 2, "gloo"), args(ddp_backend="gloo"), TORCHRUN)
    assert "no distributed training (DistributedType.NO, backend gloo)" in message
    assert "--use_cpu true" in message and "--ddp_backend gloo" in message


@pytest.mark.parametrize("environ", [FSDP1, FSDP2, ZERO3], ids=["fsdp1", "fsdp2", "zero3"])
def test_use_cpu_with_fsdp_or_deepspeed_is_refused(environ):
    # accelerate 1.16 maps a --use_cpu launch to MULTI_CPU and drops the FSDP / DeepSpeed plugin: DDP.
    message = refusal(state(DistributedType.MULTI_CPU), args(use_cpu=True), environ)
    asked = "DeepSpeed" if "ACCELERATE_USE_DEEPSPEED" in environ else f"FSDP{environ['FSDP_VERSION']}"
    assert message.startswith(f"The launch asks for {asked}, but accelerate 1.16 with --use_cpu true sets up ")
    assert "drop --use_cpu true" in message


def test_fsdp1_is_refused_naming_the_fsdp2_config():
    message = refusal(state(DistributedType.MULTI_GPU), args(), FSDP1)
    assert message.startswith("FSDP1 (fsdp_version: 1) saves an empty LoRA adapter")
    assert f"--config_file {FSDP2_CONFIG}" in message and (ROOT / FSDP2_CONFIG).is_file()
    # accelerate reads a missing FSDP_VERSION as 1, and so does the check.
    assert Launch.requested(args(), {"ACCELERATE_USE_FSDP": "true"}).fsdp_version == 1
    # The Trainer's own --fsdp flag asks through its plugin arguments.
    assert Launch.requested(args(fsdp_plugin_args={"fsdp_version": 1}), {}).described == "FSDP1"


@pytest.mark.parametrize(
    "distributed_type, processes, environ",
    [
        (DistributedType.NO, 1, {}),  # plain python
        (DistributedType.NO, 1, {"WORLD_SIZE": "1", "LOCAL_RANK": "0"}),  # a launcher with one process
        (DistributedType.MULTI_CPU, 2, TORCHRUN),  # ddp_cpu.yaml + --use_cpu true
        (DistributedType.MULTI_GPU, 2, TORCHRUN),  # ddp.yaml
        (DistributedType.MULTI_GPU, 2, FSDP2),  # fsdp2_qlora.yaml (FSDP is set up with the Accelerator, later)
        (DistributedType.DEEPSPEED, 2, ZERO3),  # deepspeed_zero3.yaml
    ],
)
def test_launches_that_set_up_what_they_ask_for_pass(distributed_type, processes, environ):
    use_cpu = distributed_type == DistributedType.MULTI_CPU
    check_launch(state(distributed_type, processes), args(use_cpu=use_cpu), environ)


def accelerator(distributed_type, fsdp_version=None):
    plugin = SimpleNamespace(fsdp_version=fsdp_version) if fsdp_version else None
    return SimpleNamespace(distributed_type=distributed_type, state=SimpleNamespace(fsdp_plugin=plugin))


def test_the_trainer_refuses_an_accelerator_that_is_not_what_the_launch_asked_for():
    check_accelerator(accelerator(DistributedType.FSDP, 2), args(), FSDP2)
    check_accelerator(accelerator(DistributedType.MULTI_CPU), args(), TORCHRUN)  # nothing asked: nothing refused
    for environ, got, named in [
        (FSDP2, accelerator(DistributedType.MULTI_CPU), "DistributedType.MULTI_CPU"),
        (FSDP2, accelerator(DistributedType.FSDP, 1), "FSDP1"),
        (ZERO3, accelerator(DistributedType.MULTI_GPU), "DistributedType.MULTI_GPU"),
    ]:
        with pytest.raises(UserError, match=f"but accelerate set up {named}: the run would not train as asked"):
            check_accelerator(got, args(), environ)


def test_a_two_process_fsdp_launch_with_use_cpu_stops_before_any_model_loads(tmp_path):
    """The real launcher: accelerate launch with the FSDP2 config and --use_cpu true, 2 processes on the CPU."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "TRL_DPO_EXT_CACHE": str(tmp_path / "c")}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / FSDP2_CONFIG),
        "--num_processes", "2", "--main_process_port", "0", str(ROOT / "recipes" / "dpo_qlora.py"),
        "--config", "tiny", "--use_cpu", "true", "--output_dir", str(tmp_path / "out"), "--report_to", "none",
    ]  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert "error: The launch asks for FSDP2, but accelerate 1.16 with --use_cpu true sets up " in done.stderr
    assert "Training on" not in done.stdout and not (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert time.monotonic() - start < 120, "it should stop before loading data or a model"
