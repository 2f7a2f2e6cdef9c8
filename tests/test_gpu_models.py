"""`benchmarks.gpu_models`: a random QLoRA model built without files equals `load_qlora_model` of a saved one."""

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

from benchmarks import gpu_models
from trl_dpo_ext import load_qlora_model


# Small enough for a 2-core CPU; head_dim 16 and NF4's 64-value blocks still divide every weight.
TINY = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
)
SEED = 3


def tiny_model_and_checkpoint(shape, path):
    """`random_qlora_model` of a tiny `shape`, and `load_qlora_model` of its weights saved by `save_pretrained`."""
    config = gpu_models.shape_config(shape, **TINY)
    ours = gpu_models.random_qlora_model(config, device="cpu", seed=SEED)

    plain = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config).to(torch.bfloat16)
    state = {name: tensor[...] for name, tensor in gpu_models.random_state_dict(config, seed=SEED).items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert set(missing) == set(plain.all_tied_weights_keys) and not unexpected
    plain.save_pretrained(path)
    with safe_open(path / "model.safetensors", "pt") as saved:
        assert set(saved.keys()) == set(state)

    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    loaded = load_qlora_model(str(path), lora, compute_dtype=torch.bfloat16, attn_implementation="sdpa")
    return ours, loaded


@pytest.mark.parametrize("shape", sorted(gpu_models.SHAPES))
def test_random_model_equals_load_qlora_model_of_a_checkpoint(shape, tmp_path):
    ours, loaded = tiny_model_and_checkpoint(shape, tmp_path)

    # What TRL and peft look at to treat the model as 4-bit QLoRA.
    for model in (ours, loaded):
        assert model.is_loaded_in_4bit and model.base_model.model.is_loaded_in_4bit
    assert type(ours.base_model.model.hf_quantizer) is type(loaded.base_model.model.hf_quantizer)
    assert ours.config.quantization_config.to_dict() == loaded.config.quantization_config.to_dict()
    ours_lora, loaded_lora = (m.peft_config["default"].to_dict() for m in (ours, loaded))
    assert ours_lora.pop("base_model_name_or_path") == f"random-{ours.config.model_type}"
    assert ours_lora == {k: v for k, v in loaded_lora.items() if k != "base_model_name_or_path"}

    def linear4bit_names(model):
        return [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]

    assert linear4bit_names(ours) == linear4bit_names(loaded) and len(linear4bit_names(ours)) == 2 * 7

    def params(model):
        return {name: (p.dtype, p.shape, p.requires_grad) for name, p in model.named_parameters()}

    assert params(ours) == params(loaded)

    # The same packed 4-bit weights and quantization constants, bit for bit (LoRA A is drawn by peft at random).
    ours_state, loaded_state = ours.state_dict(), loaded.state_dict()
    assert ours_state.keys() == loaded_state.keys()
    for name, tensor in ours_state.items():
        if "lora_A" not in name:
            assert torch.equal(tensor, loaded_state[name]), name

    # Identical weights and identical kernels: logits agree exactly, adapters on (B = 0) and off.
    input_ids = torch.randint(TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=input_ids).logits, loaded(input_ids=input_ids).logits)
        with ours.disable_adapter(), loaded.disable_adapter():
            assert torch.equal(ours(input_ids=input_ids).logits, loaded(input_ids=input_ids).logits)


def test_random_weights_are_seeded_by_name():
    config = gpu_models.shape_config("qwen2.5-1.5b", **TINY)
    first, again, other = (gpu_models.random_state_dict(config, seed=seed) for seed in (0, 0, 1))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(first[name][...], again[name][...])
    assert not torch.equal(first[name][...], other[name][...])
    assert not torch.equal(first[name][...], first["model.layers.0.mlp.down_proj.weight"][...])
    assert "lm_head.weight" not in first  # tied to the embeddings, stored once like in a checkpoint


@pytest.mark.parametrize(("shape", "parameters"), [("llama3-8b", 8_030_261_248), ("qwen2.5-1.5b", 1_543_714_304)])
def test_full_shapes_have_the_published_parameter_counts(shape, parameters):
    state = gpu_models.random_state_dict(gpu_models.shape_config(shape))  # lazy: nothing is allocated
    assert sum(tensor.shape.numel() for tensor in state.values()) == parameters


def test_parameter_memory_counts_each_kind(tmp_path):
    config = gpu_models.shape_config("llama3-8b", **TINY)
    model = gpu_models.random_qlora_model(config, lora_r=8, device="cpu")
    memory = gpu_models.parameter_memory(model)

    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert memory["nf4_weights"] == sum(m.in_features * m.out_features for m in linears) // 2  # two values a byte
    assert 0 < memory["nf4_constants"] < memory["nf4_weights"]
    assert memory["lora"] == sum(8 * (m.in_features + m.out_features) for m in linears) * 4  # fp32 adapters
    embeddings = 2 * config.vocab_size * config.hidden_size  # untied input and output embeddings
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size
    assert memory["unquantized"] == (embeddings + norms) * 2  # bf16
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")


def test_smoke_runs_a_checkpointed_forward_and_backward_on_cpu():
    report = gpu_models.smoke(gpu_models.shape_config("qwen2.5-1.5b", **TINY), seq_len=32, device="cpu")
    assert report["peak_build_mib"] is None and report["param_mib"]["total"] > 0
    assert torch.isfinite(torch.tensor(report["loss"])) and report["lora_b_grad_norm"] > 0
