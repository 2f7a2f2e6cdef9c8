"""One home for the reference (`reference.py`) and for the layout (the collator that runs), and the bugs they fixed."""

import ast
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import trl_dpo_ext
from trl_dpo_ext import DPOTrainer, ImplicitReward, PreferenceCollator, refcache
from trl_dpo_ext.implicit_reward import reward_margins
from trl_dpo_ext.pairs import build_preference_pairs
from trl_dpo_ext.reference import (
    ADAPTERS_OFF,
    FROZEN_ADAPTER,
    PRECOMPUTED,
    REF_MODEL,
    REFERENCE_ADAPTER,
    Reference,
)


LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


def fresh_lora(model) -> PeftModel:
    torch.manual_seed(0)  # LoRA A is drawn from the global RNG: the same adapter every call
    return get_peft_model(model, LoraConfig(**LORA))


def sft_lora(model) -> PeftModel:
    peft = fresh_lora(model)
    generator = torch.Generator().manual_seed(3)
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            param.data.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return peft


# 1. What the reference is, and that nothing else decides it.


def test_each_kind_of_reference_is_decided_by_reference_of(tiny_dir, tokenizer, pairs, dpo_args, load_4bit):
    fresh = DPOTrainer(model=fresh_lora(load_4bit()), args=dpo_args(), train_dataset=pairs, processing_class=tokenizer)
    assert fresh.reference == Reference(ADAPTERS_OFF) and "ref" not in fresh.model.peft_config
    sft = DPOTrainer(model=sft_lora(load_4bit()), args=dpo_args(), train_dataset=pairs, processing_class=tokenizer)
    assert sft.reference == Reference(FROZEN_ADAPTER) and sft.reference.adapter == REFERENCE_ADAPTER
    full = AutoModelForCausalLM.from_pretrained(tiny_dir)
    separate = DPOTrainer(model=full, args=dpo_args(), train_dataset=pairs, processing_class=tokenizer)
    assert separate.reference.kind == REF_MODEL and separate.reference.ref_model is separate.ref_model
    precomputed = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_dir),
        args=dpo_args(precompute_ref_log_probs=True),
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    assert precomputed.reference.kind == PRECOMPUTED
    with pytest.raises(ValueError, match="No reference model to run"):
        precomputed.reference.token_logps(precomputed.model, next(iter(precomputed.get_train_dataloader())))
    with pytest.raises(ValueError, match="needs a reference it can run"):
        ImplicitReward(precomputed.model, tokenizer, beta=0.1)


def test_trainer_and_implicit_reward_run_the_same_reference(tokenizer, pairs, dpo_args, load_4bit):
    trainer = DPOTrainer(model=sft_lora(load_4bit()), args=dpo_args(), train_dataset=pairs, processing_class=tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ours = trainer._reference_token_logps(batch).sequence_logps()
    reward = ImplicitReward.from_trainer(trainer)
    assert reward.reference == trainer.reference
    # Same module, same batch, same adapter: the same floats.
    assert torch.equal(ours, reward.reference.token_logps(reward.model, batch).sequence_logps())
    # ... and it is the frozen SFT copy, not the bare base.
    bare = Reference(ADAPTERS_OFF).token_logps(trainer.model, batch).sequence_logps()
    assert (ours - bare).abs().min() > 1e-2


def test_the_reference_adapter_name_is_written_in_reference_py_only():
    package = Path(trl_dpo_ext.__file__).parent
    offenders = []
    for path in package.glob("*.py"):
        if path.name in ("reference.py", "private_api.py"):  # where it is defined, and where TRL's name is listed
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in ("ref", ".ref.", "adapter:ref"):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


# 2. The layout is the collator's that runs: reported, saved and keyed on.


def test_a_callers_plain_collator_runs_and_is_what_the_trainer_reports_and_keys_on(
    tokenizer, pairs, dpo_args, load_4bit, tmp_path, monkeypatch
):
    keys = []
    real_cache_key = refcache.cache_key
    monkeypatch.setattr(refcache, "cache_key", lambda *a, **kw: keys.append(kw) or real_cache_key(*a, **kw))
    collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)  # plain, while the config asks for sharing
    args = dpo_args(share_prompt=True, ref_cache=True, ref_cache_dir=str(tmp_path / "cache"))
    trainer = DPOTrainer(
        model=fresh_lora(load_4bit()),
        args=args,
        data_collator=collator,
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    assert trainer.data_collator is collator
    assert (trainer.share_prompt, trainer.packing) == (False, False)
    assert [(k["share_prompt"], k["packing"]) for k in keys] == [(False, False)]
    assert "attention_mask" in next(iter(trainer.get_train_dataloader()))  # the plain layout is what runs


def test_a_callers_shared_collator_that_cannot_run_is_refused(tokenizer, pairs, dpo_args, load_4bit):
    collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id, share_prompt=True)
    with pytest.raises(ValueError, match=r"asks for share_prompt.*compute_metrics needs the plain layout"):
        DPOTrainer(
            model=fresh_lora(load_4bit()),
            args=dpo_args(),
            data_collator=collator,
            train_dataset=pairs,
            processing_class=tokenizer,
            compute_metrics=lambda prediction: {},
        )


# 3. The stock-loss fallback: the cache replaces its reference forward, and only model inputs reach the model.


