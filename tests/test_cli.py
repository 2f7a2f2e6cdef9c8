"""`trl-dpo-ext`: every command's help, the wiring of `dpo`, `pairs`, `score`, `plot` and `env`."""

import importlib
import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib
import torch
import yaml
from datasets import Dataset, load_from_disk
from recipe_run import HELDOUT_PAIRS, trained_run
from transformers import LlamaForSequenceClassification

from trl_dpo_ext import cli, recipe
from trl_dpo_ext.sampling import load_reward
from trl_dpo_ext.tiny_model import tiny_llama_config


ROOT = Path(__file__).parents[1]
HELP_FLAGS = {
    "dpo": ["--dataset_format", "--beta", "--lora_r", "--config"],
    "iterative": ["--num_rounds", "--num_samples", "--reward", "--reward_model_path", "--prompts", "--config"],
    "pairs": ["--reward_fn", "--reward_model", "--prompts", "--output"],
    "merge": ["--adapter", "--out", "--dtype", "--overwrite", "--config"],
    "score": ["--adapter", "--dataset_name", "--max_pairs", "--beta"],
    "plot": ["--metrics", "--keys", "--out", "--config"],
    "env": [],
}


def test_console_script_points_at_the_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["trl-dpo-ext"].split(":")
    assert getattr(importlib.import_module(module), function) is cli.main


def test_top_level_help_lists_the_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert all(re.search(rf"^\s+{name}\s", out, re.MULTILINE) for name in cli.COMMANDS)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train"])
    assert exit_info.value.code == 2 and "unknown command 'train'" in capsys.readouterr().err


@pytest.mark.parametrize("command", list(HELP_FLAGS))
def test_every_command_has_help(command, capsys):
    assert set(HELP_FLAGS) == set(cli.COMMANDS)
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: trl-dpo-ext {command}")
    for flag in HELP_FLAGS[command]:
        assert flag in out, flag


def test_dpo_runs_the_recipe_with_the_packaged_config(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(recipe, "main", lambda *args: calls.append(args))
    assert cli.main(["dpo", "--beta", "0.25", "--output_dir", str(tmp_path)]) == 0
    script_args, training_args, model_args, recipe_args = calls[-1]
    assert (training_args.beta, training_args.output_dir) == (0.25, str(tmp_path))  # flags
    packaged = yaml.safe_load(recipe.DEFAULT_CONFIG.read_text())
    assert (training_args.learning_rate, model_args.lora_r) == (packaged["learning_rate"], packaged["lora_r"])  # YAML
    assert (model_args.model_name_or_path, script_args.dataset_name) == ("smollm2-135m-instruct", "smollm2-concise")
    cli.main(["dpo", "--config", "tiny", "--output_dir", str(tmp_path)])  # a packaged config by name
    tiny = yaml.safe_load((recipe.CONFIGS / "dpo_qlora_tiny.yaml").read_text())
    assert calls[-1][1].learning_rate == tiny["learning_rate"] and calls[-1][2].model_name_or_path == "tiny-llama"
    config = tmp_path / "mine.yaml"
    config.write_text("beta: 0.3\nlearning_rate: 1.0e-4\n")
    cli.main(["dpo", "--config", str(config), "--output_dir", str(tmp_path)])
    assert (calls[-1][1].beta, calls[-1][1].learning_rate) == (0.3, 1e-4)


def test_each_recipe_config_exists_once():
    """`trl-dpo-ext dpo` and `recipes/dpo_qlora.py` read the same packaged YAML files: no second copy to drift."""
    configs = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("dpo_qlora*.yaml") if ".venv" not in p.parts)
    assert configs == ["trl_dpo_ext/configs/dpo_qlora.yaml", "trl_dpo_ext/configs/dpo_qlora_tiny.yaml"]
    assert sorted(p.name for p in recipe.CONFIGS.glob("*.yaml")) == ["dpo_qlora.yaml", "dpo_qlora_tiny.yaml"]


def test_env_reports_versions_and_cuda(capsys):
    assert cli.main(["env"]) == 0
    lines = dict(line[2:].split(": ", 1) for line in capsys.readouterr().out.splitlines())
    for package in ("torch", "trl", "transformers", "peft", "bitsandbytes", "accelerate"):
        assert lines[package] == version(package)
    assert lines["trl_dpo_ext"] == version("trl_dpo_ext")
    assert lines["CUDA visible"].startswith("yes" if torch.cuda.is_available() else "no")


