"""Exactness on the real model (issue #16): SmolLM2-135M-Instruct in 4-bit NF4, its tokenizer and its chat template.

`test_layout.py` and `test_refcache.py` check the layouts and the reference cache on a tiny random Llama. Here the same
checks run on a pretrained 30-layer chat model, with conversational pairs tokenized the way the trainer tokenizes them
(TRL's `_prepare_dataset`, run by `DPOTrainer`), in fp32 and in bf16 compute.

Tolerances.
- fp32: the bounds `tests/numerics.py` derives (u = 2^-24) for this config and row length. The issue's figure, 1e-4,
  is tighter than what fp32 rounding can guarantee on this model: 30 layers, hidden 576 and a 49152-token
  log-sum-exp make `forward_rtol` ≈ 3.6e-4 per token at these lengths (the tiny Llama's is ≈ 4e-5, where 1e-4 is a
  bound). So the derived bound is asserted; the measured differences (up to ~6e-5 nats, ~2e-6 relative, on a 2-core
  AVX-512 machine) also sit below 1e-4, but nothing guarantees that on other kernels.
- bf16: measured with a margin, where the measurement is made in the same run: the error that the plain layout
  (TRL's) itself makes in bf16 against the fp32 values, on the same batch and the same kernels. A layout must stay
  within `BF16_MARGIN` times that error of the fp32 values: it adds no error of its own beyond bf16 rounding. (The
  derived bound with u = 2^-9 is vacuous here, γ̃_n > 1 for a 30-layer forward, and a fixed figure would be tuned to
  one machine's bf16 kernels: AMX, AVX512-BF16 or emulation round differently.) A shared layout whose rejected
  tokens can see the chosen branch must fail that check, so it is not vacuous either.
"""

import dataclasses
import functools
from contextlib import contextmanager, nullcontext
from unittest import mock

import pytest
import torch
from datasets import Dataset
from numerics import assert_effect, assert_within, backward_rtol, fp32_4bit_kernels, sigmoid_loss_tol
from peft import LoraConfig
from test_layout import LAYOUTS, LORA_R, logps_tol
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, AutoTokenizer

import trl_dpo_ext.trainer as trainer_module
from trl_dpo_ext import DPOConfig, DPOTrainer, refcache
from trl_dpo_ext.layout import REJECTED, pair_docs
from trl_dpo_ext.logps import completion_token_logps
from trl_dpo_ext.models import nf4_config, quantized_modules
from trl_dpo_ext.refcache import CACHE_COLUMNS, cache_key, cache_path, load_reference_cache, weights_fingerprint


MAX_LENGTH = 128
# Two draws of the same rounding noise (a layout's bf16 error and the plain layout's) differ by less than this factor;
# measured ratios: at most ~1 under ATen's default, AVX2 and AVX-512 kernels on an Intel Xeon, 0.51 on an AMD EPYC
# (AVX2) against the pooled scale of `bf16_tolerances` (1.12 against the reference's own, which it replaced).
BF16_MARGIN = 2.0


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


SYSTEM = {"role": "system", "content": "Answer briefly."}
PAIRS = [
    # No system message: the template inserts SmolLM2's default one.
    {
        "prompt": [user("What is the capital of France?")],
        "chosen": assistant("Paris."),
        "rejected": assistant("London."),
    },
    # An answer that starts with spaces: they merge with the newline that ends the generation prompt ("\n   " is one
    # token), so TRL moves the prompt/answer boundary one token back, for both answers.
    {
        "prompt": [SYSTEM, user("Complete: def add(a, b):")],
        "chosen": assistant("    return a + b"),
        "rejected": assistant("Use a calculator."),
    },
    # A one-word answer.
    {
        "prompt": [SYSTEM, user("Is 7 a prime number?")],
        "chosen": assistant("Yes, 7 is prime."),
        "rejected": assistant("No"),
    },
    # A multi-turn prompt; the rejected answer starts with a newline, the chosen one with a letter.
    {
        "prompt": [SYSTEM, user("Hi!"), *assistant("Hello! How can I help?"), user("Translate 'cat' to Spanish.")],
        "chosen": assistant("Gato."),
        "rejected": assistant("\n- Perro\n- Vaca"),
    },
]
MOVED_BOUNDARY = 1  # the pair whose prompt/answer boundary TRL moves