def count_reference_forwards(model, monkeypatch) -> list:
    calls = []
    real = PeftModel.disable_adapter

    def counting(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(PeftModel, "disable_adapter", counting)
    return calls


def test_stock_loss_with_the_cache_runs_no_reference_forward(
    tokenizer, toy, dpo_args, load_4bit, tmp_path, monkeypatch
):
    args = dpo_args(loss_type=["robust"], label_smoothing=0.1, ref_cache=True, ref_cache_dir=str(tmp_path / "c"))
    rows = toy["train"].select(range(8))
    trainer = DPOTrainer(model=fresh_lora(load_4bit()), args=args, train_dataset=rows, processing_class=tokenizer)
    assert trainer._stock_loss_reasons and "ref_chosen_token_logps" in trainer.train_dataset.column_names
    calls = count_reference_forwards(trainer.model, monkeypatch)
    trainer.train()
    assert calls == []  # 3 steps, no reference forward: the cache stood in for it
    cached_losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]

    monkeypatch.undo()
    uncached = DPOTrainer(
        model=fresh_lora(load_4bit()), args=dpo_args(loss_type=["robust"], label_smoothing=0.1),
        train_dataset=rows, processing_class=tokenizer,
    )  # fmt: skip
    calls = count_reference_forwards(uncached.model, monkeypatch)
    uncached.train()
    assert len(calls) == 3  # the same run without the cache: one reference forward a step
    # Same reference values (the cache is the plain layout's sums of the same per-token log-probs), same losses; the
    # cache sums per token where TRL sums per row, an fp32 reordering of ~20 terms of ~10 nats: ~1e-5 on a log-prob.
    assert cached_losses == pytest.approx(
        [row["loss"] for row in uncached.state.log_history if "loss" in row], abs=1e-5
    )


def test_stock_loss_fallback_passes_only_model_inputs(tokenizer, pairs, dpo_args, load_4bit, monkeypatch):
    args = dpo_args(loss_type=["robust"], label_smoothing=0.1, max_steps=1)
    trainer = DPOTrainer(model=fresh_lora(load_4bit()), args=args, train_dataset=pairs, processing_class=tokenizer)
    base = trainer.model.get_base_model()
    seen = []
    fused = base.forward

    def recording(*a, **kwargs):
        seen.append(set(kwargs))
        return fused(*a, **kwargs)

    monkeypatch.setattr(base, "forward", recording)
    trainer.train()
    assert seen
    leaked = set().union(*seen) & {"num_tokens", "example_index", "ref_token_logps", "completion_mask"}
    assert leaked == set()


# 4. reward_margins and ImplicitReward.margins are one computation.


def test_reward_margins_keep_rows_whose_prompt_fills_max_length_as_implicit_reward_does(
    tokenizer, dpo_args, load_4bit
):
    rows = [
        {"prompt": "User: Hi\nAssistant:", "chosen": " Hello! How can I help?", "rejected": " What?"},
        {"prompt": "User: " + "Recommend a lamp. " * 20 + "\nAssistant:", "chosen": " Nova.", "rejected": " No."},
        {"prompt": "User: Help me?\nAssistant:", "chosen": " Sure! Happy to help you.", "rejected": " No. Go away."},
    ]
    model = sft_lora(load_4bit())  # policy ≠ reference: margins are not all zero
    trainer = DPOTrainer(
        model=model, args=dpo_args(max_length=24), train_dataset=Dataset.from_list([rows[0], rows[2]]),
        processing_class=tokenizer,
    )  # fmt: skip
    for param in trainer.model.parameters():  # move the policy away from the frozen SFT copy
        if param.requires_grad:
            param.data.add_(0.05)
    heldout = Dataset.from_list(rows)
    margins = reward_margins(trainer, heldout)
    assert margins.shape == (3,)  # one per row, the long prompt's included
    assert margins[1] == 0 and margins[0] != 0 and margins[2] != 0
    assert torch.equal(margins, ImplicitReward.from_trainer(trainer).margins(heldout))


def test_implicit_reward_leaves_the_model_as_it_was_given(tiny_dir, tokenizer):
    model = fresh_lora(AutoModelForCausalLM.from_pretrained(tiny_dir))
    model.train()
    reward = ImplicitReward(model, tokenizer, beta=0.1)
    assert model.training and "forward" not in vars(model.get_base_model())
    reward.score(["User: Hi\nAssistant:"], [" Hello!"])
    assert model.training and "forward" not in vars(model.get_base_model())  # scoring restores both


# 5. Sampled pairs keep the sampled context and leave the caller's RNG alone.


def test_pairs_keep_special_tokens_of_the_sampled_prompt_and_the_callers_rng(tiny_dir, tokenizer):
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is the Acme kettle good?"}, {"role": "assistant", "content": "Sure."},
         {"role": "user", "content": "And the lamp?"}], tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    assert tokenizer.eos_token in prompt  # the template ends assistant turns with a special token
    torch.manual_seed(123)
    before = torch.get_rng_state()
    pairs = build_preference_pairs(
        policy, tokenizer, [prompt], reward_fn=lambda p, c: [float(len(x)) for x in c], k=4, max_new_tokens=6, seed=0
    )
    assert torch.equal(torch.get_rng_state(), before)  # seeded sampling, the caller's generator untouched
    assert pairs[0]["prompt"] == prompt  # the special tokens survive: DPO trains on the context that was sampled
    assert tokenizer(pairs[0]["prompt"]).input_ids == tokenizer(prompt).input_ids


def test_the_trainer_keeps_a_callers_4bit_model_on_fp32_kernels(tokenizer, pairs, dpo_args, load_4bit):
    from trl_dpo_ext.models import quantized_modules

    model = fresh_lora(load_4bit())
    for module in quantized_modules(model):  # as bitsandbytes sets it on an AVX512-BF16 CPU
        module.support_avx512bf16_for_cpu = True
    DPOTrainer(model=model, args=dpo_args(), train_dataset=pairs, processing_class=tokenizer)
    assert not any(module.support_avx512bf16_for_cpu for module in quantized_modules(model))
