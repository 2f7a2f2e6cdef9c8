"""QLoRA models of real shapes with random weights, built on the GPU without a checkpoint on disk.

`random_qlora_model("llama3-8b")` returns what `trl_dpo_ext.load_qlora_model(path, LoraConfig(r=16, lora_alpha=32,
target_modules="all-linear", task_type="CAUSAL_LM"), compute_dtype=torch.bfloat16)` returns for a Llama-3-8B
checkpoint: the same `from_pretrained` call (NF4, double quantization, `Linear4bit` where transformers puts them,
`is_loaded_in_4bit`, `hf_quantizer`, `config.quantization_config`), fed a lazy state dict instead of files. Each tensor
is drawn on the device when transformers asks for it and quantized right away, so the bf16 weights never exist all at
once (the largest transient is one embedding matrix). Writing and reading an 8B checkpoint would instead cost minutes.

Random weights are enough to benchmark speed and memory: the compute does not depend on their values. Each tensor is
seeded by its name, so `random_state_dict` gives the same values again, e.g. to save them as a real checkpoint
(`tests/test_gpu_models.py` checks that loading that checkpoint gives identical logits).

Smoke check on a GPU: `python -m benchmarks.gpu_models llama3-8b --seq-len 1024`.
"""

import argparse
import time
import zlib
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, LlamaConfig, PretrainedConfig, PreTrainedModel, Qwen2Config

from trl_dpo_ext.models import nf4_config


# The published configs of the base models (only the fields that shape the compute; token ids do not).
SHAPES: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama3-8b": (
        LlamaConfig,
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            tie_word_embeddings=False,
        ),
    ),
    "qwen2.5-1.5b": (
        Qwen2Config,
        dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=131072,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
        ),
    ),
}


def shape_config(shape: str, **overrides) -> PretrainedConfig:
    """
    The config of a named shape, with fields overridden, e.g. a scaled-down copy for a CPU test.

    Args:
        shape (`str`): One of `SHAPES` (`"llama3-8b"`, `"qwen2.5-1.5b"`).
        **overrides: Config fields to change (`num_hidden_layers=2, hidden_size=64, ...`). They are passed to the
            config's constructor, so derived fields (`head_dim`, Qwen2's `layer_types`) follow them.

    Returns:
        `transformers.PretrainedConfig`: a fresh config.
    """
    if shape not in SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; known: {sorted(SHAPES)}")
    config_class, fields = SHAPES[shape]
    return config_class(**{**fields, **overrides})


class _RandomTensor:
    """A tensor drawn only when indexed, like the safetensors slices `from_pretrained` materializes with `[...]`."""

    def __init__(
        self, shape: torch.Size, dtype: torch.dtype, device: torch.device, mean: float, std: float, seed: int
    ):
        self.shape, self.dtype, self.device, self.mean, self.std, self.seed = shape, dtype, device, mean, std, seed

    def __getitem__(self, index) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(self.seed)
        tensor = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return tensor.normal_(self.mean, self.std, generator=generator)[index]


def random_state_dict(
    config: PretrainedConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, _RandomTensor]:
    """
    The tensors a checkpoint of `config` holds (tied weights once, as `save_pretrained` writes them), drawn lazily.

    Every tensor is N(0, `initializer_range`), norm weights N(1, `initializer_range`) so that a layer's output keeps
    its scale; each is seeded by its name and `seed`, so indexing it (`tensor[...]`) gives the same values every time
    on a given device. Nothing is allocated until a tensor is indexed.

    Args:
        config (`transformers.PretrainedConfig`): Config of a causal LM.
        dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): Dtype of the drawn tensors.
        device (`torch.device` or `str`, *optional*, defaults to `"cpu"`): Where tensors are drawn.
        seed (`int`, *optional*, defaults to `0`): Seed of the whole state dict.

    Returns:
        `dict[str, _RandomTensor]`: name → lazy tensor (`.shape`, `.dtype`; `[...]` draws it).
    """
    # The meta device gives names and shapes without allocating; `all_tied_weights_keys` lists the tied copies
    # (e.g. Qwen's `lm_head.weight`) that a checkpoint does not store.
    with torch.device("meta"):
        skeleton = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    std = config.initializer_range
    return {
        name: _RandomTensor(
            tensor.shape,
            dtype,
            torch.device(device),
            mean=1.0 if name.endswith("norm.weight") else 0.0,
            std=std,
            seed=zlib.crc32(f"{seed}:{name}".encode()),
        )
        for name, tensor in skeleton.state_dict().items()
        if name not in skeleton.all_tied_weights_keys
    }


