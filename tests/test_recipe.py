"""The QLoRA recipe end to end, as a user runs it: `accelerate launch recipes/dpo_qlora.py`."""

import json
import os
import subprocess
import sys
from pathlib import Path

from peft import PeftConfig


ROOT = Path(__file__).parents[1]


def launch(recipe: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """`accelerate launch recipes/<recipe>.py FLAGS` in a clean, offline, CPU-only environment."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRL_DPO_EXT_CACHE": str(tmp_path / "cache"),
        "CUDA_VISIBLE_DEVICES": "",
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / f"{recipe}.py"), *flags,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_default_recipe_trains_the_real_model_offline(tmp_path, smollm2_dir):
    """The default config as a new user runs it (SmolLM2 from the installed GGUF, its own pairs), shortened."""
    # The session's converted SmolLM2 in this run's cache directory: a first run converts the GGUF file the same way
    # (tests/test_smollm2.py), and converting it again here would only add a minute.
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / smollm2_dir.name).symlink_to(smollm2_dir, target_is_directory=True)
    out = tmp_path / "run"
    result = launch(
        "dpo_qlora", tmp_path, "--output_dir", str(out), "--max_steps", "2", "--logging_steps", "1",
        "--heldout_pairs", "4", "--heldout_generations", "2", "--generation_max_new_tokens", "8",
    )  # fmt: skip
    assert "Held-out reward accuracy (4 pairs): 0.500 before ->" in result.stdout  # π = π_ref at step 0: all ties
    line = "Held-out replies (2 prompts, greedy, at most 8 new tokens): ended on their own 0.000 before -> 0.000 after"
    assert line in result.stdout, result.stdout  # 8 tokens: too few for any reply to end
    assert "  Q: What is a vitamin?\n    before: " in result.stdout and "[cut off]" in result.stdout
    assert f"Adapter saved to {out}" in result.stdout
    config = PeftConfig.from_pretrained(str(out))
    assert config.r == 16 and "smollm2-135m-instruct" in config.base_model_name_or_path
    history = json.loads((out / "metrics_history.json").read_text())
    assert [row["step"] for row in history if "loss" in row] == [1, 2]


def test_tiny_recipe_runs_offline_through_accelerate_launch(tmp_path):
    out = tmp_path / "run"
    result = launch(
        "dpo_qlora", tmp_path, "--config", "tiny", "--output_dir", str(out), "--max_steps", "6", "--logging_steps",
        "2", "--save_steps", "3", "--heldout_pairs", "16",
    )  # fmt: skip
    assert "Held-out reward accuracy (16 pairs): 0.500 before ->" in result.stdout
    assert f"Adapter saved to {out}" in result.stdout
    assert (tmp_path / "cache" / "tiny-llama-v1" / "config.json").exists()
    assert PeftConfig.from_pretrained(str(out)).r == 16
    assert (out / "adapter_model.safetensors").exists() and (out / "checkpoint-6").is_dir()
    history = json.loads((out / "metrics_history.json").read_text())
    assert [row["step"] for row in history if "loss" in row] == [2, 4, 6]
    assert (out / "metrics.png").stat().st_size > 1000


def test_ppo_to_dpo_recipe_refuses_a_directory_it_did_not_write(tmp_path):
    # TRL's PPO example deletes whatever --output_dir names; ours refuses it in one line and deletes nothing.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data.csv").write_text("a,b\n")
    command = [sys.executable, str(ROOT / "recipes" / "ppo_to_dpo.py"), "--output_dir", str(theirs)]
    result = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert result.returncode == 2 and (theirs / "data.csv").read_text() == "a,b\n"
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: output_dir {theirs} is not empty")


def test_ppo_to_dpo_recipe_runs_offline_through_accelerate_launch(tmp_path):
    out = tmp_path / "run"
    launch(
        "ppo_to_dpo", tmp_path, "--output_dir", str(out), "--total_episodes", "24", "--response_length", "8",
        "--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "2", "--stop_token", "eos",
        "--report_to", "none",
    )  # fmt: skip
    assert (tmp_path / "cache" / "tiny-llama-v1-reward" / "config.json").exists()
    assert (out / "preference_pairs" / "dataset_info.json").exists()
    assert (out / "model.safetensors").exists() and (out / "completions.jsonl").exists()
