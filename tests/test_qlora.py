"""One 4-bit base shared by policy and reference: reference exactness, one copy of the weights, a frozen base."""

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from numerics import assert_effect, assert_within, fp32_4bit_kernels, sequence_logps_tol
from peft import LoraConfig, PeftModel, get_peft_model

from trl_dpo_ext import DPOTrainer, PreferenceCollator, load_qlora_model
from trl_dpo_ext.models import is_identity_adapter, quantized_modules


LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def sequence_logps(model, batch):
    """log π(y|x) with the model's ordinary forward and a full log-softmax (no fused head, no trainer code)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = F.log_softmax(logits.float(), dim=-1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
    return (logps * batch["completion_mask"][:, 1:]).sum(dim=1)


def logps_tol(model, batch, logps):
    """fp32 rounding of Σ_t log p over each answer, computed in another batch shape (tests/numerics.py)."""
    lengths = batch["completion_mask"][:, 1:].sum(dim=1)
    return sequence_logps_tol(logps, lengths, model.config, batch["input_ids"].size(1), lora_r=LORA.r)


def plain_batch(trainer):
    """Four training rows in TRL's plain layout (what `sequence_logps` reads), whatever the trainer's layout."""
    collator = PreferenceCollator(pad_token_id=trainer.processing_class.pad_token_id)
    return collator(list(trainer.train_dataset.select(range(4))))


def base_state(model):
    """Every non-LoRA tensor (the packed 4-bit weights, their quant constants, norms, embeddings), cloned."""
    state = {}
    for name, tensor in model.state_dict().items():
        if "lora_" not in name:
            state[name] = tensor.detach().clone()
    return state


def lora_state(model, adapter):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n}


@pytest.fixture
def sft_adapter(tmp_path, load_4bit):
    """An 'SFT' adapter with non-zero B, so base + adapter differs from the base."""
    model = get_peft_model(load_4bit(), LORA)
    generator = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.copy_(0.2 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(tmp_path / "sft")
    return str(tmp_path / "sft")


def train(model, tokenizer, toy, dpo_args, steps=3):
    trainer = DPOTrainer(
        model=model, args=dpo_args(max_steps=steps, per_device_train_batch_size=4), train_dataset=toy["train"],
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    return trainer


def test_loader_shares_one_base(tiny_dir):
    model = load_qlora_model(tiny_dir, LORA, compute_dtype="float32")
    layers = model.config.num_hidden_layers
    assert len(quantized_modules(model)) == layers * LINEARS_PER_LAYER
    assert all(m.weight.dtype == torch.uint8 for m in quantized_modules(model))
    assert quantized_modules(model)[0].weight.quant_state.nested  # double quantization on
    assert is_identity_adapter(model)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_loader_rejects_ambiguous_adapter_arguments(tiny_dir):
    with pytest.raises(ValueError, match="exactly one of `lora_config`"):
        load_qlora_model(tiny_dir)


@pytest.mark.numerics
def test_fresh_adapter_reference_is_the_untouched_base_and_base_stays_frozen(
    tiny_dir, tokenizer, toy, dpo_args, load_4bit
):
    model = load_qlora_model(tiny_dir, LORA, compute_dtype="float32")
    base_before = base_state(model)
    lora_before = lora_state(model, "default")
    trainer = train(model, tokenizer, toy, dpo_args)

    # (b) exactly one copy of the quantized weights: no reference model, no reference adapter, unique storages
    assert trainer.ref_model is None
    assert list(model.peft_config) == ["default"]
    modules = quantized_modules(trainer.model)
    assert len(modules) == model.config.num_hidden_layers * LINEARS_PER_LAYER
    assert len({m.weight.untyped_storage().data_ptr() for m in modules}) == len(modules)
    holders = {id(v) for v in vars(trainer).values() if isinstance(v, torch.nn.Module) and quantized_modules(v)}
    assert holders == {id(trainer.model)}

    # (a) reference log-probs after training == the untouched base, loaded separately, up to fp32 rounding
    batch = plain_batch(trainer)
    reference = trainer._reference_token_logps(batch).sequence_logps()
    untouched = sequence_logps(fp32_4bit_kernels(load_4bit()), batch)
    tol = logps_tol(model, batch, untouched)
    assert_within(reference, untouched, tol, "reference vs untouched base")  # fused head vs full log-softmax
    policy = sequence_logps(trainer.model, batch)
    # training moved the policy, not the reference: the moved amount dwarfs the tolerance
    assert_effect((policy - untouched).abs().max().item(), tol, what="policy moved")

    # (c) base weights bit-identical; every LoRA weight that gets a gradient changed
    for name, tensor in base_state(model).items():
        assert torch.equal(tensor, base_before[name]), name
    lora_after = lora_state(model, "default")
    changed = [n for n in lora_after if not torch.equal(lora_after[n].float(), lora_before[n].float())]
    assert len(changed) == len(lora_after)


@pytest.mark.numerics
def test_sft_adapter_reference_is_the_frozen_sft_adapter(tiny_dir, tokenizer, toy, dpo_args, load_4bit, sft_adapter):
    model = load_qlora_model(tiny_dir, sft_adapter_path=sft_adapter, compute_dtype="float32")
    assert not is_identity_adapter(model)
    base_before = base_state(model)
    trainer = train(model, tokenizer, toy, dpo_args)

    assert sorted(model.peft_config) == ["default", "ref"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    assert len(quantized_modules(trainer.model)) == model.config.num_hidden_layers * LINEARS_PER_LAYER
    assert trainer.ref_model is None

    batch = plain_batch(trainer)
    reference = trainer._reference_token_logps(batch).sequence_logps()
    frozen_sft = sequence_logps(fp32_4bit_kernels(PeftModel.from_pretrained(load_4bit(), sft_adapter)), batch)
    bare_base = sequence_logps(fp32_4bit_kernels(load_4bit()), batch)
    tol = logps_tol(model, batch, frozen_sft)
    assert_within(reference, frozen_sft, tol, "reference vs frozen SFT adapter")  # fp32 rounding, other shapes
    # the SFT adapter is the reference, not adapters-off: their difference dwarfs the tolerance
    assert_effect((reference - bare_base).abs().max().item(), tol, what="SFT adapter vs bare base")

    for name, tensor in base_state(model).items():
        assert torch.equal(tensor, base_before[name]), name


def test_linear4bit_is_what_we_count(load_4bit):
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in quantized_modules(load_4bit()))


def test_eval_mode_keeps_the_fp32_4bit_kernels_on_an_avx512_bf16_cpu(tiny_dir, monkeypatch):
    """bitsandbytes repacks `Linear4bit` and computes in bf16 in eval mode without grad on AVX512-BF16 CPUs: the
    reference cache and held-out scoring would then be bf16 while training is fp32. Simulate such a CPU."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    assert bnb.nn.Linear4bit(8, 8).support_avx512bf16_for_cpu  # what bitsandbytes would do on that CPU
    model = load_qlora_model(tiny_dir, LORA, compute_dtype="float32").eval()
    assert not any(m.support_avx512bf16_for_cpu for m in quantized_modules(model))
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantized_modules(model))
