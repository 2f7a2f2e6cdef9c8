"""A step with a non-finite loss or gradient is skipped whole: no optimizer step, counted, warned, and after
`max_consecutive_nonfinite` in a row training stops with an error naming the steps and the dataset rows."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import PAIRS
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from transformers import TrainerCallback

from trl_dpo_ext import DPOTrainer, load_qlora_model
from trl_dpo_ext.nonfinite import METRIC, NonFiniteGuard, NonFiniteLossError


class NanGradient(torch.autograd.Function):
    """Identity forward (a finite loss), NaN backward (every gradient NaN)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


POISONS = {
    "nan_loss": lambda loss: loss * float("nan"),  # NaN loss, NaN gradients
    "inf_loss": lambda loss: loss + float("inf"),  # inf loss, finite gradients
    "nan_grad": NanGradient.apply,  # finite loss, NaN gradients
}


class Snapshots(TrainerCallback):
    """The trainable weights before and after every optimizer step."""

    def __init__(self, model):
        self.model, self.before, self.after = model, {}, {}

    def _weights(self):
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def on_step_begin(self, args, state, control, **kwargs):
        self.before[state.global_step + 1] = self._weights()

    def on_step_end(self, args, state, control, **kwargs):
        self.after[state.global_step] = self._weights()


def poisoned_trainer(tiny_dir, tokenizer, dpo_args, poison, bad_rows, **overrides):
    """A QLoRA trainer whose loss is poisoned on batches holding one of `bad_rows`; records each step's rows."""
    model = load_qlora_model(tiny_dir, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    data = Dataset.from_list(PAIRS * 2)  # rows 0..7
    trainer = DPOTrainer(model=model, args=dpo_args(**overrides), train_dataset=data, processing_class=tokenizer)
    compute_loss, step_rows = trainer._compute_loss, {}

    def poisoned(model, inputs, return_outputs):
        loss = compute_loss(model, inputs, return_outputs)
        rows = inputs["example_index"].tolist()
        step_rows[trainer.state.global_step + 1] = sorted(rows)
        return POISONS[poison](loss) if set(rows) & set(bad_rows) else loss

    trainer._compute_loss = poisoned
    return trainer, step_rows


@pytest.mark.parametrize("poison", sorted(POISONS))
def test_a_non_finite_step_is_skipped_counted_and_warned(tiny_dir, tokenizer, dpo_args, tmp_path, poison):
    trainer, step_rows = poisoned_trainer(
        tiny_dir, tokenizer, dpo_args, poison, bad_rows=[5], max_steps=4, save_strategy="steps", save_steps=1
    )
    snapshots = Snapshots(trainer.model)
    trainer.add_callback(snapshots)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()

    bad_step = next(step for step, rows in step_rows.items() if 5 in rows)
    for step in range(1, 5):
        moved = any(not torch.equal(snapshots.before[step][n], w) for n, w in snapshots.after[step].items())
        assert moved == (step != bad_step), f"step {step}: weights moved={moved}, bad step={bad_step}"

    messages = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert messages == [
        f"Step {bad_step}: non-finite loss or gradients; the optimizer step was skipped (1 in a row, 1 in total). "
        f"Examples (dataset rows): {step_rows[bad_step]}."
    ]
    counts = {row["step"]: row[METRIC] for row in trainer.state.log_history if METRIC in row}
    assert counts == {step: float(step >= bad_step) for step in range(1, 5)}
    finite_losses = [row["loss"] for row in trainer.state.log_history if "loss" in row and row["step"] != bad_step]
    assert len(finite_losses) == 3 and all(math.isfinite(v) for v in finite_losses)

    # Nothing non-finite reached the weights, the optimizer state or any checkpoint.
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters() if p.is_floating_point())
    for state in trainer.optimizer.state.values():
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())
    saved = sorted((tmp_path / "out").glob("checkpoint-*/adapter_model.safetensors"))
    assert len(saved) >= 1
    for path in saved:
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path


def test_too_many_non_finite_steps_in_a_row_stop_training(tiny_dir, tokenizer, dpo_args):
    trainer, step_rows = poisoned_trainer(
        tiny_dir, tokenizer, dpo_args, "nan_loss", bad_rows=range(8), max_steps=4, max_consecutive_nonfinite=2
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with pytest.warns(RuntimeWarning, match="Step 1: non-finite"), pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    assert str(error.value) == (
        "Non-finite loss or gradients in 2 optimizer steps in a row (max_consecutive_nonfinite=2), stopping at step "
        f"2. Dataset rows of those steps: step 1: rows {step_rows[1]}; step 2: rows {step_rows[2]}. Check these rows, "
        "lower the learning rate, or train in a wider dtype."
    )
    assert sorted(step_rows[1] + step_rows[2]) != sorted(step_rows[1])  # two different batches were named
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)


def test_the_streak_resets_after_a_finite_step(tiny_dir, tokenizer, dpo_args):
    """Two bad steps that are not consecutive never reach max_consecutive_nonfinite=2."""
    trainer, step_rows = poisoned_trainer(
        tiny_dir, tokenizer, dpo_args, "nan_loss", bad_rows=[], max_steps=4, max_consecutive_nonfinite=2
    )
    bad_steps = {1, 3}
    compute_loss = trainer._compute_loss

    def poisoned(model, inputs, return_outputs):
        loss = compute_loss(model, inputs, return_outputs)
        return loss * float("nan") if trainer.state.global_step + 1 in bad_steps else loss

    trainer._compute_loss = poisoned
    with pytest.warns(RuntimeWarning, match="non-finite"):
        trainer.train()
    counts = [row[METRIC] for row in trainer.state.log_history if METRIC in row]
    assert counts == [1.0, 1.0, 2.0, 2.0]


def test_max_consecutive_nonfinite_is_validated(dpo_args):
    with pytest.raises(ValueError, match="`max_consecutive_nonfinite` must be >= 1, got 0"):
        dpo_args(max_consecutive_nonfinite=0)


@pytest.mark.parametrize("bad", [False, True], ids=["finite", "nan_grad"])
def test_the_guard_reads_a_sharded_gradient_norm(tmp_path, bad):
    # Under FSDP2 the gradients are DTensors, and so is their total norm (issue #27: a bare AssertionError in DTensor
    # dispatch). A 1-process gloo group with a file store: no port, nothing else in this process sees it.
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
        weight.grad = distribute_tensor(torch.full((4, 3), float("nan") if bad else 0.5), mesh, [Shard(0)])
        assert isinstance(torch.nn.utils.get_total_norm([weight.grad]), DTensor)
        guard = NonFiniteGuard(3, SimpleNamespace(device=torch.device("cpu"), num_processes=1))
        optimizer = guard.wrap(torch.optim.SGD([weight], lr=1.0))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer.step()
        assert torch.equal(weight.full_tensor(), torch.ones(4, 3) if bad else torch.full((4, 3), 0.5))
        assert (guard.skipped, len(caught)) == ((1, 1) if bad else (0, 0))
    finally:
        torch.distributed.destroy_process_group()
