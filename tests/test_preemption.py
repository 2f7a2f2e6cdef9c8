"""Preemption (issue #28): SIGTERM, SIGUSR1 or a first Ctrl-C mid-run ends the run with a complete checkpoint at the
step reached, within `BOUND_S`, with exit status 75 and a log line naming the checkpoint; resuming it ends with the
adapter of a run that never stopped, bit for bit (plain DPO, the reference cache, iterative DPO mid-round); a second
Ctrl-C stops at once; under DDP a signal to one rank stops both at the same step."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import PAIRS
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState

from trl_dpo_ext.checkpoints import checkpoint_problem
from trl_dpo_ext.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted, exit_status_of
from trl_dpo_ext.preemption import SIGNALS, PreemptionCallback
from trl_dpo_ext.tiny_model import default_model_path


ROOT = Path(__file__).parents[1]
BOUND_S = 30  # signal to exit, tiny model on a loaded 2-core machine (measured: ~3 s); the rest of a step plus a save
STEPS = 8
FLAGS = [
    "--config", "tiny", "--max_steps", str(STEPS), "--save_steps", "1000", "--logging_steps", "1",
    "--heldout_pairs", "0", "--report_to", "none", "--save_metrics_plot", "false", "--disable_tqdm", "true",
]  # fmt: skip
DPO = [sys.executable, "-m", "trl_dpo_ext.cli", "dpo"]
RECIPE = [sys.executable, str(ROOT / "recipes" / "dpo_qlora.py")]
PROMPTS = [row["prompt"] for row in PAIRS] * 2  # as tests/test_iterative.py samples


@pytest.fixture(scope="module", autouse=True)
def shared_cache(tmp_path_factory):
    """One `TRL_DPO_EXT_CACHE` for the module's runs: the tiny model is built once, here, not by every run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRL_DPO_EXT_CACHE", str(tmp_path_factory.mktemp("cache")))
        default_model_path()
        yield


def environment(tmp_path: Path, **extra: str) -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        # One thread each: the runs of a test overlap on a small machine, and every run of a comparison computes with
        # the same thread count.
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def start(command: list[str], tmp_path: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        command, env=environment(tmp_path, **env), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def finish(process: subprocess.Popen, expected: int) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == expected, stderr[-3000:]
    return stdout, stderr


def dpo(tmp_path: Path, name: str, *flags: str, command: list[str] = DPO) -> list[str]:
    """`command` with the tiny flags, output in tmp_path/name and its own reference cache (used with --ref_cache)."""
    return [
        *command, *FLAGS, "--output_dir", str(tmp_path / name), "--ref_cache_dir", str(tmp_path / f"ref_{name}"),
        *flags,
    ]  # fmt: skip


def logged_steps(metrics: Path) -> list[int]:
    """The steps in `metrics` (metrics.jsonl) so far: its complete lines only (the run may be writing the next)."""
    lines = metrics.read_text().split("\n")[:-1] if metrics.is_file() else []
    return [json.loads(line)["step"] for line in lines]


def wait_for_logged_step(process: subprocess.Popen, metrics: Path, step: int = 1) -> None:
    """Until step `step` is logged in `metrics`: training is under way."""
    while not any(logged >= step for logged in logged_steps(metrics)):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)


def preempt(process: subprocess.Popen, out: Path, *signums: int, expected: int = EXIT_PREEMPTED):
    """Send `signums` to `process` once a step is logged in `out`; returns its stderr and the seconds to its exit."""
    wait_for_logged_step(process, out / "metrics.jsonl")
    sent = time.monotonic()
    for signum in signums:
        os.kill(process.pid, signum)
        time.sleep(0.2)  # two signals at once are one to Python: its C handler only sets a flag
    process.wait(timeout=600)
    seconds = time.monotonic() - sent
    return finish(process, expected)[1], seconds


def the_checkpoint(out: Path, stderr: str) -> Path:
    """The one checkpoint in `out`: complete, at the step it records, named by the log line."""
    (checkpoint,) = out.glob("checkpoint-*")  # save_steps is beyond max_steps: only the preemption saves
    assert checkpoint_problem(checkpoint) is None
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    assert f"checkpoint written to {checkpoint}. Run the same command with `--resume_from_checkpoint last`" in stderr
    return checkpoint