def build_trainer(smollm2_dir, out) -> DPOTrainer:
    """
    The trainer on the 4-bit NF4 base (fp32 compute) with a random (non-zero) LoRA adapter in fp32, so policy ≠
    reference. It tokenizes the pairs and, with `ref_cache`, computes their reference log-probs at construction.
    """
    base = AutoModelForCausalLM.from_pretrained(
        smollm2_dir, quantization_config=nf4_config(torch.float32), attn_implementation="sdpa"
    )
    fp32_4bit_kernels(base)  # an fp32 comparison on every CPU (tests/numerics.py)
    torch.manual_seed(0)
    lora = LoraConfig(
        r=LORA_R, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False
    )
    args = DPOConfig(
        output_dir=str(out / "run"),
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        per_device_train_batch_size=len(PAIRS),
        max_length=MAX_LENGTH,
        ref_cache=True,
        ref_cache_dir=str(out / "ref_cache"),
        disable_tqdm=True,
    )
    return DPOTrainer(
        model=base,
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=AutoTokenizer.from_pretrained(smollm2_dir),
        peft_config=lora,
    )


@pytest.fixture(scope="module")
def trainer(smollm2_dir, tmp_path_factory):
    return build_trainer(smollm2_dir, tmp_path_factory.mktemp("smollm2"))


def rows_of(trainer, with_cache: bool = False) -> list[dict]:
    """The trainer's tokenized pairs; without the cached reference columns, a reference forward runs on them."""
    return [{k: v for k, v in row.items() if with_cache or k not in CACHE_COLUMNS} for row in trainer.train_dataset]


def collate(trainer, share_prompt: bool, packing: bool, with_cache: bool = False, **settings):
    """The trainer's own collator (pad id, max length, truncation), with the layout asked for."""
    collator = dataclasses.replace(trainer.data_collator, share_prompt=share_prompt, packing=packing, **settings)
    return collator(rows_of(trainer, with_cache))


def chat_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]


def test_chosen_and_rejected_carry_the_same_prompt_ids(trainer):
    tokenizer = trainer.processing_class
    rows = rows_of(trainer)
    assert [row["example_index"] for row in rows] == list(range(len(PAIRS)))  # no row dropped or reordered
    moved = []
    for pair, row in zip(PAIRS, rows):
        prompt = row["prompt_ids"]
        # The two training sequences are exactly the chat-formatted conversations: the split loses or moves no token.
        assert prompt + row["chosen_ids"] == chat_ids(tokenizer, pair["prompt"] + pair["chosen"])
        assert prompt + row["rejected_ids"] == chat_ids(tokenizer, pair["prompt"] + pair["rejected"])
        generation_prompt = chat_ids(tokenizer, pair["prompt"], add_generation_prompt=True)
        assert generation_prompt[: len(prompt)] == prompt
        moved.append(len(generation_prompt) - len(prompt))
        assert row["chosen_ids"][0] != row["rejected_ids"][0]  # the answers differ from their first token
    assert moved == [int(i == MOVED_BOUNDARY) for i in range(len(PAIRS))]  # the moved boundary is exercised

    pairs, plain = len(rows), collate(trainer, False, False)
    for b, row in enumerate(rows):
        length = len(row["prompt_ids"])
        for r in (b, pairs + b):  # chosen row, rejected row: the same prompt tokens, then the answer
            assert plain["input_ids"][r, :length].tolist() == row["prompt_ids"]
            assert plain["completion_mask"][r, :length].sum() == 0 and plain["completion_mask"][r, length] == 1
    # So every pair is shared: one [prompt│chosen│rejected] unit each, none falls back to two sequences.
    docs, _ = pair_docs(rows, share_prompt=True, max_length=MAX_LENGTH, truncation_mode="keep_start")
    assert [doc.input_ids[: len(row["prompt_ids"]) - 1] for doc, row in zip(docs, rows)] == [
        row["prompt_ids"][:-1] for row in rows
    ]
    assert len(docs) == pairs


