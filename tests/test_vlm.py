"""A vision-language model in 4-bit NF4 + LoRA: trains in TRL's layout, reference = adapters off, saves, loads back.

The model is the tiny LLaVA stand-in of TRL's own VLM tests (`compat/vlm_standins.py`: CLIP tower, Llama text model,
the model's own processor), so this suite and the compat run exercise the same thing. LLaVA rather than Qwen-VL:
transformers builds Qwen-VL processors only with torchvision, which this project does not install.

Rows with images run TRL's vision collator (the processor per batch) and TRL's loss, in the plain layout: the
shared-prompt and packed rows carry no pixel values or image positions (`layout.choose_layout`), and the reference
cache, keyed by token ids, refuses rows whose pixels it does not cover. Rows without images keep the shared prompt on
a VLM, shown on Qwen2.5-VL, whose multimodal RoPE is where that could go wrong (its tokenizer needs no torchvision).
"""

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from cpu_settings import CPU_ARGS
from datasets import Dataset
from numerics import assert_effect, assert_within, fp32_4bit_kernels, sequence_logps_tol, zero_margin_loss
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoProcessor, LlavaForConditionalGeneration

from compat.standins import ORG, dataset_rows
from compat.vlm_standins import VISION_MODELS, build_model, build_vlm_tokenizer, image_dataset_rows, save_vlm
from trl_dpo_ext import DPOConfig, DPOTrainer
from trl_dpo_ext.collator import PreferenceCollator
from trl_dpo_ext.logps import completion_token_logps
from trl_dpo_ext.models import nf4_config, quantized_modules
from trl_dpo_ext.refcache import with_reference_cache
from trl_dpo_ext.reference import ADAPTERS_OFF


pytest.importorskip("PIL")

NAME = "tiny-LlavaForConditionalGeneration"
# The language model's projections: the usual QLoRA target on a VLM (the vision tower stays frozen 4-bit).
TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Two steps, no metrics plot (matplotlib's first figure costs more than the training here).
ARGS = {**CPU_ARGS, "max_steps": 2, "max_length": None, "save_metrics_plot": False}


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vlm") / NAME
    save_vlm(NAME, directory)
    return directory


@pytest.fixture
def images() -> Dataset:
    return Dataset.from_list(image_dataset_rows(f"{ORG}/zen-image", "conversational_preference")["train"][:4])


def load_4bit(vlm_dir) -> LlavaForConditionalGeneration:
    model = LlavaForConditionalGeneration.from_pretrained(
        vlm_dir, quantization_config=nf4_config(torch.float32), dtype=torch.float32
    )
    return fp32_4bit_kernels(model)


def test_a_4bit_vlm_trains_against_adapters_off_and_its_adapter_loads_back(vlm_dir, images, tmp_path, caplog):
    torch.manual_seed(0)
    model = get_peft_model(load_4bit(vlm_dir), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    assert quantized_modules(model)  # the base is 4-bit, vision tower included
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = DPOConfig(output_dir=str(tmp_path / "out"), **ARGS)
    with caplog.at_level(logging.WARNING, logger="trl_dpo_ext.trainer"):
        trainer = DPOTrainer(
            model=model, args=args, train_dataset=images, processing_class=AutoProcessor.from_pretrained(vlm_dir)
        )
    # Asked for prompt sharing (the default), given TRL's layout with the reason, once.
    assert "Plain layout instead of share_prompt because" in caplog.text
    assert caplog.text.count("the rows hold images") == 1
    assert not trainer.share_prompt and not trainer.packing
    # One base: no second model, no "ref" copy of the adapter; the reference is the base with adapters off.
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]
    assert trainer.reference.label == ADAPTERS_OFF

    trainer.train()

    first, second = [row for row in trainer.state.log_history if "loss" in row]
    # Step 1, before any update, with a fresh adapter (B = 0 adds exactly 0): the policy and the reference (adapters
    # off) run the same kernels on the same batch, pixels included, so every margin is exactly 0: log 2 in fp32.
    assert first["loss"] == zero_margin_loss(args.per_device_train_batch_size)
    assert first["rewards/margins"] == 0.0
    assert math.isfinite(second["loss"]) and second["loss"] != first["loss"]
    for metric in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert metric in first and metric in second
    # The adapter moved; the 4-bit base (and everything else frozen) did not.
    assert not any(torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(load_4bit(vlm_dir), str(tmp_path / "adapter"))
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[n], loaded[n]) for n in trained)
    batch = trainer.data_collator([dict(row) for row in images.select(range(2))])
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    model.eval()
    with torch.no_grad():
        # Same weights, same kernels, same batch: the same logits, bit for bit.
        assert torch.equal(model(**inputs).logits, reloaded.eval()(**inputs).logits)


