"""trl_dpo_ext: Direct Preference Optimization on one consumer GPU, as a TRL plugin.

One 4-bit NF4 base is shared by the policy (base + LoRA) and the reference (the same base with adapters off, or a
frozen SFT adapter). See README.md.
"""

from .collator import PreferenceCollator
from .config import DPOConfig, QLoRAModelConfig
from .data import load_preference_dataset, to_conversational, validate_preference_dataset
from .export import merge_adapter
from .implicit_reward import ImplicitReward
from .losses import LOSSES
from .metrics import DisplacementAlarmCallback, MetricsHistoryCallback, ThroughputCallback, add_metric_callbacks
from .models import load_qlora_model
from .pairs import build_preference_pairs
from .registry import available_trainers, get_trainer
from .reward import preference_accuracy, reward_margins
from .trainer import DPOTrainer


__version__ = "0.1.0"

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "DisplacementAlarmCallback",
    "ImplicitReward",
    "LOSSES",
    "MetricsHistoryCallback",
    "PreferenceCollator",
    "QLoRAModelConfig",
    "ThroughputCallback",
    "add_metric_callbacks",
    "build_preference_pairs",
    "available_trainers",
    "get_trainer",
    "load_preference_dataset",
    "load_qlora_model",
    "merge_adapter",
    "preference_accuracy",
    "reward_margins",
    "to_conversational",
    "validate_preference_dataset",
]
