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

import math
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import launch_command_parser
from launches import BATCH, CONFIGS, ROOT, TRAIN_PAIRS, cache_log, loss_tol, probe_lines
from numerics import assert_within

from trl_dpo_ext import recipe


# Metrics that are not a function of the batch and the weights (wall time, process memory).
UNCOMPARED = {"tokens_per_second", "memory/peak_mib"}


@pytest.fixture(scope="module")
def runs(ddp_runs):
    """The two launches (tests/launches.py; a session fixture, test_sharded.py compares with the same DDP run)."""
    return {name: (run.stdout, run.stderr, run.steps) for name, run in ddp_runs.items()}


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
    written, hits = cache_log(stderr)
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
        if "--ddp_backend" in flags:
            # Outside a launcher, accelerate 1.16 takes --ddp_backend gloo for a process group that no launcher set
            # up, and fails in TrainingArguments' device setup: check the value, parse the rest.
            at = flags.index("--ddp_backend")
            assert flags[at + 1] in ("gloo", "nccl"), words
            flags = flags[:at] + flags[at + 2 :]
        recipe.parse(flags)
