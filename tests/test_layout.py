"""Prompt sharing and packing: the layouts by hand, and the same log-probs, loss and gradients as the plain layout."""

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from numerics import (
    assert_effect,
    assert_within,
    backward_rtol,
    fp32_4bit_kernels,
    sequence_logps_tol,
    sigmoid_loss_tol,
)
from peft import LoraConfig
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM
from trl.trainer.dpo_trainer import DataCollatorForPreference

from trl_dpo_ext import DPOTrainer, ImplicitReward, PreferenceCollator
from trl_dpo_ext.layout import (
    Layout,
    block_attention_mask,
    choose_layout,
    pair_docs,
    rows_from_docs,
    truncate,
    unsupported_reasons,
)
from trl_dpo_ext.logps import completion_token_logps
from trl_dpo_ext.models import nf4_config
from trl_dpo_ext.preference_data import bundled_preference_dataset


LAYOUTS = {"shared": (True, False), "packed": (False, True), "shared+packed": (True, True)}


def test_shared_prompt_row_by_hand():
    example = {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]}
    batch = PreferenceCollator(pad_token_id=0, share_prompt=True)([example])
    # The last prompt token (3) heads each branch; the rejected branch restarts at its position (2).
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    assert batch["branch_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 2]]
    assert batch["sequence_index"].tolist() == [[-1, -1, -1, 0, 0, -1, 1]]
    assert batch["answer_lengths"].tolist() == [2, 1]
    assert batch["num_tokens"].item() == 5 + 4  # the plain layout's tokens: [1,2,3,4,5] and [1,2,3,6]
    mask = block_attention_mask(batch["doc_ids"], batch["branch_ids"])[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 0],  # the copy of token 3 sees the trunk [1, 2] and itself, as the original does
        [1, 1, 0, 0, 0, 1, 1],  # a rejected token never sees the chosen branch
    ]


def test_packed_rows_by_hand():
    examples = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},
        {"prompt_ids": [6], "chosen_ids": [7], "rejected_ids": [8]},
    ]
    batch = PreferenceCollator(pad_token_id=0, packing=True)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 1, 2, 4, 5, 6, 7, 6, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3]]
    assert batch["sequence_index"].tolist() == [[-1, -1, 0, -1, -1, 2, 2, -1, 1, -1, 3]]
    mask = block_attention_mask(batch["doc_ids"], batch["branch_ids"])[0, 0]
    assert mask.int().sum(dim=1).tolist() == [1, 2, 3, 1, 2, 3, 4, 1, 2, 1, 2]  # causal within each sequence only
    shared = PreferenceCollator(pad_token_id=0, share_prompt=True, packing=True)(examples)
    assert shared["input_ids"].tolist() == [[1, 2, 3, 2, 4, 5, 6, 7, 6, 8]]
    assert shared["position_ids"].tolist() == [[0, 1, 2, 1, 2, 3, 0, 1, 0, 1]]


def test_padding_rows_attend_only_to_themselves():
    examples = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},
        {"prompt_ids": [6], "chosen_ids": [7], "rejected_ids": [8]},
    ]
    batch = PreferenceCollator(pad_token_id=0, share_prompt=True, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 2, 4, 5, 0, 0], [6, 7, 6, 8, 0, 0, 0, 0]]
    mask = block_attention_mask(batch["doc_ids"], batch["branch_ids"])[:, 0]
    assert mask[1, 5].int().tolist() == [0, 0, 0, 0, 0, 1, 0, 0]  # no empty softmax row, no leak into real tokens
    assert not mask[1, :4, 4:].any()


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("max_length", [None, 3, 4, 5, 7])
def test_truncation_matches_trl(mode, max_length):
    example = {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5, 6], "rejected_ids": [7]}
    stock = DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode=mode)([example])
    for row, answer in zip(stock["input_ids"], ("chosen_ids", "rejected_ids")):
        prompt, completion = truncate(example["prompt_ids"], example[answer], max_length, mode)
        assert prompt + completion == [t for t in row.tolist() if t != 0]


def test_pairs_whose_prompts_truncate_differently_are_not_shared():
    # keep_end cuts 2 prompt tokens before the chosen answer but none before the rejected one.
    example = {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5, 6], "rejected_ids": [7]}
    docs, _ = pair_docs([example], share_prompt=True, max_length=4, truncation_mode="keep_end")
    assert [d.input_ids for d in docs] == [[3, 4, 5, 6], [1, 2, 3, 7]]
    batch = rows_from_docs(docs, num_sequences=2, packing=False, pad_token_id=0)
    assert batch["sequence_index"].tolist() == [[-1, 0, 0, 0], [-1, -1, -1, 1]]


