"""The trainer against stock `trl.DPOTrainer` (same model, data, seed), its metrics and its data checks."""

import warnings

import pytest
import torch
import trl
from datasets import Dataset
from numerics import assert_effect, assert_within, ipo_loss_tol, mean_rtol, sequence_logps_tol, sigmoid_loss_tol
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from trl_dpo_ext import DPOTrainer, PreferenceCollator
from trl_dpo_ext.logps import completion_token_logps
from trl_dpo_ext.losses import LOSSES


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


def first_loss_tol(trainer, batch, seq_len: int, loss_type: str) -> float:
    """fp32 rounding of the first-batch loss computed in two layouts (tests/numerics.py): each of the four sequence
    log-probs of a margin to its forward + summation tolerance, through the loss's dependence on the margin."""
    with torch.no_grad():
        runs = completion_token_logps(trainer.model, batch), trainer._reference_token_logps(batch)
    config = trainer.model.config
    (pc, pr), (rc, rr) = [lp.sequence_logps().chunk(2) for lp in runs]
    (tpc, tpr), (trc, trr) = [
        sequence_logps_tol(lp.sequence_logps(), lp.lengths(), config, seq_len).chunk(2) for lp in runs
    ]
    if loss_type == "ipo":  # IPO's margin is per token: each log-ratio divided by its answer length
        lc, lr = runs[0].lengths().double().chunk(2)
        margins = (pc - rc).double() / lc - (pr - rr).double() / lr
        return ipo_loss_tol(trainer.beta, margins, (tpc + trc) / lc + (tpr + trr) / lr)
    return sigmoid_loss_tol(trainer.beta, tpc, tpr, trc, trr)  # sigmoid and hinge: 1-Lipschitz in β·margin


@pytest.mark.numerics
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_first_step_loss_equals_stock_trl(tiny_dir, tokenizer, pairs, dpo_args, loss_type):
    losses, batches, trainers = {}, {}, {}
    for name, cls in (("stock", trl.DPOTrainer), ("ours", DPOTrainer)):
        policy, reference = full_models(tiny_dir)
        args = dpo_args(loss_type=[loss_type], beta=0.5)
        trainer = cls(model=policy, ref_model=reference, args=args, train_dataset=pairs, processing_class=tokenizer)
        losses[name], batches[name] = first_batch_loss(trainer)
        trainers[name] = trainer
    assert "branch_ids" in batches["ours"]  # ours runs the shared-prompt layout, stock TRL the plain one
    # Other shapes, so other reduction orders: equal up to the fp32 rounding of the two layouts' forwards, the context
    # being the longer row of the two.
    seq_len = max(batch["input_ids"].size(1) for batch in batches.values())
    tol = first_loss_tol(trainers["ours"], batches["ours"], seq_len, loss_type)
    assert_within(losses["ours"], losses["stock"], tol, f"{loss_type} loss, ours vs stock TRL")
    # policy != reference, far beyond rounding, so the comparison means something: the loss is not its π = π_ref value
    zeros, ones = torch.zeros(1), torch.ones(1)
    at_reference = LOSSES[loss_type](zeros, zeros, ones, ones, 0.5).item()
    assert_effect(abs(losses["ours"] - at_reference), tol, what="loss vs its value at π = π_ref")


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

    In TRL's own (plain) layout, where ours runs TRL's forward and reductions on the same batch tensors in the same
    process (`TokenLogps.per_sequence`): the same floats, bit for bit, at every step. No rounding tolerance applies,
    and none would do: after a step the two runs would differ by whole bf16 ulps of the adapter (TRL keeps it in
    bf16) and by AdamW steps of size lr on gradient entries whose sign rounding can flip, far above any effect here.
    `test_layout.py` checks the other layouts in fp32.
    """
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    history = {}
    # like with like: stock TRL casts the adapter to bf16
    for name, cls, extra in (("stock", trl.DPOTrainer, {}), ("ours", DPOTrainer, {"adapter_dtype": "bfloat16"})):
        args = dpo_args(per_device_train_batch_size=4, share_prompt=False, **extra)
        trainer = cls(
            model=load_4bit(), args=args, train_dataset=toy["train"], processing_class=tokenizer, peft_config=lora
        )
        trainer.train()
        history[name] = [row for row in trainer.state.log_history if "loss" in row]
    assert len(history["ours"]) == 3
    for stock, ours in zip(history["stock"], history["ours"]):
        for key in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected", "entropy"):
            assert ours[key] == stock[key], (stock["step"], key)  # same ops on the same tensors: exact
    assert history["ours"][-1]["loss"] < history["ours"][0]["loss"]


@pytest.mark.numerics
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
    pairs, beta = trainer.args.per_device_train_batch_size, 0.1
    for row in logs:
        # Identities between the logged means (reward = β·(logp − ref logp), margin = chosen − rejected reward,
        # displacement = ref logp − logp): a mean of differences against a difference of means, equal up to the fp32
        # rounding of the means and of the per-pair differences (tests/numerics.py, mean_rtol). The per-pair values
        # are not logged: mean |logp − ref logp| ≤ |mean logp| + |mean ref logp|, log-probs being ≤ 0.
        chosen = abs(row["logps/chosen"]) + abs(row["logps/ref_chosen"])
        rejected = abs(row["logps/rejected"]) + abs(row["logps/ref_rejected"])
        # roundings per pair: β to fp32, the difference, the product (and for the margin, the difference of rewards)
        reward_tol = mean_rtol(pairs, 3) * beta * chosen
        margin_tol = mean_rtol(pairs, 4) * beta * (chosen + rejected)
        displacement_tol = mean_rtol(pairs, 3) * chosen
        step = f"step {row['step']}"
        want = beta * (row["logps/chosen"] - row["logps/ref_chosen"])
        assert_within(row["rewards/chosen"], want, reward_tol, f"rewards/chosen, {step}")
        want = row["rewards/chosen"] - row["rewards/rejected"]
        assert_within(row["rewards/margins"], want, margin_tol, f"rewards/margins, {step}")
        assert_within(row["displacement"], -row["rewards/chosen"] / beta, displacement_tol, f"displacement, {step}")
        assert row["kl"] >= 0
    # After two updates the identities compare numbers far above their rounding: a wrong β, sign or pairing shows.
    last = logs[-1]
    assert_effect(abs(last["rewards/chosen"]), reward_tol, what="rewards/chosen")
    assert_effect(abs(last["rewards/margins"]), margin_tol, what="rewards/margins")
    assert_effect(abs(last["displacement"]), displacement_tol, what="displacement")
    # Step 1 runs before any update with a fresh adapter (B = 0, its output exactly 0): the policy and reference passes
    # run the same kernels on the same batch, so their log-probs are the same floats and every k3 term is exactly 0.
    assert logs[0]["kl"] == 0.0


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
    (ours_loss, ours_batch), (stock_loss, stock_batch) = first_batch_loss(trainer), first_batch_loss(stock)
    # Ours hands TRL's own loss the plain layout's batch, the same tensors as TRL's collator: the same computation.
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours_batch[key], stock_batch[key]), key
    assert ours_loss == stock_loss  # exact: one code path on the same tensors in one process


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
