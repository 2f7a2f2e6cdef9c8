"""`trl_dpo_ext.DPOTrainer`: TRL's `DPOTrainer` with the loss, the reference and the metrics wired to this package.

TRL runs the loop, the data preparation, checkpointing and logging. This subclass overrides three hooks:

- `_prepare_dataset`: validate rows first (errors name the column and row) and never drop rows silently;
- `_compute_loss`: policy log-probs (`logps.py`), reference log-probs (adapters off on the same 4-bit base, or the
  frozen SFT adapter), the loss (`losses.py`) and the metrics (`metrics.py`), each a pure function;
- `__init__` tail: one reference only — no redundant adapter copy — and the metric callbacks.
"""

import contextlib
import logging
import warnings

import torch
import trl
from accelerate.utils import is_peft_model
from datasets import Dataset
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from .collator import PreferenceCollator
from .config import DPOConfig
from .data import validate_preference_dataset
from .logps import TokenLogps, completion_token_logps
from .losses import LOSSES, preference_loss
from .metrics import (
    DisplacementAlarmCallback,
    MetricsHistoryCallback,
    ThroughputCallback,
    add_metric_callbacks,
    kl_estimate,
    reward_metrics,
)
from .models import is_identity_adapter


logger = logging.getLogger(__name__)

# The private TRL hooks this trainer overrides or calls; `tests/test_trl_hooks.py` fails loudly if one disappears.
TRL_HOOKS = {
    "_compute_loss": ("self", "model", "inputs", "return_outputs"),
    "_prepare_dataset": ("self", "dataset", "processing_class", "args", "dataset_name"),
}