def test_plot_renders_a_history_and_names_missing_metrics(tmp_path, capsys):
    history = [{"step": s, "loss": 1 / s, "rewards/accuracies": 0.5 + s / 10, "kl": s / 5} for s in (1, 2, 3)]
    (tmp_path / "metrics_history.json").write_text(json.dumps(history))
    out = tmp_path / "p.png"
    assert cli.main(["plot", "--metrics", str(tmp_path), "--keys", "loss", "kl", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Plot of loss, kl saved to" in capsys.readouterr().out
    assert cli.main(["plot", "--metrics", str(tmp_path / "metrics_history.json")]) == 2
    assert "has no metric 'rewards/margins'; it has ['kl', 'loss'" in capsys.readouterr().err


REWARD_MODULE = """
def length(prompts, completions):
    return [float(len(c)) for c in completions]
"""


def test_pairs_with_a_reward_function_file(tiny_dir, tmp_path, capsys):
    (tmp_path / "rewards.py").write_text(REWARD_MODULE)
    prompts = ["Is the Acme kettle good? Answer:", "Can you help me? Answer:", "Say hi. Answer:"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")  # one per line; blank lines are skipped
    output = tmp_path / "pairs.jsonl"
    argv = [
        "pairs", "--prompts", str(tmp_path / "prompts.txt"), "--reward_fn", f"{tmp_path / 'rewards.py'}:length",
        "--model_name_or_path", tiny_dir, "--k", "4", "--max_new_tokens", "8", "--output", str(output),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    rows = Dataset.from_json(str(output)).to_list()
    assert rows and f"Wrote {len(rows)} preference pairs from 3 prompts" in capsys.readouterr().out
    for row in rows:
        assert row["prompt"] in prompts
        assert (row["score_chosen"], row["score_rejected"]) == (len(row["chosen"]), len(row["rejected"]))
        assert row["score_chosen"] > row["score_rejected"]


def test_pairs_with_a_reward_model(tiny_dir, tokenizer, tmp_path):
    reward_dir = tmp_path / "reward"
    torch.manual_seed(0)
    LlamaForSequenceClassification(
        tiny_llama_config(len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id)
    ).save_pretrained(reward_dir)
    output = tmp_path / "pairs.parquet"
    argv = [
        "pairs", "--reward_model", str(reward_dir), "--model_name_or_path", tiny_dir, "--max_prompts", "3",
        "--max_new_tokens", "6", "--output", str(output),
    ]  # fmt: skip
    assert cli.main(argv) == 0  # prompts: the bundled training set's
    rows = Dataset.from_parquet(str(output)).to_list()
    assert 1 <= len(rows) <= 3 and all(r["score_chosen"] > r["score_rejected"] for r in rows)


def user_error(argv: list[str], capsys) -> str:
    """The one-line message `trl-dpo-ext ARGV` ends with: exit status 2, `error: ...` on stderr, no traceback."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_pairs_argument_errors(tmp_path, capsys):
    (tmp_path / "rewards.py").write_text(REWARD_MODULE)
    base = ["pairs", "--output", str(tmp_path / "pairs.jsonl")]
    assert "pass exactly one of --reward_model and --reward_fn" in user_error(base, capsys)
    csv = ["pairs", "--output", str(tmp_path / "pairs.csv"), "--reward_fn", "os.path:join"]
    assert "--output must end in .jsonl or .parquet" in user_error(csv, capsys)
    assert "must look like 'module:function' or 'file.py:function', got 'length'" in user_error(
        [*base, "--reward_fn", "length"], capsys
    )
    assert "os.path has no function 'nope'" in user_error([*base, "--reward_fn", "os.path:nope"], capsys)
    assert "no file" in user_error([*base, "--reward_fn", str(tmp_path / "missing.py") + ":length"], capsys)
    assert load_reward(f"{tmp_path / 'rewards.py'}:length").function(["p"], ["abc"]) == [3.0]


def test_score_prints_the_accuracy_the_recipe_printed(tmp_path_factory, capsys):
    run = trained_run(tmp_path_factory)
    after = re.search(r"-> (\S+) after training", run.stdout)[1]
    assert cli.main(["score", "--adapter", str(run.output_dir), "--max_pairs", str(HELDOUT_PAIRS)]) == 0
    assert capsys.readouterr().out.strip() == f"Held-out reward accuracy ({HELDOUT_PAIRS} pairs): {after}"


def test_iterative_takes_a_reward_function_file_as_pairs_does(tiny_dir, tmp_path):
    (tmp_path / "rewards.py").write_text(REWARD_MODULE)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Is the Acme kettle good? Answer:\nCan you help me? Answer:\nSay hi. Answer:\n")
    out = tmp_path / "run"
    argv = [
        "iterative", "--model_name_or_path", tiny_dir, "--prompts", str(prompts),
        "--reward", f"{tmp_path / 'rewards.py'}:length", "--num_rounds", "1", "--num_samples", "4",
        "--max_new_tokens", "8", "--max_steps", "1", "--per_device_train_batch_size", "2", "--lora_r", "4",
        "--lora_alpha", "8", "--report_to", "none", "--save_strategy", "no", "--save_metrics_plot", "false",
        "--disable_tqdm", "true", "--output_dir", str(out),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    rows = load_from_disk(str(out / "round-1" / "pairs")).to_list()
    assert rows
    for row in rows:  # scored by the file's function: the length in characters
        assert (row["score_chosen"], row["score_rejected"]) == (len(row["chosen"]), len(row["rejected"]))


@pytest.mark.parametrize("flags", [["pairs", "--reward_fn"], ["iterative", "--reward"]], ids=["pairs", "iterative"])
def test_a_bad_reward_spec_is_refused_alike_by_every_command(flags, tmp_path, capsys):
    where = ["--output", str(tmp_path / "p.jsonl")] if flags[0] == "pairs" else ["--output_dir", str(tmp_path / "r")]
    line = user_error([flags[0], *where, flags[1], "length"], capsys)
    assert f"{flags[1]} must look like 'module:function' or 'file.py:function', got 'length'" in line