@functools.cache
def bf16_flash_attention_runs() -> bool:
    """
    Whether torch's CPU flash attention runs in bf16 here. torch 2.13 packs bf16 blocks of 64+ tokens for AMX whenever
    the CPU has AMX, with a packer that only its AVX-512 kernels hold: with ATen forced below AVX-512
    (`ATEN_CPU_CAPABILITY=avx2` or `default`, as CI reruns these tests) on an AMX CPU, every such row raises
    "pack_vnni2 is only supported when avx512 is supported". A CPU without AMX never takes that path.
    """
    block = torch.zeros(1, 1, 64, 64, dtype=torch.bfloat16)
    try:
        torch.nn.functional.scaled_dot_product_attention(block, block, block)
    except RuntimeError:
        return False
    return True


@contextmanager
def bf16_compute(model):
    """
    What a bf16 run computes, on the same quantized weights: the 4-bit matmuls in bf16 (`bnb_4bit_compute_dtype`), the
    other base weights (embedding and tied LM head, norms) in bf16 (what loading with `dtype=bfloat16` gives), and the
    fp32 LoRA master weights under CPU autocast to bf16 (what `bf16=True` runs). The fp32 state is restored on exit.
    """
    layers = quantized_modules(model)
    saved = {n: p.data for n, p in model.named_parameters() if p.dtype == torch.float32 and "lora_" not in n}
    for name, param in model.named_parameters():
        if name in saved:
            param.data = param.data.to(torch.bfloat16)
    for layer in layers:
        layer.compute_dtype = torch.bfloat16
    # Where torch's flash kernel cannot run (see above), its math kernel stands in, for every layout alike.
    attention = nullcontext() if bf16_flash_attention_runs() else sdpa_kernel(SDPBackend.MATH)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), attention:
            yield
    finally:
        for name, param in model.named_parameters():
            if name in saved:
                param.data = saved[name]
        for layer in layers:
            layer.compute_dtype = torch.float32


def training_step(trainer, batch) -> dict:
    """One step's loss and LoRA gradients, with the policy and reference log-probs the trainer computed for them."""
    seen = {}
    reference_of = trainer._reference_token_logps

    def policy(model, inputs):
        seen["policy"] = completion_token_logps(model, inputs)
        return seen["policy"]

    def reference(inputs):
        seen["reference"] = reference_of(inputs)
        return seen["reference"]

    model = trainer.model
    model.zero_grad()
    with (
        mock.patch.object(trainer_module, "completion_token_logps", policy),
        mock.patch.object(trainer, "_reference_token_logps", reference),
    ):
        loss = trainer._compute_loss(model, batch, return_outputs=False)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return {"batch": batch, "loss": loss.detach(), "grads": grads, **seen}


_STEPS = {}


def step(trainer, dtype: str, layout: str) -> dict:
    """`training_step` of one layout in one dtype, run once per module: every comparison reads the same plain step."""
    if (dtype, layout) not in _STEPS:
        batch = collate(trainer, *((False, False) if layout == "plain" else LAYOUTS[layout]))
        with bf16_compute(trainer.model) if dtype == "bf16" else nullcontext():
            _STEPS[dtype, layout] = training_step(trainer, batch)
    return _STEPS[dtype, layout]


def sequence_logps(result: dict, name: str) -> torch.Tensor:
    return result[name].sequence_logps().detach()


