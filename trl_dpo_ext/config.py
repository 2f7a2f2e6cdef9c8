"""Dataclass configs. Every field is a `TrlParser` flag and a YAML key; validation lives in `__post_init__`."""

import math
import os
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path

import trl

from .losses import LOSSES
from .model_source import MODEL_HELP


# The allowed values of the options that more than one entry point takes (a config field, and the keyword of the
# collator or of `load_qlora_model`): each is checked by one function below, whichever way it comes in.
PADDING_SIDES = ("right", "left")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
STORAGE_DTYPES = ("uint8", "bfloat16", "float16", "float32")


def check_padding_side(padding_side: str) -> None:
    """Raise a `ValueError` naming `padding_side` unless it is `"right"` or `"left"`."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"`padding_side` must be 'right' or 'left', got {padding_side!r}.")


def check_compute_dtype(compute_dtype: str) -> None:
    """Raise a `ValueError` naming `bnb_4bit_compute_dtype` unless it is one of `COMPUTE_DTYPES`."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"`bnb_4bit_compute_dtype` must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}.")


def check_storage_dtype(quant_storage: str | None) -> None:
    """Raise a `ValueError` naming `bnb_4bit_quant_storage` unless it is unset or one of `STORAGE_DTYPES`."""
    if quant_storage is not None and quant_storage not in STORAGE_DTYPES:
        raise ValueError(f"`bnb_4bit_quant_storage` must be one of {STORAGE_DTYPES}, got {quant_storage!r}.")


def _trl_field(name: str, help: str, *, replace: bool = False) -> Field:
    """
    `trl.DPOConfig`'s field `name`, same default, with a help that says what [`trl_dpo_ext.DPOTrainer`] does with it:
    TRL's help followed by `help`, or `help` alone where TRL's would be wrong here (`replace`).
    """
    trl_field = next(f for f in fields(trl.DPOConfig) if f.name == name)
    metadata = {**trl_field.metadata, "help": help if replace else f"{trl_field.metadata['help']} {help}"}
    if trl_field.default_factory is not MISSING:
        return field(default_factory=trl_field.default_factory, metadata=metadata)
    return field(default=trl_field.default, metadata=metadata)


# Said of every option that makes this trainer run TRL's own loss (see `DPOTrainer._reasons_for_stock_loss`).
_STOCK_LOSS = "TRL's own loss runs, in the plain layout (no share_prompt or packing)."


