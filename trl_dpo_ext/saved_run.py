"""A saved run read back: `dpo_config.json`, written by `DPOTrainer.save_model` beside every adapter it saves, and the
base model loaded as that run trained it.

`dpo_config.json` holds the run's `DPOConfig` as JSON (never a pickle), the base model's 4-bit quantization and the
collator's layout — what [`trl_dpo_ext.ImplicitReward`] and `trl-dpo-ext merge` need to rebuild the trained model.
"""

import dataclasses
import json
import logging
from importlib.metadata import version
from pathlib import Path

from peft import PeftConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from .atomic import atomic_write
from .checkpoints import TRAINING_CONFIG_FILE
from .collator import PreferenceCollator
from .models import base_model, nf4_config


logger = logging.getLogger(__name__)


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
