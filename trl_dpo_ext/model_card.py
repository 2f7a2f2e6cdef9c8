"""The model card `DPOTrainer.save_model` writes beside the adapter (`dpo_config.json`, the run's settings, is written
by [`trl_dpo_ext.saved_run`]).

- `README.md`: TRL's model card (tags, tracker links, citation; `trl.DPOTrainer.create_model_card`) extended with a
  Hub header for an adapter (`library_name: peft`, `base_model`, `datasets`), the training configuration, the final
  metrics table and the metrics plot.
"""

import logging
import math
from pathlib import Path

from accelerate.utils import is_peft_model
from huggingface_hub import ModelCard
from trl.trainer.utils import get_config_model_id

from .atomic import atomic_write, is_disk_full
from .errors import DiskFullError
from .models import base_model
from .saved_run import TRAINING_CONFIG_FILE, save_training_config


logger = logging.getLogger(__name__)

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


def save_model_files(trainer, output_dir: str | Path, final: bool, dataset_name: str | None = None) -> None:
    """
    What [`trl_dpo_ext.DPOTrainer.save_model`] adds to a save, on the main process: `dpo_config.json` always, and for
    a `final` save (not a checkpoint) the model card ([`save_model_card`]).
    """
    if not trainer.is_world_process_zero():
        return
    save_training_config(trainer, output_dir)
    if final:  # checkpoints get TRL's card from `_save_checkpoint`, `push_to_hub` from `create_model_card`
        save_model_card(trainer, output_dir, dataset_name)


def save_model_card(trainer, output_dir: str | Path, dataset_name: str | None = None) -> None:
    """
    Write the model card of a final save, on the main process. TRL writes the card in `args.output_dir` (where
    `push_to_hub` uploads from); a save elsewhere gets a copy, with the plot it shows.

    Raises:
        [`trl_dpo_ext.errors.DiskFullError`]: the disk filled up; no half-written card is left (TRL writes
            `README.md` in place, so it is removed), and the adapter saved before it is complete.
    """
    if not trainer.is_world_process_zero():
        return
    output_dir = Path(output_dir)
    args = trainer.args
    model_name = args.hub_model_id.split("/")[-1] if args.hub_model_id else Path(args.output_dir).name
    card_dir = Path(args.output_dir)
    card = card_dir / "README.md"
    message = (
        "the model card was not written (no half-written card is left); the adapter saved beside it is complete. "
        "Free space and save again to get the card."
    )
    try:
        trainer.create_model_card(model_name=model_name, dataset_name=dataset_name)
    except Exception as error:
        if not is_disk_full(error, card):
            raise
        card.unlink(missing_ok=True)  # Why: TRL writes it in place: half of it, or TRL's card without ours
        raise DiskFullError(card, message) from error
    if output_dir.resolve() != card_dir.resolve():
        for name in ("README.md", PLOT_FILE):
            if (card_dir / name).is_file():
                # Why: atomically, not `shutil.copy2`: a full disk must not leave half a copy.
                with atomic_write(output_dir / name, "wb") as copy:
                    copy.write((card_dir / name).read_bytes())


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