def step_of(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


def assert_same_adapter(expected: Path, actual: Path) -> None:
    # Exact (see tests/test_resume.py): the resumed process replays the uninterrupted run's computation.
    straight, resumed = load_file(expected), load_file(actual)
    assert straight.keys() == resumed.keys() and len(straight) > 0
    for name, weight in straight.items():
        assert resumed[name].dtype == weight.dtype and torch.equal(resumed[name], weight), name


@pytest.mark.parametrize(
    "signum, command, flags",
    [(signal.SIGTERM, DPO, ()), (signal.SIGUSR1, RECIPE, ("--ref_cache", "true"))],
    ids=["sigterm-dpo-command", "sigusr1-recipe-ref-cache"],
)
def test_a_preempted_run_resumes_to_the_uninterrupted_adapter(tmp_path, signum, command, flags):
    out = tmp_path / "preempted"
    # The uninterrupted run beside the preempted one: two processes on two cores; the bound still holds.
    straight = start(dpo(tmp_path, "straight", *flags, command=command), tmp_path)
    stderr, seconds = preempt(start(dpo(tmp_path, "preempted", *flags, command=command), tmp_path), out, signum)
    assert seconds < BOUND_S, seconds
    checkpoint = the_checkpoint(out, stderr)
    assert f"{signum.name}: training stopped after step {step_of(checkpoint)}" in stderr
    assert 1 <= step_of(checkpoint) < STEPS
    assert not (out / "adapter_model.safetensors").exists()  # stopped before the final save
    assert not (out / "_trl_dpo_ext.lock").exists()  # released on the way out

    resumed = start(dpo(tmp_path, "preempted", *flags, "--resume_from_checkpoint", "last", command=command), tmp_path)
    finish(straight, 0)
    finish(resumed, 0)
    assert_same_adapter(tmp_path / "straight" / "adapter_model.safetensors", out / "adapter_model.safetensors")


def test_iterative_preempted_mid_round_resumes_to_the_uninterrupted_adapter(tiny_dir, tmp_path):
    # The signal comes from inside, when step 2 of round 2 ends: mid-round, at a known point, without a race with a
    # 4-step round. It is delivered to the handler as an outside one is.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))

    def command(name: str, *flags: str) -> list[str]:
        return [
            sys.executable, str(ROOT / "tests" / "iterative_run.py"), "--model_name_or_path", tiny_dir,
            "--prompts", str(prompts), "--reward", "longer", "--lora_r", "4", "--lora_alpha", "8",
            "--num_rounds", "2", "--num_samples", "3", "--max_new_tokens", "8", "--max_steps", "4",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--logging_steps", "1",
            "--save_steps", "1000", "--report_to", "none", "--disable_tqdm", "true", "--save_metrics_plot", "false",
            "--ref_cache", "true", "--ref_cache_dir", str(tmp_path / f"ref_{name}"), "--output_dir",
            str(tmp_path / name), *flags,
        ]  # fmt: skip

    straight = start(command("straight"), tmp_path)
    preempted = start(command("preempted"), tmp_path, KILL_AT="2:2", KILL_SIGNAL="TERM")
    _, stderr = finish(preempted, EXIT_PREEMPTED)
    finish(straight, 0)
    out = tmp_path / "preempted"
    # Our callback decides before the one that sends the signal: the step after it is the last.
    checkpoint = the_checkpoint(out / "round-2", stderr)
    assert step_of(checkpoint) == 3 and "SIGTERM: training stopped after step 3" in stderr
    assert (out / "round-1" / "round.json").is_file() and not (out / "round-2" / "round.json").exists()

    resumed = subprocess.run(
        command("preempted", "--resume_from_checkpoint", "last"), env=environment(tmp_path), cwd=tmp_path,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Round 2:" in resumed.stdout and "Round 1:" not in resumed.stdout
    assert f"Resuming from {checkpoint}" in resumed.stderr
    assert_same_adapter(tmp_path / "straight" / "adapter_model.safetensors", out / "adapter_model.safetensors")


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen(dpo(tmp_path, "run"), env=environment(tmp_path), cwd=tmp_path, stderr=stderr)
        wait_for_logged_step(process, out / "metrics.jsonl")
        sent = time.monotonic()
        os.kill(process.pid, signal.SIGINT)
        # The second Ctrl-C once the first has been handled (its step-end line is written), while the checkpoint is
        # being written: two sent at once can reach Python as one (it runs a handler only between bytecodes, so both
        # can arrive during one long torch op on a loaded machine), and the run would rightly stop with a checkpoint.
        while process.poll() is None and "stopping after step" not in log.read_text():
            time.sleep(0.005)
        if process.poll() is None:  # else it finished first: the assertion below says so, with its log
            os.kill(process.pid, signal.SIGINT)
        process.wait(timeout=600)
    assert process.returncode == EXIT_INTERRUPTED, log.read_text()[-3000:]
    assert "interrupted" in log.read_text() and time.monotonic() - sent < BOUND_S


def test_ddp_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "recipes" / "accelerate" / "ddp_cpu.yaml"), str(ROOT / "tests" / "distributed_probe.py"),
        *FLAGS, "--use_cpu", "true", "--max_steps", "40", "--per_device_train_batch_size", "2",
        "--output_dir", str(out),
    ]  # fmt: skip
    launcher = start(command, tmp_path)
    wait_for_logged_step(launcher, out / "metrics.jsonl")
    ranks = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        with_rank = child.environ().get("RANK")
        if with_rank is not None and "distributed_probe.py" in " ".join(child.cmdline()):
            ranks[int(with_rank)] = child
    assert sorted(ranks) == [0, 1]
    sent = time.monotonic()
    ranks[1].send_signal(signal.SIGTERM)  # rank 1 only: rank 0 learns of it at the next step end
    psutil.wait_procs(list(ranks.values()), timeout=300)
    seconds = time.monotonic() - sent
    _, stderr = launcher.communicate(timeout=120)
    assert seconds < BOUND_S, seconds
    (checkpoint,) = out.glob("checkpoint-*")
    assert checkpoint_problem(checkpoint) is None
    # Whole: every rank's RNG state, at the one step both stopped after.
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    step = step_of(checkpoint)
    assert f"[rank 1] trl_dpo_ext.preemption: SIGTERM: stopping after step {step} " in stderr, stderr[-3000:]
    assert f"[rank 0] trl_dpo_ext.preemption: A stop signal to another process: stopping after step {step} " in stderr
    # The ranks are the launcher's children, not ours: their statuses are in its report of the failed processes.
    # The first rank out ends with 75; the launcher then stops the other, which may not have exited yet, itself.
    assert f"exitcode  : {EXIT_PREEMPTED} " in stderr


