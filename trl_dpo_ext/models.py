"""One 4-bit NF4 base shared by policy (base + LoRA) and reference (same base, adapters off or a frozen SFT adapter).

The reference never needs its own copy of the base: peft switches adapters on the same `Linear4bit` modules, so the
memory of a DPO run is one quantized base plus two small adapters at most.

The rules every caller shares live here too: the pad id a model can embed ([`safe_pad_id`]) and the one cast of adapter
weights to a dtype ([`cast_adapter_weights`]).
"""

import logging

import torch
from accelerate.utils import extract_model_from_parallel
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations import is_deepspeed_zero3_enabled

from .config import check_compute_dtype, check_storage_dtype


logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_STORAGE_DTYPES = {"uint8": torch.uint8, **_DTYPES}


def base_model(model: torch.nn.Module) -> PreTrainedModel:
    """The `PreTrainedModel` under `model`: unwrapped from DDP/FSDP/`torch.compile` (accelerate) and from peft."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def resolve_compute_dtype(name: str) -> torch.dtype:
    """`"auto"` → bfloat16 where a CUDA device supports it, float32 elsewhere (bf16 matmuls are slow on CPUs)."""
    check_compute_dtype(name)
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return _DTYPES[name]


def nf4_config(
    compute_dtype: torch.dtype = torch.float32, double_quant: bool = True, quant_storage: torch.dtype = torch.uint8
) -> BitsAndBytesConfig:
    """
    The QLoRA paper's quantization: NF4 storage, optional double quantization, matmuls in `compute_dtype`. The packed
    4-bit values are stored as `quant_storage` (FSDP wants it equal to the dtype of the other parameters).
    """
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )


def load_qlora_model(
    model_name_or_path: str,
    lora_config: LoraConfig | None = None,
    *,
    sft_adapter_path: str | None = None,
    compute_dtype: torch.dtype | str = "auto",
    double_quant: bool = True,
    quant_storage: str | None = None,
    revision: str = "main",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> PeftModel:
    """
    Load a causal LM once in NF4 4-bit and put LoRA adapters on it.

    With `lora_config`, a fresh adapter `"default"` is added (LoRA's B starts at zero, so base + adapter is the base
    exactly and the reference is taken with adapters off). With `sft_adapter_path`, that adapter is loaded trainable as
    `"default"`; [`trl_dpo_ext.DPOTrainer`] then keeps a frozen copy named `"ref"` on the same base as the reference.

    Args:
        model_name_or_path (`str`): Hub id or local directory of the base model.
        lora_config (`peft.LoraConfig`, *optional*): Config of a fresh adapter. Exclusive with `sft_adapter_path`.
        sft_adapter_path (`str`, *optional*): Directory (or Hub id) of an SFT LoRA adapter to continue from.
        compute_dtype (`torch.dtype` or `str`, *optional*, defaults to `"auto"`): Dtype of the 4-bit matmuls.
        double_quant (`bool`, *optional*, defaults to `True`): Quantize the quantization constants too.
        quant_storage (`str`, *optional*): Storage dtype of the packed 4-bit weights, `"uint8"` when unset; FSDP
            needs the dtype of the other parameters (e.g. `"bfloat16"`).
        revision (`str`, *optional*, defaults to `"main"`): Model revision on the Hub.
        attn_implementation (`str`, *optional*): Passed to `from_pretrained` (e.g. `"sdpa"`, `"eager"`).
        trust_remote_code (`bool`, *optional*, defaults to `False`): Allow model code from the Hub. Off unless asked.

    Returns:
        `peft.PeftModel`: the policy. `with model.disable_adapter():` runs the bare 4-bit base.
    """
    if (lora_config is None) == (sft_adapter_path is None):
        raise ValueError("Pass exactly one of `lora_config` (a fresh adapter) or `sft_adapter_path` (continue SFT).")
    if isinstance(compute_dtype, str):
        compute_dtype = resolve_compute_dtype(compute_dtype)
    check_storage_dtype(quant_storage)
    storage = _STORAGE_DTYPES[quant_storage or "uint8"]
    base = AutoModelForCausalLM.from_pretrained(
        model_name_or_path,
        revision=revision,
        quantization_config=nf4_config(compute_dtype, double_quant, storage),
        dtype=compute_dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        # ZeRO-3 places (partitions) the weights itself; transformers refuses a device_map with it.
        device_map=None if is_deepspeed_zero3_enabled() else {"": _default_device()},
    )
    keep_fp32_cpu_kernels(base)
    if sft_adapter_path is not None:
        model = PeftModel.from_pretrained(base, sft_adapter_path, is_trainable=True)
    else:
        model = get_peft_model(base, lora_config)
    logger.info(
        "Loaded %s in 4-bit NF4 (compute %s) with LoRA: %s", model_name_or_path, compute_dtype, _summary(model)
    )
    return model


def is_identity_adapter(model: PreTrainedModel, adapter_name: str = "default") -> bool:
    """True when every LoRA B of `adapter_name` is zero, i.e. base + adapter computes exactly the base."""
    marker = f".lora_B.{adapter_name}."
    weights = [p for n, p in model.named_parameters() if marker in n]
    return bool(weights) and all(not torch.any(p) for p in weights)


def quantized_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The `bitsandbytes` 4-bit linear layers of `model` (the memory that must exist once)."""
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def keep_fp32_cpu_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """
    Keep every fp32-compute 4-bit layer of `model` on bitsandbytes' fp32 path (dequantize, then an fp32 matmul) in
    eval mode too.

    On a CPU with AVX512-BF16, `bnb.nn.Linear4bit.forward` (bitsandbytes >= 0.48) repacks its weights in place
    (absmax rounded to bf16, double quantization undone) and switches to a bf16 kernel whenever it runs in eval mode
    without grad, and stays repacked afterwards. That silently makes a reference pass (the reference cache, held-out
    scoring) bf16 while training computes in fp32, so π_ref ≠ π at step 0. A no-op on other CPUs and on GPUs.
    """
    for module in quantized_modules(model):
        # A layer that computes in bf16/fp16 by choice keeps bitsandbytes' behaviour; only fp32 compute is kept fp32.
        if module.compute_dtype in (None, torch.float32):
            module.support_avx512bf16_for_cpu = False
    return model


