"""PPO → DPO: the pair builder on known scores, a TRL-shaped PPO script run by changing only its import, bad inputs."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset, load_from_disk
from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

from trl_dpo_ext.errors import UserError
from trl_dpo_ext.pairs import build_preference_pairs
from trl_dpo_ext.ppo_api import PPOConfig, PPOTrainer, check_reusable_output_dir
from trl_dpo_ext.tiny_model import tiny_llama_config


PROMPTS = ["User: Is the Acme kettle good?\nAssistant:", "User: Recommend a lamp.\nAssistant:"]


@pytest.fixture(scope="module")
def reward_dir(tiny_dir, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("reward")
    torch.manual_seed(1)
    config = tiny_llama_config(len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(path)
    return str(path)


@pytest.fixture
def policy(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


def test_pairs_take_max_and_min_of_a_stub_reward(policy, tokenizer):
    seen = []

    def reward_fn(prompts, completions):
        seen.append(list(zip(prompts, completions)))
        return [float(len(c)) for c in completions]  # known scores: the longer, the better

    pairs = build_preference_pairs(policy, tokenizer, PROMPTS, reward_fn=reward_fn, k=4, max_new_tokens=12)
    assert pairs.column_names == ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]
    by_prompt = {}
    for batch in seen:
        for prompt, completion in batch:
            by_prompt.setdefault(prompt, []).append(completion)
    assert set(by_prompt) == set(PROMPTS) and all(len(v) == 4 for v in by_prompt.values())
    for row in pairs:
        candidates = [c for c in by_prompt[row["prompt"]] if c.strip()]
        assert row["score_chosen"] == max(len(c) for c in candidates) == len(row["chosen"])
        assert row["score_rejected"] == min(len(c) for c in candidates) == len(row["rejected"])
        assert row["score_chosen"] > row["score_rejected"]


def test_ties_are_dropped_and_all_ties_is_an_error(policy, tokenizer):
    def tie_on_first(prompts, completions):
        return [0.0 if p == PROMPTS[0] else float(len(c)) for p, c in zip(prompts, completions)]

    pairs = build_preference_pairs(policy, tokenizer, PROMPTS, reward_fn=tie_on_first, k=3, max_new_tokens=10)
    assert pairs["prompt"] == [PROMPTS[1]]
    with pytest.raises(ValueError, match="no preference pairs: for all 2 prompts the 3 completions tied"):
        build_preference_pairs(policy, tokenizer, PROMPTS, reward_fn=lambda p, c: [1.0] * len(c), k=3)


def test_reward_model_scores_and_token_id_prompts(policy, tokenizer, reward_dir):
    reward_model = LlamaForSequenceClassification.from_pretrained(reward_dir)
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    pairs = build_preference_pairs(policy, tokenizer, ids, reward_model=reward_model, k=4, max_new_tokens=8)
    assert set(pairs["prompt"]) <= set(PROMPTS) and len(pairs) >= 1
    assert all(c > r for c, r in zip(pairs["score_chosen"], pairs["score_rejected"]))


def test_bad_inputs(policy, tokenizer, reward_dir):
    fn = lambda p, c: [0.0] * len(c)  # noqa: E731
    with pytest.raises(ValueError, match=r"`k` must be at least 2 to form a pair \(best and worst\), got 1"):
        build_preference_pairs(policy, tokenizer, PROMPTS, reward_fn=fn, k=1)
    with pytest.raises(ValueError, match="no prompts: the prompt set is empty"):
        build_preference_pairs(policy, tokenizer, [], reward_fn=fn)
    with pytest.raises(ValueError, match="needs an 'input_ids' .* or a 'prompt' column; got columns \\['text'\\]"):
        build_preference_pairs(policy, tokenizer, Dataset.from_dict({"text": ["x"]}), reward_fn=fn)
    two_labels = LlamaForSequenceClassification(tiny_llama_config(len(tokenizer), num_labels=2))
    with pytest.raises(ValueError, match="num_labels=1\\), got num_labels=2"):
        build_preference_pairs(policy, tokenizer, PROMPTS, reward_model=two_labels)
    with pytest.raises(ValueError, match="exactly one of `reward_fn` or `reward_model`"):
        build_preference_pairs(policy, tokenizer, PROMPTS)
    args = PPOConfig(output_dir="unused", report_to="none", bf16=False)
    reward = LlamaForSequenceClassification.from_pretrained(reward_dir)
    prompts = Dataset.from_dict({"input_ids": [[1, 2, 3]]})
    with pytest.raises(ValueError, match="reward_model must output one score \\(num_labels=1\\), got num_labels=2"):
        PPOTrainer(args, tokenizer, policy, None, two_labels, prompts, None)
    with pytest.raises(ValueError, match="train_dataset needs an 'input_ids' \\(tokenized prompts\\) or 'prompt'"):
        PPOTrainer(args, tokenizer, policy, None, reward, Dataset.from_dict({"query": ["x"]}), None)
    with pytest.raises(ValueError, match="train_dataset is empty"):
        PPOTrainer(args, tokenizer, policy, None, reward, Dataset.from_dict({"input_ids": []}), None)
    with pytest.raises(ValueError, match="`num_completions` must be at least 2"):
        PPOConfig(output_dir="unused", num_completions=1, bf16=False)


def test_config_maps_kl_coef_to_beta_and_reports_unused_fields(policy, tokenizer, reward_dir):
    args = PPOConfig(output_dir="unused", kl_coef=0.2, cliprange=0.3, vf_coef=0.5, report_to="none", bf16=False)
    assert args.beta == 0.2 and args.learning_rate == 3e-6 and args.response_length == 53
    assert args.unused_settings() == {"cliprange": 0.3, "vf_coef": 0.5}
    reward = LlamaForSequenceClassification.from_pretrained(reward_dir)
    with pytest.warns(UserWarning, match=r"PPO-only settings .* unused: \{'cliprange': 0.3, 'vf_coef': 0.5\}"):
        PPOTrainer(args, tokenizer, policy, None, reward, Dataset.from_dict({"input_ids": [[5, 6]]}), reward)


# Shaped like TRL's examples/scripts/ppo/ppo.py (1.12): HfArgumentParser((ScriptArguments, PPOConfig, ModelConfig)),
# a left-padded tokenizer with an added [PAD], reward and value models with num_labels=1, a tokenized prompt set.
PPO_SCRIPT = textwrap.dedent(
    """
    import shutil

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser
    from trl import ModelConfig, ScriptArguments, get_peft_config

    from trl.experimental.ppo import PPOConfig, PPOTrainer


    if __name__ == "__main__":
        parser = HfArgumentParser((ScriptArguments, PPOConfig, ModelConfig))
        script_args, training_args, model_args = parser.parse_args_into_dataclasses()
        shutil.rmtree(training_args.output_dir, ignore_errors=True)

        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, padding_side="left")
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        value_model = AutoModelForSequenceClassification.from_pretrained(
            training_args.reward_model_path, num_labels=1
        )
        reward_model = AutoModelForSequenceClassification.from_pretrained(
            training_args.reward_model_path, num_labels=1
        )
        policy = AutoModelForCausalLM.from_pretrained(training_args.sft_model_path)

        peft_config = get_peft_config(model_args)
        if peft_config is None:
            ref_policy = AutoModelForCausalLM.from_pretrained(training_args.sft_model_path)
        else:
            ref_policy = None

        dataset = load_dataset(script_args.dataset_name, split=script_args.dataset_train_split)
        eval_samples = 4
        train_dataset = dataset.select(range(len(dataset) - eval_samples))
        eval_dataset = dataset.select(range(len(dataset) - eval_samples, len(dataset)))

        def prepare_dataset(dataset, tokenizer):
            def tokenize(element):
                outputs = tokenizer(element["prompt"], padding=False)
                return {"input_ids": outputs["input_ids"]}

            return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)

        train_dataset = prepare_dataset(train_dataset, tokenizer)
        eval_dataset = prepare_dataset(eval_dataset, tokenizer)

        trainer = PPOTrainer(
            args=training_args,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref_policy,
            reward_model=reward_model,
            value_model=value_model,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            peft_config=peft_config,
        )
        trainer.train()

        trainer.save_model(training_args.output_dir)
        trainer.generate_completions()
    """
)


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "peft"])
def test_ppo_script_runs_as_dpo_with_only_the_import_changed(tmp_path, tiny_dir, reward_dir, use_peft):
    data = tmp_path / "prompts"
    data.mkdir()
    items = ["kettle", "lamp", "tent", "chair", "drill", "sofa", "oven", "desk", "kayak", "piano", "watch", "bike"]
    (data / "train.jsonl").write_text(
        "".join(json.dumps({"prompt": f"User: Is the {i} good?\nAssistant:"}) + "\n" for i in items)
    )
    out = tmp_path / "out"
    flags = [
        "--dataset_name", str(data), "--dataset_train_split", "train", "--output_dir", str(out),
        "--model_name_or_path", tiny_dir, "--sft_model_path", tiny_dir, "--reward_model_path", reward_dir,
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--max_steps", "2",
        "--response_length", "8", "--missing_eos_penalty", "1.0", "--stop_token", "eos", "--kl_coef", "0.1",
        "--num_ppo_epochs", "2", "--report_to", "none", "--bf16", "False", "--gradient_checkpointing", "False",
        "--save_strategy", "no", "--learning_rate", "1e-3", "--logging_steps", "1",
    ] + (["--use_peft", "--lora_r", "4"] if use_peft else [])  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}

    original = tmp_path / "ppo.py"
    original.write_text(PPO_SCRIPT)
    stock = subprocess.run([sys.executable, str(original), *flags], env=env, capture_output=True, text=True)
    assert stock.returncode != 0 and "trl.experimental.ppo" in stock.stderr  # PPO is gone from this TRL

    swapped = tmp_path / "ppo_as_dpo.py"
    swapped.write_text(
        PPO_SCRIPT.replace(
            "from trl.experimental.ppo import PPOConfig, PPOTrainer",
            "from trl_dpo_ext.ppo_api import PPOConfig, PPOTrainer",
        )
    )
    diff = [(a, b) for a, b in zip(PPO_SCRIPT.splitlines(), swapped.read_text().splitlines()) if a != b]
    assert len(diff) == 1
    result = subprocess.run(
        [sys.executable, str(swapped), *flags], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "num_ppo_epochs" in result.stderr  # reported once as unused
    pairs = load_from_disk(str(out / "preference_pairs"))
    assert set(pairs.column_names) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
    assert len(pairs) >= 4 and all(c > r for c, r in zip(pairs["score_chosen"], pairs["score_rejected"]))
    weights = "adapter_model.safetensors" if use_peft else "model.safetensors"
    assert (out / weights).exists() and (out / "tokenizer.json").exists()
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 4 and set(completions[0]) == {"query", "model response", "score"}
    assert "model response" in result.stdout  # the table is shown
    history = json.loads((out / "metrics_history.json").read_text())
    assert [row["step"] for row in history if "loss" in row] == [1, 2]
    # The DPO trainer chose the layout (no collator of the PPO script's): the saved layout is the one that ran.
    saved = json.loads((out / "dpo_config.json").read_text())
    assert saved["collator"]["share_prompt"] is True and saved["dpo_config"]["share_prompt"] is True


def test_num_rounds_runs_iterative_dpo_with_the_ppo_scripts_models(policy, tiny_dir, tokenizer, reward_dir, tmp_path):
    """A PPO script's full policy + separate reference + reward model, on-policy: each round samples the policy."""
    from transformers import AutoModelForSequenceClassification

    args = PPOConfig(
        output_dir=str(tmp_path / "out"), num_rounds=2, num_completions=3, response_length=8, max_steps=2,
        per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, stop_token="eos", missing_eos_penalty=1.0,
        report_to="none", bf16=False, gradient_checkpointing=False, save_strategy="no", save_metrics_plot=False,
    )  # fmt: skip
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    before = {n: p.clone() for n, p in reference.named_parameters()}
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1),
        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS * 4]),
    )
    summary = trainer.train()
    assert [row["round"] for row in summary] == [1, 2]
    for round_ in (1, 2):
        pairs = load_from_disk(str(tmp_path / "out" / f"round-{round_}" / "pairs"))
        assert all(c > r for c, r in zip(pairs["score_chosen"], pairs["score_rejected"]))
        assert (tmp_path / "out" / f"round-{round_}" / "adapter" / "model.safetensors").is_file()
    assert trainer.dpo_trainer.reference.kind == "ref_model"
    assert all(torch.equal(p, before[n]) for n, p in reference.named_parameters())  # the reference never trains
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_an_output_dir_that_is_not_one_of_its_runs_is_refused_and_kept(tmp_path):
    check_reusable_output_dir(tmp_path / "new")  # missing: created by the run
    check_reusable_output_dir(tmp_path)  # empty
    for marker in ("preference_pairs", "dpo_config.json", "round-1"):  # one of its runs: reused
        run = tmp_path / f"run_{marker}"
        (run / marker).mkdir(parents=True)
        (run / "notes.txt").write_text("kept")
        check_reusable_output_dir(run)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError) as error:
        check_reusable_output_dir(theirs)
    assert str(error.value) == (
        f"output_dir {theirs} is not empty and holds no run of this script (no preference_pairs/ or dpo_config.json); "
        "nothing was deleted. Pass a new or empty --output_dir."
    )
    assert (theirs / "thesis.tex").read_text() == "years of work"