@dataclass
class DPOConfig(trl.DPOConfig):
    r"""
    Configuration for [`trl_dpo_ext.DPOTrainer`]: TRL's [`~trl.DPOConfig`] plus the fields below, so switching from
    stock TRL is an import change.

    Parameters:
        padding_side (`str`, *optional*, defaults to `"right"`):
            Side the preference collator pads on. Position ids are built from the attention mask either way, so the
            log-probs do not depend on it.
        displacement_margin (`float`, *optional*, defaults to `1.0`):
            Likelihood-displacement alarm: warn once when the mean chosen log-prob has fallen more than this many nats
            below the reference's while reward accuracy rises.
        save_metrics_plot (`bool`, *optional*, defaults to `True`):
            Save the metric history (`metrics_history.json`) and a PNG plot (`metrics.png`) in `output_dir` at the end
            of training.
        share_prompt (`bool`, *optional*, defaults to `True`):
            Run each pair as one `[prompt│chosen│rejected]` sequence with a block attention mask, so the prompt is
            computed once instead of twice (policy and reference). Same log-probs as the plain layout. Falls back to
            the plain layout, with a logged reason, where the model cannot take a custom 4D mask.
        packing (`bool`, *optional*, defaults to `False`):
            Put all sequences of a batch in one row with per-sequence position ids and a block-diagonal mask: no pad
            token is computed. Works with `share_prompt`. TRL's `padding_free=True` turns this on.
        ref_cache (`bool`, *optional*, defaults to `False`):
            Compute the reference log-probs of the datasets once, store them under `ref_cache_dir` (safetensors), and
            read them back instead of running a reference forward in every step. Reused across runs with the same
            base, data, lengths and layout (a β or loss-type sweep too).
        ref_cache_dir (`str`, *optional*):
            Where the reference cache lives; defaults to `$TRL_DPO_EXT_CACHE/ref_logps` (`~/.cache/trl_dpo_ext`).
        max_consecutive_nonfinite (`int`, *optional*, defaults to `3`):
            An optimizer step whose loss or gradients are not finite is skipped (counted in `nonfinite/skipped_steps`
            and warned about); after this many skipped steps in a row, training stops with an error naming the step
            and the example indices.
        adapter_dtype (`str`, *optional*, defaults to `"float32"`):
            Dtype of the trainable adapter weights (the optimizer's master copy) on a 4-bit base. TRL casts them to
            `bfloat16`, where most AdamW updates at DPO's learning rates (5e-7 to 5e-6) are below half an ulp of the
            weight and are rounded away; `float32` keeps them. The forward still runs in the 4-bit compute dtype (and
            under autocast with `bf16=True`). `"bfloat16"` restores TRL's cast. No effect on a base that is not
            quantized (TRL casts nothing there).
        save_on_preemption (`bool`, *optional*, defaults to `True`):
            On SIGTERM, SIGUSR1 or a first Ctrl-C during training, finish the current optimizer step, write a complete
            checkpoint, and stop with exit status 75 (`--resume_from_checkpoint last` continues it exactly); see
            [`trl_dpo_ext.preemption`]. A second Ctrl-C stops at once. `False`: the signals act as they would without
            this package.

    TRL fields this trainer treats differently keep TRL's defaults; their help says what happens here:
    `padding_free=True` turns on `packing` (TRL 1.16 ignores it), `max_length` drops a row whose prompt fills it with a
    warning that counts such rows, `precompute_ref_log_probs` runs the plain layout and excludes `ref_cache`, whose
    one-time pass takes `precompute_ref_batch_size`; `ld_alpha` also keeps `ref_cache` off, and a loss outside
    [`trl_dpo_ext.LOSSES`], `ld_alpha`, `f_divergence_type` or `use_weighting` run TRL's own loss.
    """

    # TRL's fields, retold.
    padding_free: bool = _trl_field(
        "padding_free",
        "Turns on `packing` (set to False again once it has): every sequence of a batch in one row with per-sequence "
        "position ids and a block-diagonal 4D mask (sdpa or eager attention), so no pad token is computed.",
        replace=True,
    )
    max_length: int | None = _trl_field(
        "max_length",
        "Here: a row whose prompt alone fills `max_length` is dropped (as TRL does) with a warning that counts such "
        "rows, and an error when no row is left.",
    )
    precompute_ref_log_probs: bool = _trl_field(
        "precompute_ref_log_probs",
        "Here: in memory, for the datasets given to the constructor, and it needs the plain layout (no share_prompt "
        "or packing); `ref_cache` precomputes in any layout, stores the values on disk and cannot be combined with "
        "it.",
    )
    precompute_ref_batch_size: int | None = _trl_field(
        "precompute_ref_batch_size",
        "It is also the batch size of the one-time pass of `ref_cache`, where `None` means "
        "`per_device_train_batch_size` for every dataset.",
    )
    loss_type: list[str] = _trl_field(
        "loss_type",
        f"Here: {', '.join(map(repr, LOSSES))} are computed by this trainer; with any other type, {_STOCK_LOSS}",
    )
    ld_alpha: float | None = _trl_field(
        "ld_alpha", f"Here, when set: {_STOCK_LOSS} `ref_cache` is not used (the cache holds unweighted log-probs)."
    )
    f_divergence_type: str = _trl_field("f_divergence_type", f"Here, with any value but `reverse_kl`: {_STOCK_LOSS}")
    use_weighting: bool = _trl_field("use_weighting", f"Here, when True: {_STOCK_LOSS}")

    # This package's fields.

    padding_side: str = field(
        default="right",
        metadata={
            "help": "Side the preference collator pads on. Position ids follow the attention mask, so the log-probs "
            "do not depend on it.",
            "choices": list(PADDING_SIDES),
        },
    )
    displacement_margin: float = field(
        default=1.0,
        metadata={
            "help": "Warn once when the mean chosen log-prob has fallen more than this many nats below the "
            "reference's while reward accuracy rises (likelihood displacement)."
        },
    )
    save_metrics_plot: bool = field(
        default=True,
        metadata={"help": "Save metrics_history.json and metrics.png in output_dir at the end of training."},
    )

    share_prompt: bool = field(
        default=True,
        metadata={
            "help": "Run each pair as one [prompt|chosen|rejected] sequence with a block attention mask: the prompt "
            "is computed once. Same log-probs; falls back to the plain layout where the model takes no custom 4D mask."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack all sequences of a batch into one row (per-sequence position ids, block-diagonal mask): no "
            "pad token is computed. Works with share_prompt. padding_free=True turns it on."
        },
    )
    ref_cache: bool = field(
        default=False,
        metadata={
            "help": "Compute reference log-probs once, store them in ref_cache_dir (safetensors) and skip the "
            "reference forward in training. Reused across runs with the same base, data, lengths and layout."
        },
    )
    ref_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Directory of the reference cache; default: $TRL_DPO_EXT_CACHE/ref_logps."},
    )
    max_consecutive_nonfinite: int = field(
        default=3,
        metadata={
            "help": "Steps with a non-finite loss or gradient are skipped; stop with an error after this many in a "
            "row."
        },
    )

    adapter_dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype of the trainable adapter weights on a 4-bit base. float32 keeps AdamW's small updates at "
            "DPO learning rates, which TRL's bfloat16 cast rounds away; bfloat16 restores TRL's cast.",
            "choices": ["float32", "bfloat16"],
        },
    )
    save_on_preemption: bool = field(
        default=True,
        metadata={
            "help": "On SIGTERM, SIGUSR1 or a first Ctrl-C, finish the optimizer step, write a checkpoint and exit "
            "with status 75; --resume_from_checkpoint last continues it exactly. A second Ctrl-C stops at once."
        },
    )

    def __post_init__(self):
        # `not x > 0` rather than `x <= 0`: NaN fails every comparison, so this refuses it too.
        if not self.beta > 0:
            raise ValueError(f"`beta` must be > 0, got {self.beta}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"`learning_rate` must be a finite number > 0, got {self.learning_rate}.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        check_padding_side(self.padding_side)
        if self.adapter_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"`adapter_dtype` must be 'float32' or 'bfloat16', got {self.adapter_dtype!r}.")
        if self.displacement_margin < 0:
            raise ValueError(f"`displacement_margin` must be >= 0, got {self.displacement_margin}.")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError(f"`max_consecutive_nonfinite` must be >= 1, got {self.max_consecutive_nonfinite}.")
        if self.padding_free:
            # TRL 1.16 disables its own padding_free with a warning; here it is implemented, as `packing`.
            self.packing, self.padding_free = True, False
        if self.ref_cache and self.precompute_ref_log_probs:
            raise ValueError("`ref_cache` and `precompute_ref_log_probs` both precompute the reference: set one.")
        if self.ref_cache and self.sync_ref_model:
            raise ValueError("`ref_cache` needs a fixed reference, but `sync_ref_model=True` updates it.")
        super().__post_init__()
        check_output_dir(self.output_dir)


