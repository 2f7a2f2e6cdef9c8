"""What `DPOTrainer.save_model` writes beside the adapter so that others can read and reuse it.

- `dpo_config.json`: the run's `DPOConfig` as JSON (never a pickle), the base model's 4-bit quantization and the
  collator's layout — what [`trl_dpo_ext.ImplicitReward`] and `trl-dpo-ext merge` need to rebuild the trained model.
- `README.md`: TRL's model card (tags, tracker links, citation; `trl.DPOTrainer.create_model_card`) extended with a
  Hub header for an adapter (`library_name: peft`, `base_model`, `datasets`), the training configuration, the final
  metrics table and the metrics plot.
"""

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

from accelerate.utils import is_peft_model
from huggingface_hub import ModelCard
from peft import PeftConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel
from trl.trainer.utils import get_config_model_id

from .atomic import atomic_write
from .collator import PreferenceCollator
from .models import base_model, nf4_config


logger = logging.getLogger(__name__)

TRAINING_CONFIG_FILE = "dpo_config.json"
PLOT_FILE = "metrics.png"
CARD_TAGS = ("trl", "dpo", "qlora")
# The settings a reader looks for first; the rest is in `dpo_config.json`.
CARD_SETTINGS = (
    "beta",
    "loss_type",
    "learning_rate",
    "lr_scheduler_type",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "seed",
)
# TRL's template renders a base model that is not a Hub id (a local directory) as a link to "None", and the quick start
# of a run not pushed to the Hub loads the model "None".
_TRL_NO_HUB_LINK = "[None](https://huggingface.co/None)"
_TRL_NO_HUB_MODEL = 'model="None"'


