"""The front door (#15): errors a person can act on, settings checked when parsed, one run per output directory,
files readable as the umask says, `plot` leaving a run's files alone, and `--help` without the heavy imports."""

import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from recipe_run import trained_run
from safetensors.torch import save_file
from test_cli import user_error

from trl_dpo_ext import DPOConfig, cli, recipe
from trl_dpo_ext.atomic import atomic_dir, atomic_write, current_umask
from trl_dpo_ext.command_args import RecipeArguments
from trl_dpo_ext.errors import DEBUG_ENV
from trl_dpo_ext.quiet import silence_known_noise
from trl_dpo_ext.runlock import LOCK_NAME, RunLock, RunLockedError


ROOT = Path(__file__).parents[1]
ROW = {"prompt": "User: Hi\nAssistant:", "chosen": " Hello!", "rejected": " What?"}


def subprocess_env(**extra: str) -> dict:
    """This worktree's package first (not another editable install), offline, no CUDA."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


# ---------------------------------------------------------------------------------------------------------------------
# Settings are validated when parsed, and the error names the field.


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"beta": -1.0}, "`beta` must be > 0, got -1.0"),
        ({"beta": 0.0}, "`beta` must be > 0, got 0.0"),
        ({"beta": math.nan}, "`beta` must be > 0, got nan"),
        ({"learning_rate": math.nan}, "`learning_rate` must be a finite number > 0, got nan"),
        ({"learning_rate": math.inf}, "`learning_rate` must be a finite number > 0, got inf"),
        ({"learning_rate": 0.0}, "`learning_rate` must be a finite number > 0, got 0.0"),
        ({"per_device_train_batch_size": 0}, "`per_device_train_batch_size` must be >= 1, got 0"),
        ({"per_device_eval_batch_size": 0}, "`per_device_eval_batch_size` must be >= 1, got 0"),
        ({"gradient_accumulation_steps": 0}, "`gradient_accumulation_steps` must be >= 1, got 0"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        DPOConfig(bf16=False, output_dir=str(tmp_path), **overrides)


def test_heldout_pairs_must_not_be_negative():
    with pytest.raises(ValueError, match="`heldout_pairs` must be >= 0"):
        RecipeArguments(heldout_pairs=-1)


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(ValueError, match=f"`output_dir` {tmp_path / 'run'} is a file, not a directory"):
        DPOConfig(bf16=False, output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=f"cannot be created: {tmp_path / 'run'} is a file"):
        DPOConfig(bf16=False, output_dir=str(tmp_path / "run" / "inner"))


def test_a_missing_output_dir_is_checked_without_being_created(tmp_path):
    config = DPOConfig(
        bf16=False, output_dir=str(tmp_path / "a" / "b"), learning_rate=0.1
    )  # as TRL's own tests build it
    assert config.output_dir == str(tmp_path / "a" / "b") and os.listdir(tmp_path) == []


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write in: chmod for a user, the immutable attribute for root."""
    path = tmp_path / "read_only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
        pytest.skip("running as root without `chattr +i`: no directory is unwritable")
    yield path
    subprocess.run(["chattr", "-i", str(path)], check=True)


def test_an_unwritable_output_dir_is_refused_before_training(read_only_dir):
    with pytest.raises(ValueError, match=f"`output_dir` {read_only_dir / 'run'} is not writable: no permission"):
        DPOConfig(bf16=False, output_dir=str(read_only_dir / "run"))
    with pytest.raises(ValueError, match=f"`output_dir` {read_only_dir} is not writable"):
        DPOConfig(bf16=False, output_dir=str(read_only_dir))


# ---------------------------------------------------------------------------------------------------------------------
# Errors from the command line: one line, exit status 2, the traceback only on request.


