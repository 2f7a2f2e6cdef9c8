"""Dataclass configs. Every field is a `TrlParser` flag and a YAML key; validation lives in `__post_init__`."""

from dataclasses import dataclass, field

import trl


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
    """

    padding_side: str = field(
        default="right",
        metadata={
            "help": "Side the preference collator pads on. Position ids follow the attention mask, so the log-probs "
            "do not depend on it.",
            "choices": ["right", "left"],
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

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"`padding_side` must be 'right' or 'left', got {self.padding_side!r}.")
        if self.displacement_margin < 0:
            raise ValueError(f"`displacement_margin` must be >= 0, got {self.displacement_margin}.")
        super().__post_init__()


@dataclass
class QLoRAModelConfig(trl.ModelConfig):
    r"""
    TRL's [`~trl.ModelConfig`] with QLoRA defaults: an NF4 4-bit base with double quantization and LoRA on every
    linear layer. Policy and reference share that one base (see [`trl_dpo_ext.load_qlora_model`]).

    Parameters:
        sft_adapter_path (`str`, *optional*):
            A LoRA adapter from a previous SFT run. DPO then trains that adapter, and the reference is a frozen copy of
            it on the same 4-bit base, not the bare base.
        bnb_4bit_compute_dtype (`str`, *optional*, defaults to `"auto"`):
            Dtype of the 4-bit matmuls: `bfloat16` on a GPU that supports it, `float32` elsewhere, when `"auto"`.
    """

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
    bnb_4bit_compute_dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype of the 4-bit matmuls; 'auto' is bfloat16 on a GPU that supports it, float32 elsewhere.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )

    def __post_init__(self):
        if not self.load_in_4bit or not self.use_peft:
            raise ValueError(
                "QLoRAModelConfig needs `load_in_4bit=True` and `use_peft=True`: the policy is LoRA on a 4-bit base "
                "and the reference is that same base. Use trl.ModelConfig for other setups."
            )
        if self.bnb_4bit_quant_type != "nf4":
            raise ValueError(f"`bnb_4bit_quant_type` must be 'nf4' for QLoRA, got {self.bnb_4bit_quant_type!r}.")
        super().__post_init__()


@dataclass
class RecipeArguments:
    """Recipe-only settings (not trainer settings)."""

    heldout_pairs: int = field(
        default=200,
        metadata={
            "help": "Pairs of the test split whose implicit-reward accuracy is measured before and after training; "
            "0 skips the measurement."
        },
    )


def device_defaults() -> dict[str, bool]:
    """
    Parser defaults for the machine at hand. TRL defaults to `bf16=True, gradient_checkpointing=True`, right on a GPU;
    without CUDA both make a step several times slower for no memory that matters, so they default to off there. A
    value in the YAML config or on the command line still wins.
    """
    import torch

    return {} if torch.cuda.is_available() else {"bf16": False, "gradient_checkpointing": False}