def test_unsupported_attention_falls_back_to_plain_layout(tokenizer, pairs, dpo_args, caplog):
    assert (
        "takes no custom 4D mask" in unsupported_reasons(SimpleNamespace(_attn_implementation="flash_attention_2"))[0]
    )
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=16,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = MistralForCausalLM(config)
    assert "sliding-window" in unsupported_reasons(model.config)[0]
    with caplog.at_level(logging.WARNING, logger="trl_dpo_ext.trainer"):
        trainer = DPOTrainer(
            model=model,
            ref_model=copy.deepcopy(model),
            args=dpo_args(packing=True),
            train_dataset=pairs,
            processing_class=tokenizer,
        )
    assert (trainer.share_prompt, trainer.packing) == (False, False)
    assert not trainer.data_collator.share_prompt and not trainer.data_collator.packing
    assert "Plain layout instead of share_prompt + packing" in caplog.text
    # The implicit reward decides by the same rule: a layout its model cannot run (a saved run's, say) becomes plain.
    shared = PreferenceCollator(pad_token_id=tokenizer.pad_token_id, share_prompt=True, max_length=64)
    with caplog.at_level(logging.WARNING, logger="trl_dpo_ext.implicit_reward"):
        reward = ImplicitReward(model, tokenizer, 0.1, collator=shared, reference=trainer.reference)
    assert (reward.collator.share_prompt, reward.collator.max_length) == (False, 64)
    assert caplog.text.count("Plain layout instead of share_prompt because") == 1
    config.sliding_window = None
    assert unsupported_reasons(MistralForCausalLM(config).config) == []


SDPA = SimpleNamespace(_attn_implementation="sdpa")


@pytest.mark.parametrize("share_prompt, packing", [(True, False), (False, True), (True, True), (False, False)])
def test_choose_layout_runs_what_is_asked_where_nothing_stands_in_the_way(share_prompt, packing):
    eager = SimpleNamespace(_attn_implementation="eager", layer_types=["full_attention"])
    layout = choose_layout(share_prompt, packing, [SDPA, eager], [SimpleNamespace(is_prompt_learning=False)])
    assert layout == Layout(share_prompt=share_prompt, packing=packing)


@pytest.mark.parametrize(
    "model_configs, adapter_configs, options, reason",
    [
        ([SimpleNamespace(_attn_implementation="flash_attention_2")], [], {}, "takes no custom 4D mask"),
        ([SimpleNamespace(_attn_implementation="sdpa", sliding_window=8)], [], {}, "sliding-window"),
        ([SimpleNamespace(_attn_implementation="sdpa", layer_types=["sliding_attention"])], [], {}, "sliding-window"),
        ([SDPA], [SimpleNamespace(is_prompt_learning=True)], {}, "prompt-learning adapters"),
        ([SDPA], [], {"stock_loss": True}, "stock TRL's loss reads the plain layout"),
        ([SDPA], [], {"precompute_ref_log_probs": True}, "use ref_cache instead"),
        ([SDPA], [], {"compute_metrics": True}, "compute_metrics needs the plain layout's logits"),
        ([SDPA], [], {"vision_inputs": True}, "the rows hold images"),
        # A hybrid model (NemotronH-like): Mamba layers carry a state across the row whatever the mask.
        (
            [SimpleNamespace(_attn_implementation="sdpa", layer_types=["linear_attention", "moe", "full_attention"])],
            [],
            {},
            "linear_attention layers mix tokens without the attention mask",
        ),
        (
            [SimpleNamespace(_attn_implementation="sdpa", layers_block_type=["conv", "attention"])],
            [],
            {},
            "conv layers",
        ),
        # A VLM: the language model's sliding window sits in its text config.
        (
            [SimpleNamespace(_attn_implementation="sdpa", get_text_config=lambda: SimpleNamespace(sliding_window=8))],
            [],
            {},
            "sliding-window",
        ),
    ],
)
def test_choose_layout_falls_back_to_plain_with_the_reason(model_configs, adapter_configs, options, reason):
    layout = choose_layout(True, True, model_configs, adapter_configs, **options)
    assert (layout.share_prompt, layout.packing, layout.refused) == (False, False, ("share_prompt", "packing"))
    assert len(layout.reasons) == 1 and reason in layout.reasons[0]
    assert layout.fallback_message().startswith("Plain layout instead of share_prompt + packing because ")
    # The plain layout asked for is never a fallback, whatever stands in the way.
    assert choose_layout(False, False, model_configs, adapter_configs, **options) == Layout()


def test_choose_layout_says_each_reason_once_in_order():
    flash = SimpleNamespace(_attn_implementation="flash_attention_2")
    layout = choose_layout(False, True, [flash, flash], compute_metrics=True)
    assert layout.refused == ("packing",)
    assert [r.split(" ")[0] for r in layout.reasons] == ["attn_implementation", "compute_metrics"]