# This package's fields of `DPOConfig` and their defaults, read by `extension_setting`.
_EXTENSION_DEFAULTS = {
    f.name: f.default for f in fields(DPOConfig) if f.name not in {f.name for f in fields(trl.DPOConfig)}
}


def extension_setting(args, name: str):
    """
    `args.<name>` for a field this package adds to TRL's `DPOConfig`, or that field's default in our [`DPOConfig`]
    when `args` has no such field (a plain `trl.DPOConfig` given to the trainer, another trainer's arguments): the
    default is the one declared on the field, never restated.

    Args:
        args (`TrainingArguments`): the trainer's arguments.
        name (`str`): one of this package's `DPOConfig` fields (a `KeyError` otherwise, so a typo cannot pass).
    """
    default = _EXTENSION_DEFAULTS[name]
    return getattr(args, name, default)


def check_output_dir(output_dir: str) -> None:
    """
    Raise a `ValueError` naming `output_dir` unless it is a directory this process can write, or one it can create:
    checked on the nearest existing ancestor, so that constructing a config creates nothing, and a run that cannot
    save is refused before it computes anything.
    """
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"`output_dir` {path} is a file, not a directory: name a directory (created if missing).")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"`output_dir` {path} cannot be created: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == path else f"{existing}, where it would be created"
        raise ValueError(f"`output_dir` {path} is not writable: no permission to write in {where}.")