def random_nf4_base(
    shape: str | PretrainedConfig,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    device: torch.device | str = "cuda",
    seed: int = 0,
) -> PreTrainedModel:
    """
    A 4-bit NF4 base (double quantization) with random weights: `from_pretrained` of a checkpoint, without the files.

    For stock TRL's own route (`trl.DPOTrainer(model=base, peft_config=...)`); [`random_qlora_model`] adds the LoRA.

    Args:
        shape (`str` or `transformers.PretrainedConfig`): A name from `SHAPES`, or a config (see [`shape_config`]).
        compute_dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): Dtype of the 4-bit matmuls and of the
            unquantized weights (embeddings, norms, `lm_head`), as `load_qlora_model(compute_dtype=...)` loads them.
        attn_implementation (`str`, *optional*, defaults to `"sdpa"`): Passed to `from_pretrained`.
        device (`torch.device` or `str`, *optional*, defaults to `"cuda"`): Where the model is built.
        seed (`int`, *optional*, defaults to `0`): Seed of the weights (see [`random_state_dict`]).

    Returns:
        `transformers.PreTrainedModel`: the quantized causal LM, in eval mode like any `from_pretrained` result.
    """
    config = shape_config(shape) if isinstance(shape, str) else shape
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
        None,
        config=config,
        # transformers quantizes on the fly one tensor at a time (no loader threads), drawing each just before.
        state_dict=random_state_dict(config, dtype=compute_dtype, device=device, seed=seed),
        quantization_config=nf4_config(compute_dtype, double_quant=True),
        dtype=compute_dtype,
        attn_implementation=attn_implementation,
        device_map={"": device},
    )
    # `from_pretrained(None, ...)` leaves no name; peft, TRL and the trainer name outputs after it.
    model.name_or_path = model.config.name_or_path = f"random-{shape if isinstance(shape, str) else config.model_type}"
    return model


def random_qlora_model(
    shape: str | PretrainedConfig,
    *,
    lora_r: int = 16,
    lora_alpha: int | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    device: torch.device | str = "cuda",
    seed: int = 0,
) -> PeftModel:
    """
    What `trl_dpo_ext.load_qlora_model` returns for a checkpoint of `shape`, with random weights and no checkpoint.

    Args:
        shape (`str` or `transformers.PretrainedConfig`): A name from `SHAPES`, or a config (see [`shape_config`]).
        lora_r (`int`, *optional*, defaults to `16`): LoRA rank, on every linear layer (`target_modules="all-linear"`).
        lora_alpha (`int`, *optional*): LoRA alpha; defaults to `2 * lora_r` (the recipe's r=16, alpha=32).
        compute_dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): See [`random_nf4_base`].
        attn_implementation (`str`, *optional*, defaults to `"sdpa"`): Passed to `from_pretrained`.
        device (`torch.device` or `str`, *optional*, defaults to `"cuda"`): Where the model is built.
        seed (`int`, *optional*, defaults to `0`): Seed of the base weights (LoRA A uses the global RNG, as in peft).

    Returns:
        `peft.PeftModel`: the policy with a fresh adapter `"default"` (B = 0, so it computes the base exactly).
    """
    base = random_nf4_base(
        shape, compute_dtype=compute_dtype, attn_implementation=attn_implementation, device=device, seed=seed
    )
    lora_config = LoraConfig(
        r=lora_r,
        lora_alpha=2 * lora_r if lora_alpha is None else lora_alpha,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora_config)


def parameter_memory(model: torch.nn.Module) -> dict[str, int]:
    """
    Bytes held by the parameters of a (peft-wrapped) 4-bit model, by kind.

    Returns:
        `dict[str, int]`: `nf4_weights` (packed 4-bit weights), `nf4_constants` (their quantization constants:
        absmax, quantization maps, the double-quantization state), `unquantized` (embeddings, `lm_head`, norms,
        biases), `lora` (adapter weights) and `total`. Tied weights count once.
    """
    import bitsandbytes as bnb

    sizes = dict.fromkeys(("nf4_weights", "nf4_constants", "unquantized", "lora"), 0)
    for name, param in model.named_parameters():
        if isinstance(param, bnb.nn.Params4bit):
            sizes["nf4_weights"] += param.nbytes
            constants = param.quant_state.as_dict().values()
            sizes["nf4_constants"] += sum(t.nbytes for t in constants if isinstance(t, torch.Tensor))
        else:
            sizes["lora" if "lora_" in name else "unquantized"] += param.nbytes
    sizes["total"] = sum(sizes.values())
    return sizes


def smoke(shape: str | PretrainedConfig, seq_len: int = 1024, device: torch.device | str = "cuda") -> dict[str, Any]:
    """
    Build `shape`, then run one forward and backward of `seq_len` random tokens the way TRL trains a QLoRA model
    (gradient checkpointing, input gradients on, LoRA weights cast to bf16, bf16 autocast on CUDA).

    Returns:
        `dict[str, Any]`: `build_s`, `step_s` (seconds), `peak_build_mib` and `peak_step_mib` (CUDA
        `max_memory_allocated`, `None` elsewhere), `param_mib` (see [`parameter_memory`]), `loss` and
        `lora_b_grad_norm` (LoRA's A gets no gradient while B is zero).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def peak_mib() -> float | None:
        return torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None

    start = time.perf_counter()
    model = random_qlora_model(shape, device=device)
    if cuda:
        torch.cuda.synchronize(device)
    report = {"build_s": time.perf_counter() - start, "peak_build_mib": peak_mib()}
    report["param_mib"] = {kind: size / 2**20 for kind, size in parameter_memory(model).items()}

    # What trl.DPOTrainer does to a 4-bit PeftModel before training (trl/trainer/dpo_trainer.py, `__init__`).
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    model.train()
    input_ids = torch.randint(model.config.vocab_size, (1, seq_len), device=device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    if cuda:
        torch.cuda.synchronize(device)
    report["step_s"] = time.perf_counter() - start
    report["peak_step_mib"] = peak_mib()
    report["loss"] = loss.item()
    grads = [p.grad.float().norm() for n, p in model.named_parameters() if "lora_B" in n and p.grad is not None]
    report["lora_b_grad_norm"] = torch.stack(grads).norm().item()
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build a random QLoRA model and run one forward/backward.")
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    for key, value in smoke(args.shape, args.seq_len, args.device).items():
        print(f"{key}: {value}")