class DPOTrainer(trl.DPOTrainer):
    """
    Drop-in replacement for [`trl.DPOTrainer`] (same constructor) for QLoRA on one GPU: pass the [`peft.PeftModel`]
    from [`trl_dpo_ext.load_qlora_model`] and the reference is the same 4-bit base with adapters off (or a frozen copy
    of an SFT adapter), so no second copy of the base is ever loaded.

    On top of TRL's metrics it logs `logps/ref_chosen`, `logps/ref_rejected`, `kl` (see
    [`trl_dpo_ext.metrics.kl_estimate`]), `displacement`, `tokens_per_second` and `memory/peak_mib`, warns once on
    likelihood displacement, and saves the metric history and a plot in `output_dir` when training ends.
    """

    _tag_names = ["trl", "dpo", "qlora", "trl_dpo_ext"]

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator=None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = DPOConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-DPO")
        copies_adapter = is_peft_model(model) and ref_model is None and kwargs.get("peft_config") is None
        super().__init__(model, ref_model, args, data_collator, *pargs, **kwargs)
        if copies_adapter:
            self._drop_identity_ref_adapter()
        if data_collator is None and not self._is_vision_dataset:
            self.data_collator = PreferenceCollator(
                pad_token_id=self.data_collator.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
                padding_side=getattr(args, "padding_side", "right"),
            )
        self._stock_loss_reasons = self._reasons_for_stock_loss()
        if self._stock_loss_reasons:
            logger.warning("Using stock TRL's loss because %s.", "; ".join(self._stock_loss_reasons))
        add_metric_callbacks(
            self,
            [
                ThroughputCallback(),
                DisplacementAlarmCallback(getattr(args, "displacement_margin", 1.0)),
                MetricsHistoryCallback(),
            ],
        )

    def _drop_identity_ref_adapter(self) -> None:
        # Why: TRL copies a PeftModel's adapter into a frozen "ref" adapter. For a fresh LoRA (B = 0) that copy
        # computes the bare base, so drop it and take the reference with adapters off; an SFT adapter keeps its copy.
        model = self.accelerator.unwrap_model(self.model)
        if "ref" in model.peft_config and is_identity_adapter(model, "default"):
            model.delete_adapter("ref")
            model.set_adapter("default")
        for name, param in model.named_parameters():
            if ".ref." in name:
                param.requires_grad_(False)

    def _reasons_for_stock_loss(self) -> list[str]:
        checks = [
            (not set(self.loss_types) <= LOSSES.keys(), f"loss_type {self.loss_types} is not among {sorted(LOSSES)}"),
            (self.ld_alpha is not None, "ld_alpha is set"),
            (self.f_divergence_type != "reverse_kl", f"f_divergence_type is {self.f_divergence_type!r}"),
            (self.use_weighting, "use_weighting is on"),
            (self.aux_loss_enabled, "the model has a MoE auxiliary loss"),
            (self._is_vision_dataset, "the dataset is vision-language"),
        ]
        return [reason for failed, reason in checks if failed]

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Why: bad rows must fail before training with the column and row named, and TRL's silent drop of rows whose
        # prompt fills `max_length` must be counted and reported (an empty dataset is an error, not a no-op run).
        sized = isinstance(dataset, Dataset)
        if sized and "prompt_ids" not in dataset.column_names:
            validate_preference_dataset(dataset, dataset_name)
        before = len(dataset) if sized else None
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if before is not None and len(prepared) < before:
            dropped = before - len(prepared)
            message = (
                f"{dataset_name} dataset: {dropped} of {before} rows dropped because their prompt alone is at least "
                f"max_length={args.max_length} tokens (no completion token would be left)."
            )
            if len(prepared) == 0:
                raise ValueError(message + " No rows are left: raise max_length or shorten the prompts.")
            warnings.warn(message, stacklevel=2)
        return prepared

    def _compute_loss(self, model, inputs, return_outputs):
        # Why: one path for policy, reference, loss and metrics that later layouts and reference sources plug into;
        # TRL's own path for the options this package does not compute itself.
        if return_outputs or self._stock_loss_reasons:
            return super()._compute_loss(model, inputs, return_outputs)
        policy = completion_token_logps(model, inputs)
        chosen_logps, rejected_logps = policy.sequence_logps().chunk(2)
        reference = None
        if "ref_chosen_logps" in inputs:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            reference = self._reference_token_logps(inputs)
            ref_chosen_logps, ref_rejected_logps = reference.sequence_logps().chunk(2)
        chosen_lengths, rejected_lengths = policy.lengths().chunk(2)
        loss = preference_loss(
            self.loss_types,
            self.loss_weights,
            chosen_logps - ref_chosen_logps,
            rejected_logps - ref_rejected_logps,
            chosen_lengths,
            rejected_lengths,
            self.beta,
        )
        per_pair = reward_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, self.beta)
        if reference is not None:
            chosen_mask = policy.mask.chunk(2)[0]
            per_pair["kl"] = kl_estimate(policy.logps.chunk(2)[0], reference.logps.chunk(2)[0], chosen_mask)
        self._record_metrics(inputs, policy, per_pair)
        return loss

    def _reference_token_logps(self, inputs: dict[str, torch.Tensor]) -> TokenLogps:
        """Reference log-probs: `ref_model` if given, else the policy with adapters off (or the frozen "ref" one)."""
        adapter = contextlib.nullcontext()
        model = self.ref_model
        if model is None:
            model = self.model
            unwrapped = self.accelerator.unwrap_model(self.model)
            if is_peft_model(unwrapped):
                adapter = use_adapter(unwrapped, "ref" if "ref" in unwrapped.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter,
        ):
            return completion_token_logps(model, inputs)

    def _record_metrics(self, inputs: dict[str, torch.Tensor], policy: TokenLogps, per_pair: dict) -> None:
        """Gather across processes, then average: the same metric names and definitions as `trl.DPOTrainer`."""
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        for name, values in per_pair.items():
            metrics[name].append(gather(values).float().mean().item())

        def token_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
            total, count = gather((values * mask).sum().float()).sum(), gather(mask.sum().float()).sum()
            return (total / count).item() if count > 0 else 0.0

        mask = policy.mask
        chosen_mask, rejected_mask = mask.chunk(2)
        metrics["entropy"].append(token_mean(policy.entropy.detach(), mask))
        chosen_logits, rejected_logits = policy.mean_logits.detach().chunk(2)
        metrics["logits/chosen"].append(token_mean(chosen_logits, chosen_mask))
        metrics["logits/rejected"].append(token_mean(rejected_logits, rejected_mask))
        metrics["mean_token_accuracy"].append(token_mean(policy.is_top1.chunk(2)[0].float(), chosen_mask))
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