def cast_adapter_weights(
    model: torch.nn.Module,
    dtype: torch.dtype,
    adapter_name: str | None = None,
    *,
    names: set[str] | None = None,
) -> int:
    """
    Cast adapter weights of `model` to `dtype` in place: the one place an adapter's dtype is set after loading.

    Args:
        model (`torch.nn.Module`): a `PeftModel` (or any model with trainable weights).
        dtype (`torch.dtype`): the dtype to cast to.
        adapter_name (`str`, *optional*): cast the LoRA weights of this adapter, trainable or frozen; by default,
            every trainable parameter (the active adapter, what the optimizer updates).
        names (`set[str]`, *optional*): cast only the parameters of these names among those.

    Returns:
        `int`: how many tensors changed dtype.
    """
    marker = f".{adapter_name}."
    cast = 0
    for name, param in model.named_parameters():
        chosen = param.requires_grad if adapter_name is None else "lora_" in name and marker in name
        if chosen and (names is None or name in names) and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def upcast_adapter_weights(model: torch.nn.Module) -> int:
    """
    Cast the trainable weights of a 4-bit `model` back to fp32 (what peft creates them in), so that the optimizer
    keeps fp32 master weights; returns how many tensors were cast. A model that is not quantized is left alone:
    there, a low-precision adapter is the caller's choice, not TRL's cast.
    """
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return 0
    return cast_adapter_weights(model, torch.float32)


def safe_pad_id(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> int:
    """
    The id that pads a batch for `model`: the tokenizer's pad id when the model can embed it, else eos. TRL's PPO
    example adds a new `[PAD]` token without resizing the embeddings, so its id is out of range; padded positions are
    masked, so which in-range id pads changes no number.
    """
    vocab = model.get_input_embeddings().num_embeddings
    pad = tokenizer.pad_token_id
    return pad if pad is not None and pad < vocab else tokenizer.eos_token_id


def mask_pad_id(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> int:
    """The id that marks padding in a `(query, response)` layout: the tokenizer's pad, else [`safe_pad_id`]."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else safe_pad_id(tokenizer, model)


def _default_device() -> str | int:
    if torch.cuda.is_available():
        from accelerate import PartialState

        return PartialState().local_process_index
    return "cpu"


def _summary(model: PeftModel) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters"
