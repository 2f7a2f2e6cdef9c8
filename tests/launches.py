"""The recipe launched on several CPU processes through `accelerate launch` and `tests/distributed_probe.py`, for
`tests/test_distributed.py` (DDP against one process) and `tests/test_sharded.py` (FSDP2 and ZeRO-3 against DDP).

The DDP launches are a session fixture (`ddp_runs` in `tests/conftest.py`): both test modules compare with the same
runs, and each launch costs CI ~30 s.

Not a test module (no `test_` prefix): pytest never collects it.
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from numerics import backward_rtol, forward_rtol, sum_rtol

from trl_dpo_ext.tiny_model import tiny_llama_config


ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "recipes" / "accelerate"
PROBE = Path(__file__).parent / "distributed_probe.py"
TRAIN_PAIRS = 320  # the bundled toy set's train split
BATCH = 2  # per process in the 2-process runs; the single process takes 2 * BATCH
STEPS = 2
HELDOUT = 4  # held-out pairs the recipe scores before and after training
TIMEOUT_S = 400  # a run takes ~30 s on 2 cores (ZeRO-3's first ~140 s: a JIT build); a known exit hang never ends
FLAGS = [
    "--config", "tiny", "--max_steps", str(STEPS), "--logging_steps", "1", "--warmup_steps", "0",
    "--heldout_pairs", str(HELDOUT), "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
    "--seed", "42", "--per_device_train_batch_size", str(BATCH),
    # SGD: an update linear in the gradient, so step 2 checks DDP's gradient averaging to 1e-5. With the recipe's AdamW
    # the first update is about lr * sign(gradient), and gradient entries near zero, whose bf16 rounding differs
    # between one backward over 2b pairs and the average of two over b, flip sign: step 2 then differs by 2.5e-5
    # (docs/distributed.md). Momentum gives the optimizer a state (still linear in the gradients) that a resumed run
    # must restore from its checkpoint to end where the uninterrupted one does; it moves the last update only, not
    # the losses logged at steps 1 and 2.
    "--optim", "sgd", "--optim_args", "momentum=0.9",
]  # fmt: skip

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


@dataclass
class Run:
    """What one launch printed and wrote."""

    stdout: str
    stderr: str
    steps: list[dict]  # the logged training steps (`metrics.jsonl` rows with a loss)
    output_dir: Path

    def probe(self, what: str) -> dict[int, dict]:
        """The probe's `rank R <what> {JSON}` lines (`holds`, `report`), by rank."""
        found = re.findall(rf"^distributed_probe: rank (\d+) {what} (.*)$", self.stdout, flags=re.M)
        return {int(rank): json.loads(payload) for rank, payload in found}


def launch(config: str, tmp_path: Path, *flags: str, env: dict | None = None, launcher: tuple[str, ...] = ()) -> Run:
    """
    `accelerate launch --config_file recipes/accelerate/<config> LAUNCHER tests/distributed_probe.py FLAGS` in a
    fresh cache (unless `env` names one), offline, without CUDA, on a free port (other test sessions may launch at the
    same time).
    """
    out = tmp_path / "run"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRL_DPO_EXT_CACHE": str(tmp_path / "cache"),
        "CUDA_VISIBLE_DEVICES": "",
        **(env or {}),
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
        "--main_process_port", "0", *launcher, str(PROBE), *FLAGS, "--output_dir", str(out), *flags,
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
    return Run(stdout, stderr, [row for row in rows if "loss" in row], out)


def probe_lines(stdout: str) -> list[str]:
    return sorted(re.findall(r"distributed_probe: process \d+ of \d+ \(\S+\)", stdout))


def cache_log(stderr: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The reference-cache log lines of a run: `(rank, path)` of each write and of each hit."""
    # Not anchored to line starts: the other rank's progress bars share stderr and end in \r, not \n.
    pattern = r"\[rank (\d)\] trl_dpo_ext\.refcache: Reference cache {} (\S+\.safetensors)"
    written = re.findall(pattern.format("for the train dataset written to"), stderr)
    return written, re.findall(pattern.format("hit for the train dataset:"), stderr)


def ddp_runs(tmp_path_factory) -> dict[str, Run]:
    """DDP on 2 CPU processes (`ddp_cpu.yaml`, batch BATCH each) and 1 process with the same global batch."""
    two = launch("ddp_cpu.yaml", tmp_path_factory.mktemp("ddp"), "--use_cpu", "true")
    one = launch(
        "single_gpu.yaml", tmp_path_factory.mktemp("single"), "--use_cpu", "true",
        "--per_device_train_batch_size", str(2 * BATCH),
    )  # fmt: skip
    return {"two": two, "one": one}
