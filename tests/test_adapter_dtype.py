"""fp32 master weights for adapters on a 4-bit base (issue #16): at DPO's learning rates every LoRA entry moves.

TRL casts the trainable LoRA weights of a quantized model to bf16, and AdamW then updates them in bf16: an update
smaller than half a bf16 ulp of the weight (2^-9 of its magnitude) is rounded away. Adam's step is about `lr` per entry
whatever the gradient's scale, and lora_A starts at kaiming-uniform entries of magnitude ~1/sqrt(hidden) = 0.125 here,
whose half ulp is ~2.4e-4: at lr 5e-7 or 5e-6 only the few entries within ~256·lr of zero can move. In fp32 (half ulp
~4e-9 at 0.125) every update lands.
"""

import pytest
import torch
import trl
from conftest import PAIRS
from datasets import Dataset
from peft import LoraConfig

from trl_dpo_ext import DPOTrainer, load_qlora_model
from trl_dpo_ext.models import cast_adapter_weights


# Step 1 moves only lora_B (lora_A's gradient is B^T·(…) = 0 while B = 0). In the next steps a few lora_A entries still
# have gradients far below AdamW's eps (1e-8), so they move by lr·g/eps, under an fp32 ulp; by step 8 B has grown
# and ≥ 99 % of every tensor has moved (at lr 5e-7, seed 0: 95 % after 2 steps, 99.2 % after 8, 99.9 % after 12).
STEPS = 8
LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


def moved_fraction(trainer_cls, tiny_dir, tokenizer, dpo_args, lr: float, **overrides) -> dict[str, float]:
    """Train STEPS constant-lr steps; per trainable tensor, the fraction of entries that changed at all."""
    torch.manual_seed(0)  # the LoRA init: the same adapter whatever ran before
    model = load_qlora_model(tiny_dir, LORA)
    args = dpo_args(learning_rate=lr, lr_scheduler_type="constant", max_steps=STEPS, **overrides)
    trainer = trainer_cls(
        model=model, args=args, train_dataset=Dataset.from_list(PAIRS * 2), processing_class=tokenizer
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    return {n: (after[n].detach() != w).float().mean().item() for n, w in before.items()}


def trainable_dtypes(trainer) -> set[torch.dtype]:
    return {p.dtype for p in trainer.model.parameters() if p.requires_grad}


def test_fp32_masters_by_default_and_trls_bf16_cast_on_request(tiny_dir, tokenizer, dpo_args):
    data, made = Dataset.from_list(PAIRS), {}
    for name, cls, extra in [
        ("ours", DPOTrainer, {}),
        ("ours_bf16", DPOTrainer, {"adapter_dtype": "bfloat16"}),
        ("stock", trl.DPOTrainer, {}),
    ]:
        model = load_qlora_model(tiny_dir, LORA)
        made[name] = cls(model=model, args=dpo_args(**extra), train_dataset=data, processing_class=tokenizer)
    assert trainable_dtypes(made["ours"]) == {torch.float32}
    assert trainable_dtypes(made["ours_bf16"]) == trainable_dtypes(made["stock"]) == {torch.bfloat16}
    # Only the trainable adapter changed dtype: the frozen 4-bit base and norms are as stock TRL has them (stock also
    # keeps the identity "ref" copy of a fresh adapter, which ours drops).
    frozen = {n: p.dtype for n, p in made["ours"].model.named_parameters() if not p.requires_grad}
    stock = {n: p.dtype for n, p in made["stock"].model.named_parameters() if not p.requires_grad}
    assert len(frozen) > 0 and frozen.items() <= stock.items()


def test_adapter_dtype_is_validated(tmp_path):
    from trl_dpo_ext import DPOConfig

    with pytest.raises(ValueError, match="`adapter_dtype` must be 'float32' or 'bfloat16', got 'fp8'"):
        DPOConfig(output_dir=str(tmp_path), adapter_dtype="fp8", bf16=False)


@pytest.mark.parametrize("lr", [5e-7, 5e-6])
def test_every_adapter_entry_moves_at_dpo_learning_rates(lr, tiny_dir, tokenizer, dpo_args):
    ours = moved_fraction(DPOTrainer, tiny_dir, tokenizer, dpo_args, lr)
    assert ours and min(ours.values()) >= 0.99, {n: f for n, f in ours.items() if f < 0.99}
    # The same run with TRL's cast (ours with adapter_dtype="bfloat16", and stock TRL) rounds most lora_A updates away:
    # what this test would have found before fp32 masters.
    for cls, extra in [(DPOTrainer, {"adapter_dtype": "bfloat16"}), (trl.DPOTrainer, {})]:
        cast = moved_fraction(cls, tiny_dir, tokenizer, dpo_args, lr, **extra)
        lora_a = [f for n, f in cast.items() if "lora_A" in n]
        assert lora_a and sum(lora_a) / len(lora_a) < 0.5, (cls.__name__, lora_a)


def test_cast_adapter_weights_casts_what_it_names(tiny_dir):
    model = load_qlora_model(tiny_dir, LORA)
    model.add_adapter("ref", LORA)  # not active, so frozen
    model.set_adapter("default")
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    trainable = {n for n, p in lora.items() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    # By default, the trainable weights (what the optimizer updates); again, nothing is left to cast.
    assert cast_adapter_weights(model, torch.bfloat16) == len(trainable)
    assert cast_adapter_weights(model, torch.bfloat16) == 0
    # A named adapter: its LoRA weights, frozen or not.
    ref = {n for n in lora if ".ref." in n}
    assert cast_adapter_weights(model, torch.bfloat16, "ref") == len(ref)
    # Only some names.
    some = set(sorted(trainable)[:2])
    assert cast_adapter_weights(model, torch.float32, names=some) == 2
    after = {n: p.dtype for n, p in model.named_parameters()}
    for name, dtype in after.items():
        want = torch.float32 if name in some else torch.bfloat16 if name in trainable | ref else dtypes[name]
        assert dtype == want, name