@dataclass
class QLoRAModelConfig(trl.ModelConfig):
    r"""
    TRL's [`~trl.ModelConfig`] with QLoRA defaults: an NF4 4-bit base with double quantization and LoRA on every
    linear layer. Policy and reference share that one base (see [`trl_dpo_ext.load_qlora_model`]).

    Parameters:
        model_name_or_path (`str`, *optional*):
            The model: see [`trl_dpo_ext.model_source`] (one default, SmolLM2-135M-Instruct, for every command).
        sft_adapter_path (`str`, *optional*):
            A LoRA adapter from a previous SFT run. DPO then trains that adapter, and the reference is a frozen copy of
            it on the same 4-bit base, not the bare base.
        bnb_4bit_compute_dtype (`str`, *optional*, defaults to `"auto"`):
            Dtype of the 4-bit matmuls: `bfloat16` on a GPU that supports it, `float32` elsewhere, when `"auto"`.
        bnb_4bit_quant_storage (`str`, *optional*):
            Storage dtype of the packed 4-bit weights (`uint8` when unset). FSDP needs every parameter in one dtype:
            set it to the compute dtype (`bfloat16`), as `recipes/accelerate/fsdp2_qlora.yaml` says.
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": MODEL_HELP})
    load_in_4bit: bool = field(
        default=True, metadata={"help": "Load the base in 4-bit (QLoRA). Policy and reference share it."}
    )
    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters on the 4-bit base."})
    use_bnb_nested_quant: bool = field(
        default=True,
        metadata={"help": "Double quantization: also quantize the 4-bit absmax constants (~0.4 bit/param)."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules to put LoRA on; 'all-linear' is every linear layer but the LM head."},
    )
    sft_adapter_path: str | None = field(
        default=None,
        metadata={
            "help": "Start from this SFT LoRA adapter: DPO trains it and the reference is a frozen copy of it on the "
            "same 4-bit base."
        },
    )
    bnb_4bit_quant_storage: str | None = field(
        default=None,
        metadata={
            "help": "Dtype the packed 4-bit weights are stored in (default uint8). FSDP shards only parameters of one "
            "dtype: set it to the compute dtype (bfloat16) there."
        },
    )
    bnb_4bit_compute_dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype of the 4-bit matmuls; 'auto' is bfloat16 on a GPU that supports it, float32 elsewhere.",
            "choices": list(COMPUTE_DTYPES),
        },
    )

    def __post_init__(self):
        if not self.load_in_4bit or not self.use_peft:
            raise ValueError(
                "QLoRAModelConfig needs `load_in_4bit=True` and `use_peft=True`: the policy is LoRA on a 4-bit base "
                "and the reference is that same base. Use trl.ModelConfig for other setups."
            )
        check_storage_dtype(self.bnb_4bit_quant_storage)
        check_compute_dtype(self.bnb_4bit_compute_dtype)
        if self.bnb_4bit_quant_type != "nf4":
            raise ValueError(f"`bnb_4bit_quant_type` must be 'nf4' for QLoRA, got {self.bnb_4bit_quant_type!r}.")
        super().__post_init__()


def device_defaults() -> dict[str, bool]:
    """
    Parser defaults for the machine at hand. TRL defaults to `bf16=True, gradient_checkpointing=True`, right on a GPU;
    without CUDA both make a step several times slower for no memory that matters, so they default to off there, and
    so does `dataloader_pin_memory` (pinning needs an accelerator; torch warns on every dataloader otherwise). A value
    in the YAML config or on the command line still wins.
    """
    import torch

    return {} if torch.cuda.is_available() else dict(CPU_DEFAULTS)


CPU_DEFAULTS = {"bf16": False, "gradient_checkpointing": False, "dataloader_pin_memory": False}
