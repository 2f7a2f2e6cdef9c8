"""trl_dpo_ext: Direct Preference Optimization on one consumer GPU, as a TRL plugin.

One 4-bit NF4 base is shared by the policy (base + LoRA) and the reference (the same base with adapters off, or a
frozen SFT adapter). See README.md.
"""

import importlib


__version__ = "0.1.0"

# Public name -> submodule. The names are imported on first use (PEP 562), not here: importing the package (which
# `trl-dpo-ext --help` does) then costs no torch, transformers or TRL import.
_EXPORTS = {
    "DPOConfig": "config",
    "DPOTrainer": "trainer",
    "DisplacementAlarmCallback": "metrics",
    "ImplicitReward": "implicit_reward",
    "IterativeDPOConfig": "iterative",
    "IterativeDPOTrainer": "iterative",
    "LOSSES": "losses",
    "MetricsHistoryCallback": "metrics",
    "PreferenceCollator": "collator",
    "QLoRAModelConfig": "config",
    "ThroughputCallback": "metrics",
    "add_metric_callbacks": "metrics",
    "build_preference_pairs": "pairs",
    "available_trainers": "registry",
    "get_trainer": "registry",
    "load_preference_dataset": "preference_data",
    "load_qlora_model": "models",
    "merge_adapter": "export",
    "preference_accuracy": "metrics",
    "reward_margins": "implicit_reward",
    "to_conversational": "preference_data",
    "validate_preference_dataset": "preference_data",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
