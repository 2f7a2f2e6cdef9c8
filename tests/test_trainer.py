"""The trainer against stock `trl.DPOTrainer` (same model, data, seed), its metrics and its data checks."""

import math
import warnings

import pytest
import torch
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from trl_dpo_ext import DPOTrainer, PreferenceCollator


def full_models(tiny_dir):
    """Policy = the tiny model; reference = the same model with perturbed weights, so the loss is not log 2."""
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return policy, reference


def first_batch_loss(trainer):
    trainer.model.eval()  # no dropout either way; eval mode logs to the eval metrics
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item(), batch


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_first_step_loss_equals_stock_trl(tiny_dir, tokenizer, pairs, dpo_args, loss_type):
    losses = {}
    for name, cls in (("stock", trl.DPOTrainer), ("ours", DPOTrainer)):
        policy, reference = full_models(tiny_dir)
        args = dpo_args(loss_type=[loss_type], beta=0.5)
        trainer = cls(model=policy, ref_model=reference, args=args, train_dataset=pairs, processing_class=tokenizer)
        losses[name], _ = first_batch_loss(trainer)
    assert losses["ours"] == pytest.approx(losses["stock"], abs=1e-5)
    assert abs(losses["ours"] - math.log(2)) > 1e-3  # policy != reference, so the comparison means something


def test_ours_computes_the_loss_itself(tiny_dir, tokenizer, pairs, dpo_args, monkeypatch):
    """Guard for the test above: our path must not be TRL's in disguise."""
    policy, reference = full_models(tiny_dir)
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=dpo_args(), train_dataset=pairs, processing_class=tokenizer
    )
    assert trainer._stock_loss_reasons == []
    assert isinstance(trainer.data_collator, PreferenceCollator)

    def fail(*args, **kwargs):
        raise AssertionError("stock TRL loss was called")

    monkeypatch.setattr(trl.DPOTrainer, "_compute_loss", fail)
    first_batch_loss(trainer)


def test_qlora_training_matches_stock_trl_step_by_step(tiny_dir, tokenizer, toy, dpo_args, load_4bit):
    """Same 4-bit base, same LoRA config and seed, three optimizer steps: the same loss at every step.

    In TRL's own (plain) layout: TRL keeps the LoRA weights of a 4-bit model in bf16, so a layout that sums the same
    gradients in another order drifts by bf16 rounding; `test_layout.py` checks the layouts in fp32.
    """
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    history = {}
    for name, cls in (("stock", trl.DPOTrainer), ("ours", DPOTrainer)):
        args = dpo_args(per_device_train_batch_size=4, share_prompt=False)
        trainer = cls(
            model=load_4bit(), args=args, train_dataset=toy["train"], processing_class=tokenizer, peft_config=lora
        )
        trainer.train()
        history[name] = [row for row in trainer.state.log_history if "loss" in row]
    assert len(history["ours"]) == 3
    for stock, ours in zip(history["stock"], history["ours"]):
        for key in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected", "entropy"):
            assert ours[key] == pytest.approx(stock[key], rel=1e-6, abs=1e-5), key  # fp32 rounding of sums
    assert history["ours"][-1]["loss"] < history["ours"][0]["loss"]


def test_logged_metrics(tiny_dir, tokenizer, toy, dpo_args, load_4bit):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=load_4bit(), args=dpo_args(), train_dataset=toy["train"], processing_class=tokenizer, peft_config=lora
    )
    trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    trl_names = {
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "num_tokens",
    }  # fmt: skip
    ours = {"logps/ref_chosen", "logps/ref_rejected", "kl", "displacement", "memory/peak_mib"}
    assert trl_names | ours <= set(logs[0])
    assert "tokens_per_second" in logs[-1]
    for row in logs:
        # Identities between the logged means: reward = β·(logp − ref logp), margin = chosen − rejected reward.
        assert row["rewards/chosen"] == pytest.approx(0.1 * (row["logps/chosen"] - row["logps/ref_chosen"]), abs=1e-4)
        assert row["rewards/margins"] == pytest.approx(row["rewards/chosen"] - row["rewards/rejected"], abs=1e-5)
        assert row["displacement"] == pytest.approx(-row["rewards/chosen"] / 0.1, abs=1e-3)
        assert row["kl"] >= 0
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1 runs before any update: π = π_ref


