"""Export a trained adapter as a plain model: dequantize the 4-bit base, merge LoRA into it, save safetensors.

The adapter was trained against the *dequantized* NF4 weights (a 4-bit layer computes with them), so the merge starts
from those, not from the original full-precision checkpoint: the merged model computes what the adapter model did.
The result loads with `AutoModelForCausalLM.from_pretrained` alone — no peft, no bitsandbytes.
"""

import logging
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoTokenizer

from .atomic import atomic_dir
from .saved_run import load_base_as_trained


logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def merge_adapter(
    adapter_path: str | Path,
    output_dir: str | Path,
    dtype: str = "bf16",
    overwrite: bool = False,
    base_model: str | None = None,
    device: str = "cpu",
) -> Path:
    """
    Merge a LoRA adapter into its dequantized base and save the model and the tokenizer to `output_dir`.

    Args:
        adapter_path (`str` or `Path`): adapter directory saved by [`trl_dpo_ext.DPOTrainer`] (its `dpo_config.json`
            says how the base was quantized; without it, NF4 with double quantization is assumed).
        output_dir (`str` or `Path`): where to write; must be empty or absent unless `overwrite`.
        dtype (`str`, *optional*, defaults to `"bf16"`): dtype of the saved weights: `"bf16"`, `"fp16"` or `"fp32"`.
        overwrite (`bool`, *optional*, defaults to `False`): replace a non-empty `output_dir`.
        base_model (`str`, *optional*): overrides the base named in `adapter_config.json`.
        device (`str`, *optional*, defaults to `"cpu"`): where to dequantize and merge (`"cuda"` is faster if the
            model fits).

    Returns:
        `Path` of the saved model.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    adapter_path, output_dir = Path(adapter_path), Path(output_dir)
    if output_dir.resolve() == adapter_path.resolve():
        raise ValueError(f"the output directory {output_dir} is the adapter directory; choose another one")
    if output_dir.exists() and not overwrite and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} is not empty; pass --overwrite (overwrite=True) to replace it")

    model = load_base_as_trained(adapter_path, base_model, device, unquantized_dtype=DTYPES[dtype])
    if getattr(model, "is_loaded_in_4bit", False):
        model = model.dequantize()
    model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload().to(DTYPES[dtype])
    has_tokenizer = (adapter_path / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter_path if has_tokenizer else model.name_or_path)

    # Write beside the target and move it in at the end: a failed merge never leaves half a model in `output_dir`.
    with atomic_dir(output_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    logger.info("Merged %s into %s and saved it to %s (%s)", adapter_path, model.name_or_path, output_dir, dtype)
    return output_dir