def test_the_reference_cache_refuses_rows_with_images(images):
    # Refused before anything is keyed or computed: its key is token ids, and two rows with one text and two
    # images would share reference values.
    with pytest.raises(ValueError, match=r"ref_cache cannot hold the reference of rows with images.*\['images'\]"):
        with_reference_cache(SimpleNamespace(), images, "train")
    processed = Dataset.from_dict({"prompt_ids": [[1]], "pixel_values": [[[0.0]]]})
    with pytest.raises(ValueError, match=r"\['pixel_values'\]"):
        with_reference_cache(SimpleNamespace(), processed, "eval")


def test_a_trainer_with_ref_cache_on_images_stops_at_construction(vlm_dir, images, tmp_path):
    model = get_peft_model(load_4bit(vlm_dir), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    args = DPOConfig(output_dir=str(tmp_path / "out"), **ARGS, ref_cache=True)
    with pytest.raises(ValueError, match="its key covers the token ids, not the pixels"):
        DPOTrainer(
            model=model, args=args, train_dataset=images, processing_class=AutoProcessor.from_pretrained(vlm_dir)
        )


def test_text_rows_on_a_multimodal_rope_model_share_the_prompt_with_the_plain_log_probs(tmp_path):
    # Rows without images keep prompt sharing and packing on a VLM: Qwen2.5-VL's multimodal RoPE takes the 2D
    # positions of these layouts as text positions (the same in all three axes), so every answer token sees the
    # context and positions it has in the plain layout. (Its processor needs torchvision; its tokenizer does not.)
    name = "tiny-Qwen2_5_VLForConditionalGeneration"
    _, _, special, placeholder, _ = VISION_MODELS[name]
    tokenizer = build_vlm_tokenizer(special, placeholder)
    model = build_model(name, tokenizer)
    model.save_pretrained(tmp_path / "model")
    model = type(model).from_pretrained(
        tmp_path / "model", quantization_config=nf4_config(torch.float32), dtype=torch.float32
    )
    # A random adapter (B ≠ 0, scaled up for these tiny widths) added by the trainer: π ≠ π_ref = adapters off.
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=TARGETS, init_lora_weights=False)
    rows = Dataset.from_list(dataset_rows(f"{ORG}/zen", "standard_preference")["train"][:4])
    args = DPOConfig(output_dir=str(tmp_path / "out"), **ARGS, share_prompt=False)
    trainer = DPOTrainer(
        model=fp32_4bit_kernels(model), args=args, train_dataset=rows, processing_class=tokenizer, peft_config=lora
    )
    assert trainer.reference.label == ADAPTERS_OFF
    examples = list(trainer.train_dataset)

    def batch(share_prompt: bool, packing: bool) -> dict:
        collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id, share_prompt=share_prompt, packing=packing)
        return collator([dict(row) for row in examples])

    plain, config = batch(False, False), model.config.get_text_config()
    with torch.no_grad():
        for which, run in (
            ("policy", lambda b: completion_token_logps(trainer.model, b)),
            ("reference", trainer._reference_token_logps),
        ):
            want = run(plain)
            for layout in ((True, False), (True, True)):
                other = batch(*layout)
                got = run(other)
                seq_len = max(plain["input_ids"].size(1), other["input_ids"].size(1))
                tol = sequence_logps_tol(want.sequence_logps(), want.lengths(), config, seq_len, lora_r=4)
                assert_within(got.sequence_logps(), want.sequence_logps(), tol, f"{which}, {layout}")
                assert torch.equal(got.lengths(), want.lengths())
        policy = completion_token_logps(trainer.model, plain).sequence_logps()
        reference = trainer._reference_token_logps(plain).sequence_logps()
    # The adapter moves every answer's log-prob beyond the tolerance: both paths are exercised, and could fail.
    assert_effect((policy - reference).abs(), tol, factor=2, what="policy vs reference")