def test_other_trl_losses_run_through_trl(tiny_dir, tokenizer, pairs, dpo_args):
    policy, reference = full_models(tiny_dir)
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=dpo_args(loss_type=["robust"], label_smoothing=0.1),
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    assert trainer._stock_loss_reasons == ["loss_type ['robust'] is not among ['hinge', 'ipo', 'sigmoid']"]
    stock = trl.DPOTrainer(
        model=full_models(tiny_dir)[0],
        ref_model=full_models(tiny_dir)[1],
        args=dpo_args(loss_type=["robust"], label_smoothing=0.1),
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    assert first_batch_loss(trainer)[0] == pytest.approx(first_batch_loss(stock)[0], abs=1e-5)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "a", "chosen": "b"}], "missing column 'rejected'"),
        ([{"prompt": "p", "chosen": "x", "rejected": "y"}, {"prompt": "p", "chosen": "", "rejected": "y"}],
         "column 'chosen', row 1: empty or whitespace-only string"),
        ([{"prompt": "p", "chosen": "x", "rejected": "y"}, {"prompt": "  ", "chosen": "x", "rejected": "y"}],
         "column 'prompt', row 1: empty or whitespace-only string"),
        ([{"prompt": "p", "chosen": "x", "rejected": "y"}] * 2 + [{"prompt": "p", "chosen": "z", "rejected": "z"}],
         "row 2: 'chosen' equals 'rejected'"),
        ([{"chosen": "x", "rejected": "y"}], "row 0: 'chosen' and 'rejected' differ from their first character, so "
         "the implicit prompt"),
    ],
)  # fmt: skip
def test_bad_rows_fail_before_training(tiny_dir, tokenizer, dpo_args, rows, message):
    policy, reference = full_models(tiny_dir)
    with pytest.raises(ValueError, match=message):
        DPOTrainer(
            model=policy, ref_model=reference, args=dpo_args(), train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )  # fmt: skip


def test_non_string_value_names_column_and_row(tiny_dir, tokenizer, dpo_args):
    rows = Dataset.from_dict({"prompt": ["p", "q"], "chosen": ["x", "y"], "rejected": [["a"], ["b"]]})
    policy, reference = full_models(tiny_dir)
    with pytest.raises(ValueError, match="column 'rejected', row 0: expected a string like the first row"):
        DPOTrainer(model=policy, ref_model=reference, args=dpo_args(), train_dataset=rows, processing_class=tokenizer)


def test_truncated_rows_are_counted_and_all_truncated_is_an_error(tiny_dir, tokenizer, dpo_args, pairs):
    long_prompt = {"prompt": "User: " + "tell me more " * 40, "chosen": " Sure!", "rejected": " No."}
    mixed = Dataset.from_list(list(pairs) + [long_prompt])
    policy, reference = full_models(tiny_dir)
    with pytest.warns(
        UserWarning, match=r"train dataset: 1 of 5 rows dropped because their prompt alone is at least "
    ):
        DPOTrainer(
            model=policy, ref_model=reference, args=dpo_args(max_length=40), train_dataset=mixed,
            processing_class=tokenizer,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"2 of 2 rows dropped .* No rows are left"):
        DPOTrainer(
            model=policy, ref_model=reference, args=dpo_args(max_length=40),
            train_dataset=Dataset.from_list([long_prompt, {**long_prompt, "chosen": " Yes"}]),
            processing_class=tokenizer,
        )  # fmt: skip


def test_valid_data_raises_no_truncation_warning(tiny_dir, tokenizer, dpo_args, pairs):
    policy, reference = full_models(tiny_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        DPOTrainer(model=policy, ref_model=reference, args=dpo_args(), train_dataset=pairs, processing_class=tokenizer)