def test_padding_free_means_packing(dpo_args):
    args = dpo_args(padding_free=True)
    assert (args.packing, args.padding_free) == (True, False)  # TRL would disable its own padding_free


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def qlora_trainer(request, tiny_dir, tokenizer, tmp_path_factory):
    """A 4-bit base with a random (non-zero) LoRA adapter kept in fp32, so policy ≠ reference and no bf16 rounding."""
    from trl_dpo_ext import DPOConfig

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(
        tiny_dir, quantization_config=nf4_config(torch.float32), attn_implementation=request.param
    )
    fp32_4bit_kernels(base)  # an fp32 comparison on every CPU (tests/numerics.py)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("layout")),
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        per_device_train_batch_size=6,
        max_length=48,  # truncates some toy pairs (keep_start: the answers lose their ends)
        share_prompt=False,
    )
    rows = bundled_preference_dataset()["train"].select(range(6))
    trainer = DPOTrainer(model=base, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=lora)
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # TRL stores LoRA of 4-bit models in bf16; exactness is checked in fp32
    return trainer


def collate(trainer, share_prompt: bool, packing: bool):
    pad = trainer.processing_class.pad_token_id
    collator = PreferenceCollator(pad_token_id=pad, max_length=48, share_prompt=share_prompt, packing=packing)
    return collator(list(trainer.train_dataset))


LORA_R = 4


def logps_tol(trainer, logps, plain, other):
    """fp32 rounding of each Σ_t log p, computed in two layouts (context: the longer row of the two; numerics.py)."""
    seq_len = max(plain["input_ids"].size(1), other["input_ids"].size(1))
    return sequence_logps_tol(logps.sequence_logps(), logps.lengths(), trainer.model.config, seq_len, LORA_R)


@pytest.mark.numerics
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_give_the_plain_log_probs(qlora_trainer, layout):
    plain, other = collate(qlora_trainer, False, False), collate(qlora_trainer, *LAYOUTS[layout])
    assert other["input_ids"].numel() < plain["input_ids"].numel()  # fewer tokens computed
    with torch.no_grad():
        for name, run in (
            ("policy", lambda b: completion_token_logps(qlora_trainer.model, b)),
            ("reference", qlora_trainer._reference_token_logps),
        ):
            want, got = run(plain), run(other)
            tol = logps_tol(qlora_trainer, want, plain, other)
            assert_within(got.sequence_logps(), want.sequence_logps(), tol, name)  # fp32 rounding, per sequence
            torch.testing.assert_close(got.lengths(), want.lengths(), atol=0, rtol=0)  # token counts: exact
        policy = completion_token_logps(qlora_trainer.model, plain).sequence_logps()
        reference = qlora_trainer._reference_token_logps(plain).sequence_logps()
    # the random adapter makes π ≠ π_ref for every answer, far beyond rounding: both paths are exercised
    assert_effect((policy - reference).abs(), tol, factor=2, what="policy vs reference")


@pytest.mark.numerics
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_give_the_plain_loss_and_gradients(qlora_trainer, layout):
    model = qlora_trainer.model

    def loss_and_grads(batch):
        model.zero_grad()
        loss = qlora_trainer._compute_loss(model, batch, return_outputs=False)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, other = collate(qlora_trainer, False, False), collate(qlora_trainer, *LAYOUTS[layout])
    want_loss, want_grads = loss_and_grads(plain)
    got_loss, got_grads = loss_and_grads(other)
    model.zero_grad()
    with torch.no_grad():
        policy = completion_token_logps(model, plain)
        reference = qlora_trainer._reference_token_logps(plain)
    pairs = plain["input_ids"].size(0) // 2
    tols = [logps_tol(qlora_trainer, lp, plain, other) for lp in (policy, reference)]
    loss_tol = sigmoid_loss_tol(qlora_trainer.beta, *(t for tol in tols for t in tol.split(pairs)))
    assert_within(got_loss, want_loss, loss_tol, "loss")  # |d loss / d βm| ≤ 1, m from four sequence log-probs
    assert want_grads.keys() == got_grads.keys() and len(want_grads) > 0
    seq_len = max(plain["input_ids"].size(1), other["input_ids"].size(1))
    rtol = backward_rtol(model.config, seq_len, plain["input_ids"].numel(), LORA_R)
    for name in want_grads:
        # norm-wise: the backward's rounding relative to the largest entry of the gradient tensor
        assert_within(got_grads[name], want_grads[name], rtol * want_grads[name].abs().max().item(), name)
    assert max(g.abs().max() for g in want_grads.values()) > 1e-3  # non-trivial gradients
