"""A saved run checked and read back: the adapter file checked against the model that wrote it, `dpo_config.json`
(written by `DPOTrainer.save_model` beside every adapter it saves), and the base model loaded as that run trained it.

`dpo_config.json` holds the run's `DPOConfig` as JSON (never a pickle), the base model's 4-bit quantization and the
collator's layout — what [`trl_dpo_ext.ImplicitReward`] and `trl-dpo-ext merge` need to rebuild the trained model.
"""

import dataclasses
import json
import logging
from importlib.metadata import version
from pathlib import Path

from peft import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from .atomic import atomic_write
from .checkpoints import TRAINING_CONFIG_FILE
from .collator import PreferenceCollator
from .models import base_model, nf4_config


logger = logging.getLogger(__name__)

# Modules that wrappers (FSDP1, activation checkpointing, torch.compile) insert into parameter names; a saved adapter's
# keys have none of them.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


class IncompleteAdapterError(RuntimeError):
    """A save wrote an adapter file that lacks some of the model's trainable adapter weights."""


def expected_adapter_keys(model) -> set[str]:
    """
    The keys peft writes for the trainable weights of `model`'s active adapter (a `peft.PeftModel`, unwrapped from
    DDP/FSDP): each trainable parameter's name without wrapper modules and, as peft names them in a save, without the
    adapter name (`...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight`; a `modules_to_save` copy is saved
    under the wrapped module's own name).
    """
    adapter, keys = model.active_adapter, set()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        parts = [part for part in name.split(".") if part not in _WRAPPER_SEGMENTS]
        if "modules_to_save" in parts[:-1] and parts[parts.index("modules_to_save") + 1] == adapter:
            at = parts.index("modules_to_save")
            parts = parts[:at] + parts[at + 2 :]
        elif parts[-1] == adapter:
            parts = parts[:-1]
        elif len(parts) > 1 and parts[-2] == adapter:
            parts = parts[:-2] + parts[-1:]
        keys.add(".".join(parts))
    return keys


def check_saved_adapter(model, output_dir: str | Path) -> Path:
    """
    Check that the adapter file a save just wrote in `output_dir` holds every trainable adapter weight of `model`
    (see [`expected_adapter_keys`]): an empty or partial adapter fails here, at the save, not when it is loaded.

    Returns:
        `Path` of the checked file.

    Raises:
        [`IncompleteAdapterError`]: naming the file, the count of weights written against expected, and the keys
        missing.
    """
    adapter = model.active_adapter
    # peft writes the adapter named "default" in the directory itself, any other in a subdirectory of its name.
    path = Path(output_dir) / ("" if adapter == "default" else adapter) / SAFETENSORS_WEIGHTS_NAME
    expected = expected_adapter_keys(model)
    written = set()
    if path.is_file():
        with safe_open(path, framework="pt") as saved:
            written = set(saved.keys())
    missing = sorted(expected - written)
    if missing:
        raise IncompleteAdapterError(
            f"{path} holds {len(expected & written)} of the {len(expected)} trainable adapter weights "
            f"({len(missing)} missing, e.g. {missing[:3]}): the saved adapter is "
            f"{'empty' if not written else 'partial'}. Likely cause: a sharded save whose state dict keys do not "
            "match the adapter's (FSDP1 names them with _fsdp_wrapped_module; use FSDP2), or a DeepSpeed save "
            "without a gathered 16-bit model (zero3_save_16bit_model: true)."
        )
    return path


def save_training_config(trainer, output_dir: str | Path) -> Path:
    """
    Write `dpo_config.json` in `output_dir`: the trainer's `DPOConfig`, the base model's quantization config and the
    fields of its [`PreferenceCollator`], as JSON.

    Returns:
        `Path` of the written file.
    """
    base = base_model(trainer.model)
    quantization = getattr(base.config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    collator = trainer.data_collator
    payload = {
        "trl_dpo_ext_version": version("trl_dpo_ext"),
        "quantization_config": quantization,
        "collator": dataclasses.asdict(collator) if isinstance(collator, PreferenceCollator) else None,
        "dpo_config": json.loads(trainer.args.to_json_string()),
    }
    path = Path(output_dir) / TRAINING_CONFIG_FILE
    with atomic_write(path) as handle:
        json.dump(payload, handle, indent=2)
    return path


def load_training_config(directory: str | Path) -> dict | None:
    """The `dpo_config.json` of an adapter directory as a dict; `None` if this package did not save the adapter."""
    path = Path(directory) / TRAINING_CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def saved_quantization_config(saved: dict | None) -> BitsAndBytesConfig | None:
    """
    The quantization the base was trained in, from a loaded `dpo_config.json`: `None` for a base that was not
    quantized. Without the file (an adapter saved elsewhere), this package's default: NF4 with double quantization.
    """
    if saved is None:
        logger.warning("No %s: assuming the base was trained in NF4 with double quantization.", TRAINING_CONFIG_FILE)
        return nf4_config()
    config = saved["quantization_config"]
    return BitsAndBytesConfig.from_dict(config) if config is not None else None


def load_base_as_trained(
    adapter_path: str | Path, base_model: str | None = None, device: str = "cpu", unquantized_dtype="auto"
) -> PreTrainedModel:
    """
    The base model an adapter was trained on, loaded as training loaded it: quantized as `dpo_config.json` says, in
    the dtype `load_qlora_model` used (the compute dtype), which decides the 4-bit constants. A base that was not
    quantized is loaded in `unquantized_dtype`.
    """
    base_model = base_model or PeftConfig.from_pretrained(adapter_path).base_model_name_or_path
    quantization = saved_quantization_config(load_training_config(adapter_path))
    return AutoModelForCausalLM.from_pretrained(
        base_model,
        quantization_config=quantization,
        dtype=quantization.bnb_4bit_compute_dtype if quantization is not None else unquantized_dtype,
        device_map={"": device},
    )
