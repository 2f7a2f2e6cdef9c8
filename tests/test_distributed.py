"""Multi-process training: the recipe on 2 processes (DDP over gloo, on the CPU) against 1 process, same global batch.

Both runs go through `accelerate launch` with the configs users get (`recipes/accelerate/ddp_cpu.yaml`,
`recipes/accelerate/single_gpu.yaml`), wrapped by `tests/distributed_probe.py`, which prints the world size each
process trained in and shows the package's reference-cache log lines.

With the same seed the two runs see the same pairs at every step: accelerate's seedable sampler draws one permutation
on every rank, and rank r of 2 takes per-device batches r, r + 2, ... of it, so ranks 0 and 1 together take exactly
the 2b pairs that the single process takes as one batch of 2b. The loss is a mean over pairs and DDP averages the
gradients, so the logged loss and the metrics (gathered across ranks before averaging) must equal the single-process
ones, at step 1 and after an optimizer step.
"""

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import launch_command_parser
from numerics import assert_within, backward_rtol, forward_rtol, sum_rtol

from trl_dpo_ext import recipe
from trl_dpo_ext.tiny_model import tiny_llama_config


ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "recipes" / "accelerate"
PROBE = Path(__file__).parent / "distributed_probe.py"
TRAIN_PAIRS = 320  # the bundled toy set's train split
BATCH = 2  # per process in the 2-process run; the single process takes 2 * BATCH
STEPS = 2
TIMEOUT_S = 300  # a run takes ~25 s on 2 cores; the known exit hang (docs/distributed.md) never ends
FLAGS = [
    "--config", "tiny", "--use_cpu", "true", "--max_steps", str(STEPS), "--logging_steps", "1", "--warmup_steps", "0",
    "--heldout_pairs", "0", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--seed", "42",
    # SGD: an update linear in the gradient, so step 2 checks DDP's gradient averaging to 1e-5. With the recipe's AdamW
    # the first update is about lr * sign(gradient), and gradient entries near zero, whose bf16 rounding differs
    # between one backward over 2b pairs and the average of two over b, flip sign: step 2 then differs by 2.5e-5
    # (docs/distributed.md).
    "--optim", "sgd",
]  # fmt: skip
# Metrics that are not a function of the batch and the weights (wall time, process memory).
UNCOMPARED = {"tokens_per_second", "memory/peak_mib"}