class _OneProcess:
    """The part of an `Accelerator` the callback uses, for one process."""

    num_processes, is_main_process = 1, True

    def wait_for_everyone(self) -> None:
        pass


def test_handlers_are_ours_only_while_training_and_a_second_ctrl_c_interrupts():
    before = {signum: signal.getsignal(signum) for signum in SIGNALS}
    callback, state, control = PreemptionCallback(_OneProcess()), TrainerState(), TrainerControl()
    callback.on_train_begin(None, state, control)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode: recorded, nothing raised
        assert callback.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        state.global_step = 5
        callback.on_step_end(None, state, control)
        assert control.should_save and control.should_training_stop
    finally:
        callback.on_train_end(None, state, control)
    assert {signum: signal.getsignal(signum) for signum in SIGNALS} == before
    callback.checkpoint = "out/checkpoint-5"
    with pytest.raises(Preempted) as preempted:
        callback.raise_if_preempted()
    assert preempted.value.code == EXIT_PREEMPTED == 75 and preempted.value.checkpoint == "out/checkpoint-5"
    assert str(preempted.value).startswith("SIGINT: training stopped after step 5, checkpoint written to out/")

    def preempted_run():
        raise Preempted("stopped", "x")

    assert exit_status_of(preempted_run) == EXIT_PREEMPTED


def test_no_callback_when_opted_out(tiny_dir, pairs, tmp_path):
    from transformers import AutoTokenizer

    from trl_dpo_ext import DPOConfig, DPOTrainer

    kwargs = dict(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    trainer = DPOTrainer(tiny_dir, args=DPOConfig(save_on_preemption=False, **kwargs), train_dataset=pairs,
                         processing_class=tokenizer)  # fmt: skip
    assert trainer.preemption is None
    assert not any(isinstance(c, PreemptionCallback) for c in trainer.callback_handler.callbacks)
