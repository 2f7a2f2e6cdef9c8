"""`trl_dpo_ext.DPOTrainer`: TRL's `DPOTrainer` with the loss, the reference and the metrics wired to this package.

TRL runs the loop, the data preparation, checkpointing and logging. This subclass overrides a few hooks:

- `_prepare_dataset`: validate rows first (errors name the column and row), never drop rows silently, and keep each
  row's index so errors can name it;
- `_compute_loss`: policy log-probs (`logps.py`), reference log-probs (adapters off on the same 4-bit base, the
  frozen SFT adapter, or the on-disk cache), the loss (`losses.py`) and the metrics (`metrics.py`), each a pure
  function;
- `create_optimizer` / `training_step`: a step with a non-finite loss or gradient is skipped (`nonfinite.py`);
- `train` / `_load_from_checkpoint`: resume only from a completely written checkpoint (`checkpoints.py`), in the
  dtypes the interrupted run trained in;
- `__init__` tail: one reference only — no redundant adapter copy — the reference cache and the metric callbacks.
"""

import contextlib
import logging
import warnings

import torch
import trl
from accelerate.utils import is_peft_model
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from .checkpoints import resolve_resume
from .collator import INDEX_COLUMN, PreferenceCollator
from .config import DPOConfig
from .data import validate_preference_dataset
from .defaults import cache_dir
from .layout import unsupported_reasons
from .logps import TokenLogps, cached_reference_logps, completion_token_logps
from .losses import LOSSES, preference_loss
from .metrics import (
    DisplacementAlarmCallback,
    MetricsHistoryCallback,
    ThroughputCallback,
    add_metric_callbacks,
    kl_terms,
    reward_metrics,
)
from .model_card import extend_model_card, save_model_files
from .models import base_model, is_identity_adapter
from .nonfinite import NonFiniteGuard
from .refcache import (
    CACHE_COLUMNS,
    cache_key,
    cache_path,
    load_reference_cache,
    save_reference_cache,
    weights_fingerprint,
)


logger = logging.getLogger(__name__)

# The private TRL hooks this trainer overrides or calls; `tests/test_trl_hooks.py` fails loudly if one disappears.
TRL_HOOKS = {
    "_compute_loss": ("self", "model", "inputs", "return_outputs"),
    "_prepare_dataset": ("self", "dataset", "processing_class", "args", "dataset_name"),
    "_set_signature_columns_if_needed": ("self",),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
}