def launch(config: str, tmp_path: Path, *flags: str) -> tuple[str, str, list[dict]]:
    """`accelerate launch --config_file recipes/accelerate/<config> tests/distributed_probe.py FLAGS` in a fresh
    cache, offline, without CUDA; returns stdout, stderr and the logged training steps (`metrics.jsonl`)."""
    out = tmp_path / "run"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRL_DPO_EXT_CACHE": str(tmp_path / "cache"),
        "CUDA_VISIBLE_DEVICES": "",
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config), str(PROBE),
        *FLAGS, "--output_dir", str(out), *flags,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # torchrun starts the workers in sessions of their own: kill them by pid, or they outlive the test and keep
        # its pipes open.
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(
            f"{config}: no exit after {TIMEOUT_S} s. Processes that finished printed:\n"
            f"{probe_lines(stdout)}\n{stderr[-3000:]}"
        )
    assert process.returncode == 0, stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return stdout, stderr, [row for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    two = launch("ddp_cpu.yaml", tmp_path_factory.mktemp("ddp"), "--per_device_train_batch_size", str(BATCH))
    one = launch("single_gpu.yaml", tmp_path_factory.mktemp("single"), "--per_device_train_batch_size", str(2 * BATCH))
    return {"two": two, "one": one}


def probe_lines(stdout: str) -> list[str]:
    return sorted(re.findall(r"distributed_probe: process \d+ of \d+ \(\S+\)", stdout))


def test_two_processes_trained_with_world_size_2(runs):
    stdout, _, steps = runs["two"]
    assert probe_lines(stdout) == [
        "distributed_probe: process 0 of 2 (DistributedType.MULTI_CPU)",
        "distributed_probe: process 1 of 2 (DistributedType.MULTI_CPU)",
    ]
    # The Trainer's own view: a rank's dataloader holds 1/2 of the batches, so one step is 2 * BATCH pairs of an
    # epoch. A single process with the same per-device batch would log half this epoch fraction.
    assert [row["epoch"] for row in steps] == pytest.approx([step * 2 * BATCH / TRAIN_PAIRS for step in (1, 2)])
    assert stdout.count("Training on ") == 1  # printed by the main process only
    assert f"Training on 2 process(es) (DistributedType.MULTI_CPU), global batch {2 * BATCH} pairs" in stdout

    stdout, _, _ = runs["one"]
    assert probe_lines(stdout) == ["distributed_probe: process 0 of 1 (DistributedType.NO)"]
    assert f"Training on 1 process(es) (DistributedType.NO), global batch {2 * BATCH} pairs" in stdout


MAX_LENGTH, LORA_R, BETA = 512, 16, 0.1  # the recipe's (trl_dpo_ext/configs/dpo_qlora.yaml)


def loss_tol(row: dict, first_loss: float) -> float:
    """fp32 rounding of a logged loss computed in other batch shapes (tests/numerics.py): the four mean log-probs of
    the margin to forward + summation rounding (|d loss / d βm| ≤ 1), plus, after a step, the update's share of the
    loss change computed to the backward's rounding."""
    config = tiny_llama_config(512)  # the recipe's tiny model (its vocabulary is at most 512)
    rtol = forward_rtol(config, MAX_LENGTH, LORA_R) + sum_rtol(MAX_LENGTH)
    names = ("logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected")
    moved = abs(row["loss"] - first_loss) * backward_rtol(config, MAX_LENGTH, 2 * BATCH * MAX_LENGTH, LORA_R)
    return BETA * rtol * sum(abs(row[name]) for name in names) + moved


def test_losses_and_gathered_metrics_equal_the_single_process_run_with_the_same_global_batch(runs):
    two, one = runs["two"][2], runs["one"][2]
    assert [row["step"] for row in two] == [row["step"] for row in one] == [1, 2]
    for run in (two, one):
        # Step 1 runs before any update with a fresh (B = 0) adapter: π = π_ref, so the loss is log 2 up to the
        # rounding of π (this batch) against π_ref (the cache, computed in other batches). More is a real difference
        # between the policy and the reference computation, not a tolerance (issue #15: 0.6963 on an AVX512-BF16 CPU).
        assert_within(run[0]["loss"], math.log(2), loss_tol(run[0], run[0]["loss"]), "step-1 loss vs log 2")
    for ddp, single in zip(two, one):
        # Not the derived bound (loss_tol, ~1e-3 here): that could not tell averaged from summed gradients, which move
        # step 2 by |Δloss| ≈ 1.3e-3. 1e-5 is what resolving that needs; measured 3.6e-7 (docs/distributed.md).
        assert_within(ddp["loss"], single["loss"], 1e-5, f"loss, step {ddp['step']}")
        # Gathered, not rank 0's half: token counts are summed and per-pair metrics averaged over all 2 * BATCH pairs.
        assert ddp["num_tokens"] == single["num_tokens"]
        assert ddp["rewards/accuracies"] == single["rewards/accuracies"]
        assert set(ddp) == set(single)
        for name in sorted(set(single) - UNCOMPARED - {"step", "loss"}):
            assert ddp[name] == pytest.approx(single[name], rel=1e-5, abs=1e-5), (ddp["step"], name)
    # Step 2 follows an optimizer step on DDP-averaged gradients: the policy has moved, the same way in both runs.
    # Summed or unreduced gradients would move it differently.
    assert two[0]["loss"] - two[1]["loss"] > 5e-4 and two[1]["kl"] > 0  # 50 times the 1e-5 above


def test_reference_cache_is_built_once_by_rank_0_and_read_by_rank_1(runs):
    _, stderr, _ = runs["two"]
    # Not anchored to line starts: the other rank's progress bars share stderr and end in \r, not \n.
    cache_log = r"\[rank (\d)\] trl_dpo_ext\.refcache: Reference cache {} (\S+\.safetensors)"
    written = re.findall(cache_log.format("for the train dataset written to"), stderr)
    hits = re.findall(cache_log.format("hit for the train dataset:"), stderr)
    assert [rank for rank, _ in written] == ["0"] and [rank for rank, _ in hits] == ["1"]
    path = Path(written[0][1])
    assert hits[0][1] == str(path)
    assert sorted(path.parent.iterdir()) == [path]  # one file: rank 1 wrote nothing of its own


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_accelerate_configs_load_with_accelerate_and_name_only_real_launch_options(path):
    config = ClusterConfig.from_yaml_file(str(path))  # what `accelerate launch --config_file` reads; unknown keys fail
    assert config.num_machines == 1
    assert config.mixed_precision in {"no", "bf16"}
    # Nested keys are not checked by the loader; `accelerate launch` copies each onto its option of the same name
    # (fsdp_config and dynamo_config keys prefixed with fsdp_ / dynamo_), so a misspelt one would be silently ignored.
    options = vars(launch_command_parser().parse_args(["script.py"]))
    nested = [*config.deepspeed_config]
    nested += [key if key.startswith("fsdp_") else f"fsdp_{key}" for key in config.fsdp_config]
    nested += [key if key.startswith("dynamo_") else f"dynamo_{key}" for key in config.dynamo_config]
    assert [key for key in nested if key not in options] == []
    # Every file starts with a comment giving its launch command.
    assert f"--config_file recipes/accelerate/{path.name}" in path.read_text().split("\ncompute_environment:")[0]


def test_accelerate_configs_cover_single_gpu_ddp_fsdp2_qlora_and_zero3():
    configs = {path.name: yaml.safe_load(path.read_text()) for path in CONFIGS.glob("*.yaml")}
    assert sorted(configs) == [
        "ddp.yaml", "ddp_cpu.yaml", "deepspeed_zero3.yaml", "fsdp2_qlora.yaml", "single_gpu.yaml"
    ]  # fmt: skip
    assert {name: c["distributed_type"] for name, c in configs.items()} == {
        "single_gpu.yaml": "NO",
        "ddp.yaml": "MULTI_GPU",
        "ddp_cpu.yaml": "MULTI_GPU",  # not MULTI_CPU: that starts one process without mpirun (see the file)
        "fsdp2_qlora.yaml": "FSDP",
        "deepspeed_zero3.yaml": "DEEPSPEED",
    }
    assert configs["ddp_cpu.yaml"]["use_cpu"] is True and configs["ddp_cpu.yaml"]["num_processes"] == 2
    fsdp = configs["fsdp2_qlora.yaml"]["fsdp_config"]
    # FSDP2 only: the recipe refuses FSDP1, which saves an empty adapter with peft 0.21 (issue #27).
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert configs["deepspeed_zero3.yaml"]["deepspeed_config"]["zero_stage"] == 3
    # FSDP and ZeRO-3 shard floating-point tensors: their launch commands must store the 4-bit weights as bf16.
    for name in ("fsdp2_qlora.yaml", "deepspeed_zero3.yaml"):
        assert "--bnb_4bit_quant_storage bfloat16" in (CONFIGS / name).read_text(), name


def documented_launches() -> list[list[str]]:
    """Every `accelerate launch` command in docs/distributed.md and in the configs' header comments, as words."""
    texts = [(ROOT / "docs" / "distributed.md").read_text()]
    texts += [re.sub(r"^# ?", "", path.read_text(), flags=re.M) for path in sorted(CONFIGS.glob("*.yaml"))]
    commands = []
    for text in texts:
        for line in text.replace("\\\n", " ").splitlines():
            # A command line: optional environment assignments, then `accelerate launch`.
            if re.match(r"\s*(\w+=\S*\s+)*accelerate launch ", line):
                words = shlex.split(line, comments=True)
                commands.append(words[words.index("launch") + 1 :])
    return commands


def test_documented_launch_commands_parse():
    commands = documented_launches()
    assert {Path(words[words.index("--config_file") + 1]).name for words in commands if "--config_file" in words} == {
        path.name for path in CONFIGS.glob("*.yaml")
    }
    for words in commands:
        script = words.index("recipes/dpo_qlora.py")
        launcher = launch_command_parser().parse_args(words[: script + 1])
        if launcher.config_file is not None:
            assert (ROOT / launcher.config_file).is_file(), launcher.config_file
        if launcher.config_file is not None and Path(launcher.config_file).name == "ddp_cpu.yaml":
            # Without it each CPU process trains alone as a world of 1 (docs/distributed.md, Caveats).
            assert " --use_cpu true" in " ".join(words[script:]), words
        # The recipe's own parser validates every flag; bf16 needs use_cpu on a machine without CUDA.
        flags = words[script + 1 :] + ([] if torch.cuda.is_available() else ["--use_cpu", "true"])
        recipe.parse(flags)
