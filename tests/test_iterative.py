"""Iterative DPO (issue #17): each round samples from the current policy, the reference never moves, a run killed in
round 2 resumes to the adapter of one that never stopped, and bad settings are named."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numerics
import pytest
import torch
from conftest import PAIRS
from datasets import Dataset
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerCallback

from trl_dpo_ext import iterative, load_qlora_model
from trl_dpo_ext.iterative import IterativeDPOConfig, IterativeDPOTrainer
from trl_dpo_ext.length_rule import longer_reward
from trl_dpo_ext.pairs import build_preference_pairs


ROOT = Path(__file__).parents[1]
PROMPTS = [row["prompt"] for row in PAIRS] * 2  # 8 prompts (4 distinct texts, sampled independently)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
SETTINGS = dict(
    num_rounds=2, num_samples=3, max_new_tokens=8, generation_batch_size=8, max_steps=4, per_device_train_batch_size=2,
    learning_rate=1e-2, logging_steps=1, bf16=False, gradient_checkpointing=False, report_to="none",
    save_strategy="no", disable_tqdm=True, save_metrics_plot=False, seed=0,
)  # fmt: skip


def iterative_trainer(tiny_dir, tokenizer, tmp_path, **overrides) -> IterativeDPOTrainer:
    torch.manual_seed(0)
    model = numerics.fp32_4bit_kernels(load_qlora_model(tiny_dir, LORA))
    args = IterativeDPOConfig(output_dir=str(tmp_path / "run"), **{**SETTINGS, **overrides})
    return IterativeDPOTrainer(model, args, PROMPTS, tokenizer, reward_fn=longer_reward)


@pytest.mark.numerics
def test_rounds_sample_from_the_current_policy_against_a_fixed_reference(tiny_dir, tokenizer, tmp_path, monkeypatch):
    trainer = iterative_trainer(tiny_dir, tokenizer, tmp_path)
    probe_ids = torch.tensor([tokenizer(PROMPTS[0] + " Sure! It is").input_ids])
    seen, reference = [], []

    def spying(policy, *args, **kwargs):
        with torch.no_grad():  # what the sampler computes, each round
            seen.append(policy(input_ids=probe_ids).logits.float())
        return build_preference_pairs(policy, *args, **kwargs)

    monkeypatch.setattr(iterative, "build_preference_pairs", spying)
    inner = trainer.trainer
    probe = inner._prepare_dataset(Dataset.from_list(PAIRS[:2]), tokenizer, inner.args, "probe")
    batch = inner.data_collator([probe[0], probe[1]])

    class RecordReference(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            reference.append(inner.reference.token_logps(inner.model, inner._prepare_inputs(batch)).logps.clone())

    inner.add_callback(RecordReference())
    summary = trainer.train()
    assert [row["round"] for row in summary] == [1, 2]
    assert len(seen) == 2 and len(reference) == 2

    # The reference is π_ref in both rounds, to the bit: the same module, adapters off, the same batch.
    assert inner.reference.kind == "adapters_off"
    assert torch.equal(reference[0], reference[1])

    # Round 1 sampled from π_ref (the fresh adapter is the identity); round 2 from the round-1 adapter.
    model = trainer.model
    with torch.no_grad(), model.disable_adapter():
        pi_ref = model(input_ids=probe_ids).logits.float()
    set_peft_model_state_dict(model, load_file(tmp_path / "run" / "round-1" / "adapter" / "adapter_model.safetensors"))
    with torch.no_grad():
        round_one = model(input_ids=probe_ids).logits.float()
    # The sampler is the dense copy (dequantized base + merged LoRA); the model runs bitsandbytes' fp32 4-bit path:
    # the same function, different reduction orders.
    config = model.get_base_model().config
    tol = numerics.forward_rtol(config, probe_ids.shape[1], lora_r=4) * pi_ref.abs().max().item()
    numerics.assert_within(seen[0], pi_ref, tol, "round 1 sampler vs π_ref")
    numerics.assert_within(seen[1], round_one, tol, "round 2 sampler vs the round-1 adapter")
    numerics.assert_effect((seen[1] - pi_ref).abs().max().item(), tol, what="round 2 sampler vs π_ref")

    # Each round's pairs were saved with their scores, and the round-1 training raised the reward (longer replies)
    # that round 2's samples then show.
    pairs = {r: iterative.load_from_disk(str(tmp_path / "run" / f"round-{r}" / "pairs")) for r in (1, 2)}
    assert {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"} <= set(pairs[1].column_names)
    assert pairs[2]["score_chosen"] == trainer.round_pairs[2]["score_chosen"]
    assert summary[1]["mean_score_chosen"] > summary[0]["mean_score_chosen"], summary


def test_finished_rounds_are_not_overwritten_without_resume(tiny_dir, tokenizer, tmp_path):
    trainer = iterative_trainer(tiny_dir, tokenizer, tmp_path, num_rounds=1, max_steps=1)
    trainer.train()
    again = iterative_trainer(tiny_dir, tokenizer, tmp_path, num_rounds=1, max_steps=1)
    with pytest.raises(ValueError, match=r"already holds finished rounds \[1\]: pass resume_from_checkpoint=True"):
        again.train()
    assert again.train(resume_from_checkpoint=True) == []  # nothing left to do


def test_prompts_per_round_takes_the_next_slice_each_round(tiny_dir, tokenizer, tmp_path, monkeypatch):
    prompts = [f"{row['prompt']} ({i})" for i, row in enumerate(PAIRS * 2)]  # 8 distinct prompts
    seen = []

    def recording(policy, tokenizer, prompts, **kwargs):
        seen.append(list(prompts))
        pair = {"chosen": " yes", "rejected": " no", "score_chosen": 1.0, "score_rejected": 0.0}
        return Dataset.from_list([{"prompt": p, **pair} for p in prompts])

    monkeypatch.setattr(iterative, "build_preference_pairs", recording)
    torch.manual_seed(0)
    model = load_qlora_model(tiny_dir, LORA)

    def config(count: int) -> IterativeDPOConfig:
        settings = {**SETTINGS, "num_rounds": 3, "max_steps": 1, "prompts_per_round": count}
        return IterativeDPOConfig(output_dir=str(tmp_path / f"run-{count}"), **settings)

    summary = IterativeDPOTrainer(model, config(3), prompts, tokenizer, reward_fn=longer_reward).train()
    assert seen == [prompts[0:3], prompts[3:6], [*prompts[6:8], prompts[0]]]  # in order, wrapping around
    assert [row["pairs"] for row in summary] == [3, 3, 3]
    with pytest.raises(ValueError, match=r"`prompts_per_round` \(9\) exceeds the 8 prompts"):
        IterativeDPOTrainer(model, config(9), prompts, tokenizer, reward_fn=longer_reward)


def test_bad_settings_are_named(tiny_dir, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="`num_rounds` must be >= 1, got 0"):
        IterativeDPOConfig(output_dir=str(tmp_path), num_rounds=0, bf16=False)
    with pytest.raises(ValueError, match=r"`num_samples` must be at least 2 to form a pair \(best and worst\), got 1"):
        IterativeDPOConfig(output_dir=str(tmp_path), num_samples=1, bf16=False)
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0, got nan"):
        IterativeDPOConfig(output_dir=str(tmp_path), temperature=float("nan"), bf16=False)
    with pytest.raises(ValueError, match="`prompts_per_round` must be >= 1 or None, got 0"):
        IterativeDPOConfig(output_dir=str(tmp_path), prompts_per_round=0, bf16=False)
    with pytest.raises(ValueError, match="Pass exactly one of `reward_fn` and `reward_model`"):
        IterativeDPOTrainer(None, IterativeDPOConfig(output_dir=str(tmp_path), bf16=False), PROMPTS, tokenizer)

    def short(prompts, completions):
        return [1.0] * (len(completions) - 1)

    def nan(prompts, completions):
        return [float("nan")] * len(completions)

    for reward, message in [
        (short, r"`reward_fn` returned 23 scores for 24 completions: one per completion"),
        (nan, r"`reward_fn` returned a non-finite score \(nan\) for completion 0"),
    ]:
        trainer = iterative_trainer(tiny_dir, tokenizer, tmp_path / reward.__name__)
        trainer.reward_fn = reward
        with pytest.raises(ValueError, match=message):
            trainer.train()


def run(tmp_path: Path, tiny_dir: str, name: str, *flags: str, kill_at: str | None = None):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRL_DPO_EXT_CACHE": str(tmp_path / "cache"),
        "CUDA_VISIBLE_DEVICES": "",
    }
    if kill_at:
        env["KILL_AT"] = kill_at
    command = [
        sys.executable, str(ROOT / "tests" / "iterative_run.py"), "--model_name_or_path", tiny_dir,
        "--prompts", str(prompts), "--reward", "longer", "--lora_r", "4", "--lora_alpha", "8",
        "--num_rounds", "2", "--num_samples", "3", "--max_new_tokens", "8", "--max_steps", "4",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--logging_steps", "1",
        "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none", "--disable_tqdm", "true",
        "--save_metrics_plot", "false", "--ref_cache", "true", "--ref_cache_dir", str(tmp_path / f"ref_{name}"),
        "--output_dir", str(tmp_path / name), *flags,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == (-signal.SIGKILL if kill_at else 0), result.stderr[-3000:]
    return result


def test_killed_in_round_two_then_resumed_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    run(tmp_path, tiny_dir, "straight")
    run(tmp_path, tiny_dir, "killed", kill_at="2:3")
    out = tmp_path / "killed"
    assert (out / "round-1" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "round-2" / "pairs" / "dataset_info.json").is_file() and (out / "round-2" / "checkpoint-2").is_dir()
    assert not (out / "round-2" / "adapter").exists()
    # "latest", as `trl-dpo-ext dpo` reads it too (this command once took only "last"/"true").
    resumed = run(tmp_path, tiny_dir, "killed", "--resume_from_checkpoint", "latest")
    assert "Round 2:" in resumed.stdout and "Round 1:" not in resumed.stdout  # round 1 was done: not rerun
    assert "Resuming from" in resumed.stderr
    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    final = load_file(out / "adapter_model.safetensors")
    assert straight.keys() == final.keys() and len(straight) > 0
    for name, weight in straight.items():
        # Exact: the resumed round re-reads its saved pairs and the checkpoint's weights, optimizer and RNG state, and
        # runs the same code path on the same shapes as the uninterrupted run.
        assert torch.equal(final[name], weight), name
    # The round-2 pairs were sampled once, before the kill, and reused: the same pairs as the uninterrupted run's.
    pairs = [iterative.load_from_disk(str(tmp_path / n / "round-2" / "pairs")) for n in ("straight", "killed")]
    assert pairs[0].to_list() == pairs[1].to_list()