class DPOTrainer(trl.DPOTrainer):
    """
    Drop-in replacement for [`trl.DPOTrainer`] (same constructor) for QLoRA on one GPU: pass the [`peft.PeftModel`]
    from [`trl_dpo_ext.load_qlora_model`] and the reference is the same 4-bit base with adapters off (or a frozen copy
    of an SFT adapter), so no second copy of the base is ever loaded.

    On top of TRL's metrics it logs `logps/ref_chosen`, `logps/ref_rejected`, `kl` (see
    [`trl_dpo_ext.metrics.kl_terms`]), `displacement`, `tokens_per_second` and `memory/peak_mib`, warns once on
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
        self._stock_loss_reasons = self._reasons_for_stock_loss()
        if self._stock_loss_reasons:
            logger.warning("Using stock TRL's loss because %s.", "; ".join(self._stock_loss_reasons))
        self.share_prompt, self.packing = self._choose_layout(args)
        if data_collator is None and not self._is_vision_dataset:
            self.data_collator = PreferenceCollator(
                pad_token_id=self.data_collator.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
                padding_side=getattr(args, "padding_side", "right"),
                share_prompt=self.share_prompt,
                packing=self.packing,
            )
        if getattr(args, "ref_cache", False):
            self.train_dataset = self._with_reference_cache(self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._with_reference_cache(v, k) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._with_reference_cache(self.eval_dataset, "eval")
        self.nonfinite_guard = NonFiniteGuard(getattr(args, "max_consecutive_nonfinite", 3), self.accelerator)
        add_metric_callbacks(
            self,
            [
                ThroughputCallback(),
                DisplacementAlarmCallback(getattr(args, "displacement_margin", 1.0)),
                self.nonfinite_guard,
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

    def _choose_layout(self, args) -> tuple[bool, bool]:
        # Why: the shared-prompt and packed layouts need a model that takes a custom 4D mask and a loss computed
        # here; anything else runs TRL's plain layout, with the reason logged.
        wanted = {"share_prompt": getattr(args, "share_prompt", False), "packing": getattr(args, "packing", False)}
        if not any(wanted.values()):
            return False, False
        models = [self.accelerator.unwrap_model(self.model)] + ([self.ref_model] if self.ref_model is not None else [])
        reasons = [reason for m in models for reason in unsupported_reasons(base_model(m).config)]
        if self._stock_loss_reasons:
            reasons.append("stock TRL's loss reads the plain layout")
        if args.precompute_ref_log_probs:
            reasons.append("precompute_ref_log_probs runs TRL's plain-layout reference pass (use ref_cache instead)")
        if self.compute_metrics is not None:
            reasons.append("compute_metrics needs the plain layout's logits")
        if any(getattr(m, "active_peft_config", None) and m.active_peft_config.is_prompt_learning for m in models):
            reasons.append("prompt-learning adapters prepend virtual tokens")
        if reasons:
            on = [name for name, value in wanted.items() if value]
            logger.warning("Plain layout instead of %s because %s.", " + ".join(on), "; ".join(dict.fromkeys(reasons)))
            return False, False
        return wanted["share_prompt"], wanted["packing"]

    def _with_reference_cache(self, dataset, name: str):
        """`dataset` plus per-token reference log-probs as columns: read from the cache, or computed and stored."""
        if not isinstance(dataset, Dataset):
            raise ValueError(f"ref_cache needs a map-style datasets.Dataset; the {name} dataset is {type(dataset)}.")
        unwrapped = self.accelerator.unwrap_model(self.model)
        source = self.ref_model or unwrapped
        adapter = "ref" if self.ref_model is None and "ref" in getattr(unwrapped, "peft_config", {}) else None
        reference = "ref_model" if self.ref_model is not None else f"adapter:{adapter}" if adapter else "adapters_off"
        key = cache_key(
            weights_fingerprint(source, adapter),
            dataset,
            reference=reference,
            max_length=self.args.max_length,
            truncation_mode=self.args.truncation_mode,
            share_prompt=self.share_prompt,
            packing=self.packing,
            attention=base_model(source).config._attn_implementation,
        )
        path = cache_path(self.args.ref_cache_dir or cache_dir() / "ref_logps", key)
        # The main process computes and writes; the others then read the same file.
        with self.accelerator.main_process_first():
            cached = load_reference_cache(path, key)
            if cached is None:
                cached = self._reference_answer_logps(dataset, name)
                if self.accelerator.is_main_process:
                    save_reference_cache(path, key, *cached)
                    logger.info("Reference cache for the %s dataset written to %s", name, path)
            else:
                logger.info("Reference cache hit for the %s dataset: %s", name, path)
        chosen, rejected = cached
        return dataset.add_column(CACHE_COLUMNS[0], chosen).add_column(CACHE_COLUMNS[1], rejected)

    @torch.no_grad()
    def _reference_answer_logps(self, dataset: Dataset, name: str) -> tuple[list, list]:
        loader = DataLoader(
            dataset,
            batch_size=self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size,
            collate_fn=self.data_collator,
            shuffle=False,
        )
        chosen, rejected = [], []
        description = f"Reference log-probs of the {name} dataset (computed once, then cached)"
        for batch in tqdm(loader, desc=description, disable=self.args.disable_tqdm):
            with self.accelerator.autocast():
                answers = self._reference_token_logps(self._prepare_inputs(batch)).answer_values()
            chosen += answers[: len(answers) // 2]
            rejected += answers[len(answers) // 2 :]
        return chosen, rejected

    def _set_signature_columns_if_needed(self):
        # Why: the Trainer drops dataset columns that are not in the signature; keep the cached reference columns
        # and the row index.
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *CACHE_COLUMNS, INDEX_COLUMN]

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """
        [`transformers.Trainer.train`], resuming only from a completely written checkpoint: `True` or `"last"` picks
        the newest complete one in `output_dir` (or starts fresh if there is none); see
        [`trl_dpo_ext.checkpoints.resolve_resume`].
        """
        # The main process removes incomplete checkpoints first; the others then find the same complete one.
        with self.accelerator.main_process_first():
            resume = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint=resume, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Why: peft upcasts a loaded adapter to fp32, but TRL trains a QLoRA adapter in bf16; a resumed run must
        # continue in the dtypes the interrupted one trained in, or it computes something else from there on.
        target = model if model is not None else self.model
        dtypes = {name: p.dtype for name, p in target.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, param in target.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])

    def create_optimizer(self, model=None):
        # Why: the guard sits between the gradients and the weights, so a non-finite step never reaches them.
        optimizer = super().create_optimizer(model)
        return self.nonfinite_guard.wrap(optimizer)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Why: the guard needs each micro-batch's loss and dataset rows to decide on (and report) the step.
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.observe(loss, inputs.get(INDEX_COLUMN))
        return loss

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Why: bad rows must fail before training with the column and row named, and TRL's silent drop of rows whose
        # prompt fills `max_length` must be counted and reported (an empty dataset is an error, not a no-op run).
        sized = isinstance(dataset, Dataset)
        if sized:  # TRL 1.16 tokenizes every dataset, so pre-tokenized rows need their text columns too
            validate_preference_dataset(dataset, dataset_name)
        if sized and INDEX_COLUMN not in dataset.column_names:
            dataset = dataset.add_column(INDEX_COLUMN, list(range(len(dataset))))
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
        # Why: one path for policy, reference, loss and metrics, whatever the layout or the reference source; TRL's
        # own path for the options this package does not compute itself.
        if return_outputs or self._stock_loss_reasons:
            inputs = {key: value for key, value in inputs.items() if key != INDEX_COLUMN}  # not a model input
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
            per_pair["kl"] = policy.per_sequence(kl_terms(policy.logps, reference.logps)).chunk(2)[0]
        self._record_metrics(inputs, policy, per_pair)
        return loss

    def _reference_token_logps(self, inputs: dict[str, torch.Tensor]) -> TokenLogps:
        """Reference log-probs: from the cache if the batch has them, else `ref_model`, else the policy with adapters
        off (or the frozen "ref" adapter)."""
        if "ref_token_logps" in inputs:
            return cached_reference_logps(inputs)
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

        chosen_mask = policy.chosen_mask()
        metrics["entropy"].append(token_mean(policy.entropy.detach(), policy.mask))
        metrics["logits/chosen"].append(token_mean(policy.mean_logits.detach(), chosen_mask))
        metrics["logits/rejected"].append(token_mean(policy.mean_logits.detach(), policy.rejected_mask()))
        metrics["mean_token_accuracy"].append(token_mean(policy.is_top1.float(), chosen_mask))
        if mode == "train":
            # TRL's count: the tokens of the plain layout (each prompt twice), whatever layout actually ran.
            self._total_train_tokens += gather(inputs["num_tokens"].reshape(1)).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False, *, dataset_name=None) -> None:
        """
        Save as [`transformers.Trainer.save_model`] does, plus `dpo_config.json` and, for a final save (not a
        checkpoint), the model card `README.md`: see [`trl_dpo_ext.model_card.save_model_files`].

        Args:
            output_dir (`str`, *optional*): where to save; `args.output_dir` by default.
            dataset_name (`str`, *optional*): Hub id of the training data, for the model card's `datasets` field.
        """
        super().save_model(output_dir, _internal_call)
        save_model_files(self, output_dir or self.args.output_dir, final=not _internal_call, dataset_name=dataset_name)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None) -> None:
        """TRL's model card in `args.output_dir`, extended by [`trl_dpo_ext.model_card.extend_model_card`]."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            extend_model_card(self, self.args.output_dir, dataset_name)