def save_training_config(trainer, output_dir: str | Path) -> Path:
    """
    Write `dpo_config.json` in `output_dir`: the trainer's `DPOConfig`, the base model's quantization config and the
    fields of its [`PreferenceCollator`], as JSON.

    Returns:
        `Path` of the written file.
    """
    from . import __version__  # here, not at the top: the package imports the trainer, which imports this module

    base = base_model(trainer.model)
    quantization = getattr(base.config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    collator = trainer.data_collator
    payload = {
        "trl_dpo_ext_version": __version__,
        "quantization_config": quantization,
        "collator": dataclasses.asdict(collator) if isinstance(collator, PreferenceCollator) else None,
        "dpo_config": json.loads(trainer.args.to_json_string()),
    }
    path = Path(output_dir) / TRAINING_CONFIG_FILE
    with atomic_write(path) as handle:
        json.dump(payload, handle, indent=2)
    return path


def save_model_files(trainer, output_dir: str | Path, final: bool, dataset_name: str | None = None) -> None:
    """
    What [`trl_dpo_ext.DPOTrainer.save_model`] adds to a save, on the main process: `dpo_config.json` always, and for
    a `final` save (not a checkpoint) the model card. TRL writes the card in `args.output_dir` (where `push_to_hub`
    uploads from); a save elsewhere gets a copy, with the plot it shows.
    """
    if not trainer.is_world_process_zero():
        return
    output_dir = Path(output_dir)
    save_training_config(trainer, output_dir)
    if not final:  # checkpoints get TRL's card from `_save_checkpoint`, `push_to_hub` from `create_model_card`
        return
    args = trainer.args
    model_name = args.hub_model_id.split("/")[-1] if args.hub_model_id else Path(args.output_dir).name
    trainer.create_model_card(model_name=model_name, dataset_name=dataset_name)
    card_dir = Path(args.output_dir)
    if output_dir.resolve() != card_dir.resolve():
        for name in ("README.md", PLOT_FILE):
            if (card_dir / name).is_file():
                shutil.copy2(card_dir / name, output_dir / name)


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


def extend_model_card(trainer, card_dir: str | Path, dataset_name: str | None = None) -> Path:
    """
    Extend the `README.md` that TRL's `create_model_card` wrote in `card_dir`: Hub header fields for an adapter
    (`library_name: peft`, `base_model`, `datasets`, tags `trl`/`dpo`/`qlora`), the training configuration, the final
    metrics table and the metrics plot (`metrics.png` in `card_dir`, if training saved one).

    Args:
        trainer ([`trl_dpo_ext.DPOTrainer`]): the trainer whose run the card describes.
        card_dir (`str` or `Path`): directory holding TRL's `README.md`.
        dataset_name (`str`, *optional*): Hub id of the training data, for the `datasets` header field.

    Returns:
        `Path` of the card.
    """
    path = Path(card_dir) / "README.md"
    card = ModelCard.load(path)
    model = trainer.accelerator.unwrap_model(trainer.model)
    base_id = get_config_model_id(base_model(trainer.model).config)
    if is_peft_model(model):
        card.data.library_name = "peft"
    card.data.base_model = base_id
    if dataset_name:
        card.data.datasets = [dataset_name]
    tags = list(card.data.tags or [])
    card.data.tags = tags + [tag for tag in CARD_TAGS if tag not in tags]
    text = card.text.replace(_TRL_NO_HUB_LINK, f"`{base_id}`").replace(_TRL_NO_HUB_MODEL, f'model="{card_dir}"')
    sections = _dpo_sections(trainer, model, base_id, Path(card_dir))
    # Our sections belong with the training procedure, before TRL's citations.
    head, citations, tail = text.partition("## Citations")
    card.text = f"{head.rstrip()}\n\n{sections}\n\n{citations}{tail}"
    with atomic_write(path, newline="", encoding="utf-8") as handle:  # as `ModelCard.save` writes it
        handle.write(str(card))
    return path


def _dpo_sections(trainer, model, base_id: str, card_dir: Path) -> str:
    args = trainer.args
    quantization = getattr(base_model(trainer.model).config, "quantization_config", None)
    qlora = is_peft_model(model) and quantization is not None
    lines = [f"## DPO{' with QLoRA' if qlora else ''} (trl_dpo_ext)", ""]
    if is_peft_model(model):
        lora = model.peft_config[model.active_adapter]
        base = f"`{base_id}`" + (" loaded in 4-bit NF4" if quantization is not None else "")
        lines += [
            f"Policy: {base} plus a LoRA adapter (r={lora.r}, alpha={lora.lora_alpha}, dropout={lora.lora_dropout}, "
            f"on {_targets(lora)}). Reference: {trainer.reference.describe()}.",
            "",
        ]
    lines += ["### Training configuration", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{key}` | {_value(getattr(args, key))} |" for key in CARD_SETTINGS if hasattr(args, key)]
    lines += ["", f"Every setting: [`{TRAINING_CONFIG_FILE}`]({TRAINING_CONFIG_FILE}).", ""]
    history = trainer.state.log_history
    train_log = next((row for row in reversed(history) if "loss" in row), None)
    eval_log = next((row for row in reversed(history) if "eval_loss" in row), None)
    if train_log or eval_log:
        lines += ["### Final metrics", ""]
    for title, row in (("training", train_log), ("evaluation", eval_log)):
        if row:
            lines += [f"Last {title} log (step {row['step']}):", "", "| metric | value |", "|---|---|"]
            lines += [f"| `{k}` | {_value(v)} |" for k, v in row.items() if k not in ("step", "epoch") and _numeric(v)]
            lines.append("")
    if (card_dir / PLOT_FILE).is_file():
        lines += ["### Metrics", "", f"![Training metrics: loss, reward accuracy, reward margin, KL]({PLOT_FILE})", ""]
    if is_peft_model(model):
        lines += [
            "### Use it",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            "from trl_dpo_ext import ImplicitReward",
            "",
            'model = AutoPeftModelForCausalLM.from_pretrained("<this directory or repo>")  # generate as usual',
            'reward = ImplicitReward.from_pretrained("<this directory>")  # β·log π/π_ref as a reward model',
            "```",
            "",
            "`trl-dpo-ext merge --adapter <this directory> --out merged` writes a plain model without peft or "
            "bitsandbytes.",
        ]
    return "\n".join(lines)


def _targets(lora) -> str:
    # peft expands "all-linear" into every module path; the layer names are what a reader needs. An adapter on
    # parameters (MoE experts, `target_parameters`) may have no target modules at all.
    names = []
    for targets in (getattr(lora, "target_modules", None), getattr(lora, "target_parameters", None)):
        names += [targets] if isinstance(targets, str) else list(targets or [])
    return ", ".join(sorted({name.split(".")[-1] for name in names})) or "no modules"


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(getattr(value, "value", value))