def test_a_bad_flag_value_is_one_line_without_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    argv = ["dpo", "--beta", "-1", "--output_dir", str(tmp_path)]
    assert user_error(argv, capsys) == "error: `beta` must be > 0, got -1.0."
    out_file = tmp_path / "file"
    out_file.write_text("x")
    message = user_error(["dpo", "--output_dir", str(out_file)], capsys)
    assert (
        message == f"error: `output_dir` {out_file} is a file, not a directory: name a directory (created if missing)."
    )


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(ValueError, match="`beta` must be > 0"):
        cli.main(["--debug", "dpo", "--beta", "-1", "--output_dir", str(tmp_path)])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="`learning_rate` must be a finite number"):
        cli.main(["dpo", "--learning_rate", "nan", "--output_dir", str(tmp_path)])


def write_jsonl(path: Path, rows: int = 4, tail: bytes = b"") -> Path:
    path.write_bytes(b"".join(json.dumps(ROW).encode() + b"\n" for _ in range(rows)) + tail)
    return path


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", b"", "the file is empty (0 bytes)."),
        ("blank.jsonl", b"\n \n", "no rows: every line is blank."),
        ("latin1.jsonl", b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n', "line 5: not UTF-8 text"),
        ("latin1.csv", b"prompt,chosen,rejected\np,a,b\ncaf\xe9,a,b\n", "line 3: not UTF-8 text (byte 0xe9"),
        ("truncated.jsonl", b'{"prompt": "User: Hi', "line 5: invalid JSON at character 12: Unterminated string"),
        ("empty.csv", b"", "the file is empty (0 bytes)."),
    ],
)
def test_unreadable_data_files_name_the_file_and_line_before_any_model_loads(
    name, content, message, tmp_path, capsys, monkeypatch
):
    path = tmp_path / name
    if name.endswith(".jsonl") and content.strip():
        write_jsonl(path, tail=content)
    else:
        path.write_bytes(content)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was read")

    monkeypatch.setattr(recipe, "load_qlora_model", no_model)
    monkeypatch.setattr(recipe, "resolve_model_path", no_model)
    argv = ["dpo", "--dataset_name", str(path), "--output_dir", str(tmp_path / "run")]
    line = user_error(argv, capsys)
    assert line.startswith(f"error: {path}: {message}"), line
    assert " at at " not in line


def test_truncated_last_line_says_it_may_be_truncated(tmp_path):
    from trl_dpo_ext.preference_data import load_preference_dataset

    path = write_jsonl(tmp_path / "cut.jsonl", rows=16, tail=b'{"prompt": "p", "cho')
    with pytest.raises(ValueError, match=r"line 17: invalid JSON at character 17: .*is the file truncated\?"):
        load_preference_dataset(str(path))


def test_a_bad_row_and_a_missing_split_are_reported_before_any_model_loads(tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was validated")

    monkeypatch.setattr(recipe, "load_qlora_model", no_model)
    monkeypatch.setattr(recipe, "resolve_model_path", no_model)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "chosen": "   "}) + "\n")
    argv = ["dpo", "--dataset_name", str(path), "--output_dir", str(tmp_path / "run")]
    assert user_error(argv, capsys).startswith("error: train dataset: column 'chosen', row 1: ")
    argv = [*argv, "--dataset_train_split", "training"]
    assert user_error(argv, capsys) == (
        "error: `dataset_train_split` 'training': the dataset has no such split; its splits are ['train']."
    )
    missing = ["dpo", "--dataset_name", str(tmp_path / "nope.jsonl"), "--output_dir", str(tmp_path / "run")]
    assert user_error(missing, capsys) == f"error: {tmp_path / 'nope.jsonl'}: no such data file."


def test_score_and_merge_name_a_missing_adapter_directory(tmp_path, capsys):
    missing = tmp_path / "no_run"
    line = user_error(["score", "--adapter", str(missing)], capsys)
    assert line.startswith(f"error: --adapter {missing}: no such directory. Pass a training run's output_dir")
    (tmp_path / "empty").mkdir()
    line = user_error(["merge", "--adapter", str(tmp_path / "empty"), "--out", str(tmp_path / "m")], capsys)
    assert line.startswith(f"error: --adapter {tmp_path / 'empty'} holds no adapter_config.json")


