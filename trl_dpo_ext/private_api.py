"""Every non-public name of TRL and transformers this package touches, listed once.

An upgrade of TRL or transformers that renames, removes or reshapes one of them fails `tests/test_trl_hooks.py` with
the name in the test id, instead of deep in a training run. The same test scans the package for uses of underscore
names it does not define itself, so a new one cannot be used without being listed here.
"""

# `trl.DPOTrainer` methods this package overrides or calls, with their parameter names.
TRL_HOOKS = {
    "_compute_loss": ("self", "model", "inputs", "return_outputs"),
    "_prepare_dataset": ("self", "dataset", "processing_class", "args", "dataset_name"),
    "_set_signature_columns_if_needed": ("self",),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
}
# Attributes `trl.DPOTrainer.__init__` sets that this package reads (`precompute_ref_logps` is also what TRL's
# `_compute_loss` reads to take the reference log-probs from the batch).
TRL_ATTRIBUTES = (
    "_metrics",
    "_total_train_tokens",
    "_tp_size",
    "_is_vision_dataset",
    "_tokenizer",
    "loss_types",
    "loss_weights",
    "precompute_ref_logps",
    "ld_alpha",
    "f_divergence_type",
    "use_weighting",
    "aux_loss_enabled",
)
# Helpers imported from TRL modules that are not its top-level API.
TRL_HELPERS = {
    "trl.trainer.utils": ("add_fused_lm_head", "use_adapter", "get_config_model_id"),
    "trl.models.utils": ("disable_gradient_checkpointing",),
    "trl.trainer.dpo_trainer": ("DataCollatorForPreference",),
    "trl.experimental.utils": ("get_reward",),
    "trl.data_utils": ("extract_prompt",),
}
# Per-token fields of the output of TRL's fused LM head (`add_fused_lm_head`) this package reads.
FUSED_HEAD_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
# What `logps._answer_positions_only` relies on in that fused forward (public names, unlisted behaviour; guarded by
# `test_fused_lm_head_scores_the_backbone_output_it_is_given`): it projects the `last_hidden_state` of the patched
# model's `base_model` (the backbone), and scores `shift_labels`, when given, one label per position, unshifted.
# The adapter name `trl.DPOTrainer.__init__` gives the frozen copy of a pretrained adapter (`reference.py`).
TRL_REFERENCE_ADAPTER = "ref"
# `transformers.Trainer` internals: methods (with the parameters we pass) and attributes.
TRANSFORMERS_TRAINER_METHODS = {
    "_prepare_inputs": ("self", "inputs"),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
    "save_model": ("self", "output_dir", "_internal_call"),
    "_save_checkpoint": ("self", "model", "trial"),
    "_get_output_dir": ("self", "trial"),
}
TRANSFORMERS_TRAINER_ATTRIBUTES = ("_signature_columns",)
# `PretrainedConfig` attributes: the attention kernel.
TRANSFORMERS_CONFIG_ATTRIBUTES = ("_attn_implementation",)

# bitsandbytes: the per-layer switch `Linear4bit.forward` reads to repack its weights for a bf16 CPU kernel in eval
# mode (`models.keep_fp32_cpu_kernels` turns it off for fp32 compute).
BITSANDBYTES_ATTRIBUTES = ("support_avx512bf16_for_cpu",)

# argparse (standard library) internals the recipe's parser reads to group `--help` by package (`train.py`).
ARGPARSE_ATTRIBUTES = ("_actions", "_action_groups", "_group_actions")

# Every underscore name above: what the package-wide scan accepts.
PRIVATE_NAMES = frozenset(
    {name for name in (*TRL_HOOKS, *TRL_ATTRIBUTES, *TRANSFORMERS_TRAINER_METHODS) if name.startswith("_")}
    | {"_internal_call", *TRANSFORMERS_TRAINER_ATTRIBUTES, *TRANSFORMERS_CONFIG_ATTRIBUTES, *ARGPARSE_ATTRIBUTES}
)