def test_reference_cache_round_trip_is_exact(trainer, monkeypatch):
    dataset = trainer.train_dataset
    cached = (dataset[CACHE_COLUMNS[0]], dataset[CACHE_COLUMNS[1]])
    # The file the trainer wrote at construction holds exactly the values it put in the dataset.
    assert (trainer.share_prompt, trainer.packing) == (True, False)  # the cache holds shared-layout values
    weights, adapter = trainer.reference.weights(trainer.model)
    bare = dataset.remove_columns(list(CACHE_COLUMNS))
    settings = dict(max_length=MAX_LENGTH, truncation_mode="keep_start", share_prompt=True, packing=False)
    key = cache_key(
        weights_fingerprint(weights, adapter), bare, reference=trainer.reference.label, attention="sdpa", **settings
    )
    loaded = load_reference_cache(cache_path(trainer.args.ref_cache_dir, key), key)
    assert tuple(answers.tolist() for answers in loaded) == cached
    # Recomputed by the same code path (same batches, same layout): bit for bit what was cached.
    assert refcache.reference_answer_logps(trainer, bare, "train") == loaded
    # Read back into a batch (the shared layout the cache was computed in), each token gets the value a reference
    # forward on that batch gives it.
    from_cache = trainer._reference_token_logps(collate(trainer, True, False, with_cache=True))
    computed = step(trainer, "fp32", "shared")["reference"]
    assert torch.equal(from_cache.index, computed.index)
    assert torch.equal(from_cache.logps * from_cache.mask, computed.logps * computed.mask)
    # A second run with the same reference reads the file and computes nothing.
    monkeypatch.setattr(refcache, "reference_answer_logps", mock.Mock(side_effect=AssertionError("recomputed")))
    again = refcache.with_reference_cache(trainer, bare, "train")
    assert (again[CACHE_COLUMNS[0]], again[CACHE_COLUMNS[1]]) == cached


@pytest.mark.numerics
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp32_layouts_give_the_plain_numbers(trainer, layout):
    want, got = step(trainer, "fp32", "plain"), step(trainer, "fp32", layout)
    plain, other = want["batch"], got["batch"]
    assert other["input_ids"].numel() < plain["input_ids"].numel()  # fewer tokens computed
    tols = {}
    for name in ("policy", "reference"):
        tols[name] = logps_tol(trainer, want[name], plain, other)  # derived, u = 2^-24 (module docstring)
        assert_within(sequence_logps(got, name), sequence_logps(want, name), tols[name], f"fp32 {name}")
        torch.testing.assert_close(got[name].lengths(), want[name].lengths(), atol=0, rtol=0)  # token counts: exact
    # the random adapter makes π ≠ π_ref for every answer, far beyond rounding: both paths are exercised
    effect = (sequence_logps(want, "policy") - sequence_logps(want, "reference")).abs()
    assert_effect(effect, tols["policy"], factor=2, what="policy vs reference")
    loss_tol = sigmoid_loss_tol(trainer.beta, *(t for tol in tols.values() for t in tol.split(len(PAIRS))))
    assert_within(got["loss"], want["loss"], loss_tol, "fp32 loss")  # |d loss / d βm| ≤ 1
    assert want["grads"].keys() == got["grads"].keys() and len(want["grads"]) == 30 * 7 * 2  # A and B, every linear
    seq_len = max(plain["input_ids"].size(1), other["input_ids"].size(1))
    rtol = backward_rtol(trainer.model.config, seq_len, plain["input_ids"].numel(), LORA_R)
    for name, grad in want["grads"].items():
        # norm-wise: the backward's rounding relative to the largest entry of the gradient tensor
        assert_within(got["grads"][name], grad, rtol * grad.abs().max().item(), f"fp32 grad {name}")
    assert max(g.abs().max() for g in want["grads"].values()) > 1e-3  # non-trivial gradients


def bf16_tolerances(trainer) -> dict[str, torch.Tensor]:
    """
    Per sequence: `BF16_MARGIN` × the plain layout's largest bf16 error against fp32 on this batch (docstring), the
    largest over the policy's and the reference's sequences together. Both forwards run the same 30 4-bit layers on
    the same tokens and kernels (the reference with adapters off), so their errors are draws of one rounding noise;
    the largest of 32 draws is a steadier scale than of 16 (on a 2-core AMD EPYC with AVX2 the two 16-draw maxima
    were 1.02 and 0.465 nats, and a shared layout's reference error, 1.04, exceeded twice the smaller one).
    """
    exact, plain = step(trainer, "fp32", "plain"), step(trainer, "bf16", "plain")
    errors = [(sequence_logps(plain, name) - sequence_logps(exact, name)).abs() for name in ("policy", "reference")]
    scale = BF16_MARGIN * torch.cat(errors).max()
    return {name: scale.expand(2 * len(PAIRS)) for name in ("policy", "reference")}