def test_the_recipe_reports_a_bad_setting_in_one_line_through_accelerate_launch(tmp_path):
    """`-q` keeps accelerate from adding its own `CalledProcessError` traceback (README: When something goes wrong)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "dpo_qlora.py"),
        "--beta", "-1", "--output_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    result = subprocess.run(command, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "error: `beta` must be > 0, got -1.0." in result.stderr.splitlines()
    assert "Traceback" not in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# One run per output directory.


def holder(path: Path) -> dict:
    return json.loads((path / LOCK_NAME).read_text())


def test_a_second_run_on_a_held_output_dir_is_refused_naming_the_first(tmp_path):
    with RunLock(tmp_path / "run"):
        first = holder(tmp_path / "run")
        assert (first["pid"], first["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(RunLockedError, match=f"in use by another run \\(pid {os.getpid()} on ") as error:
            RunLock(tmp_path / "run").__enter__()
        assert f"delete {tmp_path / 'run' / LOCK_NAME}" in str(error.value)
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released
    with pytest.raises(RuntimeError), RunLock(tmp_path / "run"):
        raise RuntimeError("training crashed")
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released on an exception too


def test_the_cli_refuses_a_held_output_dir_before_loading_anything(tmp_path, capsys, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the refused run went on")

    monkeypatch.setattr(recipe, "load_preference_dataset", no_data)
    with RunLock(tmp_path / "run"):
        line = user_error(["dpo", "--output_dir", str(tmp_path / "run")], capsys)
    assert line.startswith(f"error: output_dir {tmp_path / 'run'} is in use by another run (pid {os.getpid()}")


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    stale = {"pid": dead_pid(), "host": socket.gethostname(), "time": 0, "process_start": 0, "command": "old"}
    (run / LOCK_NAME).write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING, "trl_dpo_ext.runlock"), RunLock(run):
        assert holder(run)["pid"] == os.getpid()
    assert f"Taking over the lock of a run that is gone (pid {stale['pid']} on" in caplog.text
    # A live pid that started after the lock was written is not the run that wrote it.
    (run / LOCK_NAME).write_text(json.dumps({**stale, "pid": os.getpid(), "process_start": 0}))
    with RunLock(run):
        assert holder(run)["command"] != "old"


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    other = {"pid": dead_pid(), "host": "another-host", "time": 0, "process_start": 0, "command": "recipe.py"}
    (run / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(RunLockedError, match=f"pid {other['pid']} on another-host"):
        RunLock(run).__enter__()


# ---------------------------------------------------------------------------------------------------------------------
# Permissions: what the umask gives.


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_writes_get_the_umask_permissions(umask, file_mode, dir_mode, tmp_path):
    previous = os.umask(umask)
    try:
        with atomic_write(tmp_path / "adapter_config.json") as handle:
            handle.write("{}")
        with atomic_dir(tmp_path / "merged") as staging:
            (staging / "config.json").write_text("{}")
            save_file({"weight": torch.zeros(2)}, staging / "model.safetensors")  # safetensors writes it 0600
    finally:
        os.umask(previous)
    assert (tmp_path / "adapter_config.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "merged").stat().st_mode & 0o777 == dir_mode
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "merged" / name).stat().st_mode & 0o777 == file_mode, name


def test_a_training_run_is_readable_as_the_umask_says(tmp_path_factory):
    run = trained_run(tmp_path_factory)  # trained in this process, umask as the session has it
    umask = current_umask()
    modes = {
        str(path.relative_to(run.output_dir)): path.stat().st_mode & 0o777
        for path in run.output_dir.rglob("*")
        if path.name != LOCK_NAME
    }
    assert "adapter_model.safetensors" in modes and "dpo_config.json" in modes and "metrics.png" in modes
    wanted = {name: (0o777 if (run.output_dir / name).is_dir() else 0o666) & ~umask for name in modes}
    assert modes == wanted


# ---------------------------------------------------------------------------------------------------------------------
# `plot` leaves a training run's files alone.


def test_plot_never_overwrites_unless_told(tmp_path, capsys):
    history = [{"step": s, "loss": 1 / s, "kl": s / 5} for s in (1, 2)]
    (tmp_path / "metrics_history.json").write_text(json.dumps(history))
    (tmp_path / "metrics.png").write_bytes(b"the run's plot")
    argv = ["plot", "--metrics", str(tmp_path), "--keys", "loss", "kl"]
    assert cli.main(argv) == 0
    assert (tmp_path / "metrics.png").read_bytes() == b"the run's plot"
    assert (tmp_path / "metrics_plot.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    line = user_error([*argv, "--out", str(tmp_path / "metrics.png")], capsys)
    assert (
        line
        == f"error: {tmp_path / 'metrics.png'} exists; pass --overwrite to replace it, or --out to write elsewhere."
    )
    assert cli.main([*argv, "--out", str(tmp_path / "metrics.png"), "--overwrite"]) == 0
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------------------------------
# A quiet, fast front door.


HEAVY = ("torch", "transformers", "trl", "datasets", "accelerate", "peft", "bitsandbytes")


def test_help_imports_no_heavy_library(tmp_path, monkeypatch):
    # A cache for the versions installed here (the shipped one is for the versions it was written with; with others
    # the CLI renders the help live, correctly but slowly).
    monkeypatch.setattr(cli, "HELP_CACHE", tmp_path / "cli_help.json")
    cli.write_help_cache()
    script = (
        "import contextlib, io, sys\n"
        "from pathlib import Path\n"
        "from trl_dpo_ext import cli\n"
        f"cli.HELP_CACHE = Path({str(cli.HELP_CACHE)!r})\n"
        "for argv in [['--help'], *[[name, '--help'] for name in cli.COMMANDS]]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        assert cli.main(argv) == 0\n"
        "    assert out.getvalue().startswith('usage: trl-dpo-ext'), argv\n"
        f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_stored_help_is_what_the_parser_prints(command):
    shipped = json.loads(cli.HELP_CACHE.read_text(encoding="utf-8"))
    if shipped["versions"] != cli._help_versions():
        # Written with other TRL/transformers, whose parsers print other flags: the CLI must not show it.
        assert cli.stored_help(command) is None
        return
    assert cli.stored_help(command) == cli.render_help(command), (
        'trl_dpo_ext/data/cli_help.json is out of date: run python -c "from trl_dpo_ext import cli; '
        'cli.write_help_cache()"'
    )


def test_dpo_help_groups_ours_then_trl_then_transformers():
    text = cli.render_help("dpo")
    sections = [text.index(f"\n{title}:\n") for title, _ in recipe.FLAG_GROUPS.values()]
    assert sections == sorted(sections)
    ours, trl_, transformers_ = sections
    assert ours < text.index("--lora_r") < text.index("--dataset_format") < trl_  # QLoRAModelConfig, RecipeArguments
    assert trl_ < text.index("--dataset_name") < text.index("--beta ") < transformers_
    assert transformers_ < text.index("--adam_beta1") and transformers_ < text.index("--save_steps")
    assert text.startswith("usage: trl-dpo-ext dpo [--config FILE] [FLAGS]\n")


def test_known_harmless_noise_is_filtered_and_the_rest_kept(caplog):
    silence_known_noise()
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, "bitsandbytes.backends.cpu.ops"):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        bnb.warning("some other bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["some other bitsandbytes warning"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        silence_known_noise()
        warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=2)
        warnings.warn("`beta` is deprecated", FutureWarning, stacklevel=2)
    assert [str(w.message) for w in caught] == ["`beta` is deprecated"]