def grad_distance(grads: dict, exact: dict) -> float:
    """‖g − g_fp32‖ over every LoRA gradient of the step, as one vector (what the optimizer step sees)."""
    return sum(((grads[n].double() - g.double()) ** 2).sum() for n, g in exact.items()).sqrt().item()


@pytest.mark.numerics
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_layouts_add_no_error_beyond_bf16_rounding(trainer, layout):
    exact, plain, got = step(trainer, "fp32", "plain"), step(trainer, "bf16", "plain"), step(trainer, "bf16", layout)
    tols = bf16_tolerances(trainer)
    for name in ("policy", "reference"):
        assert_within(sequence_logps(got, name), sequence_logps(exact, name), tols[name], f"bf16 {name} vs fp32")
        torch.testing.assert_close(got[name].lengths(), plain[name].lengths(), atol=0, rtol=0)
    loss_tol = sigmoid_loss_tol(trainer.beta, *(t for tol in tols.values() for t in tol.split(len(PAIRS))))
    assert_within(got["loss"], exact["loss"], loss_tol, "bf16 loss vs fp32")
    plain_error = grad_distance(plain["grads"], exact["grads"])
    assert_within(grad_distance(got["grads"], exact["grads"]), 0.0, BF16_MARGIN * plain_error, "bf16 grads vs fp32")


@pytest.mark.numerics
def test_bf16_check_catches_a_leaking_branch_mask(trainer):
    # The shared layout with every token on the trunk: a rejected token then also sees the chosen answer.
    batch = collate(trainer, True, False)
    batch["branch_ids"] = torch.zeros_like(batch["branch_ids"])
    with torch.no_grad(), bf16_compute(trainer.model):
        leaking = completion_token_logps(trainer.model, batch).sequence_logps()
    exact = sequence_logps(step(trainer, "fp32", "plain"), "policy")
    rejected = slice(len(PAIRS), None)
    effect = (leaking - exact).abs()[rejected].max()
    assert_effect(effect, bf16_tolerances(trainer)["policy"][rejected].max(), factor=2, what="leaking branch mask")


@pytest.mark.numerics
def test_pairs_whose_prompts_truncate_differently_fall_back_with_the_same_numbers(trainer):
    # keep_end cuts as many prompt tokens as prompt + answer exceed max_length: the same cut for both answers of a pair
    # (shared) when they are as long or neither is cut, different cuts otherwise (two plain sequences, as in TRL).
    max_length = 32
    rows = rows_of(trainer)

    def cut(row, answer):
        return max(0, len(row["prompt_ids"]) + len(row[answer]) - max_length)

    falls_back = [cut(row, "chosen_ids") != cut(row, "rejected_ids") for row in rows]
    assert any(falls_back) and not all(falls_back)
    assert any(cut(row, "chosen_ids") > 0 for row, back in zip(rows, falls_back) if not back)  # cut, still shared
    docs, _ = pair_docs(rows, share_prompt=True, max_length=max_length, truncation_mode="keep_end")
    assert [REJECTED in doc.branch_ids for doc in docs] == [
        s for back in falls_back for s in ([False] * 2 if back else [True])
    ]
    settings = dict(max_length=max_length, truncation_mode="keep_end")
    plain, other = collate(trainer, False, False, **settings), collate(trainer, True, False, **settings)
    with torch.no_grad():
        want = completion_token_logps(trainer.model, plain)
        got = completion_token_logps(trainer.model, other)
    assert_within(got.sequence_logps(), want.sequence_logps(), logps_tol(trainer, want, plain, other), "fallback")
    torch.testing.assert_close(got.lengths(), want.lengths(), atol=0, rtol=0)
