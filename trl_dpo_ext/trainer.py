"""`trl_dpo_ext.DPOTrainer`: TRL's `DPOTrainer` with the loss, the reference and the metrics wired to this package.

TRL runs the loop, the data preparation, checkpointing and logging. This subclass overrides a few hooks:

- `_prepare_dataset`: validate rows first (errors name the column and row), never drop rows silently, and keep each
  row's index so errors can name it;
- `_compute_loss`: policy log-probs (`logps.py`), reference log-probs (adapters off on the same 4-bit base, the
  frozen SFT adapter, or the on-disk cache), the loss (`losses.py`) and the metrics (`metrics.py`), each a pure
  function;
- `create_optimizer` / `training_step`: a step with a non-finite loss or gradient is skipped (`nonfinite.py`);
- `train` / `_load_from_checkpoint`: resume only from a completely written checkpoint (`checkpoints.py`), in the
  dtypes the interrupted run trained in; on a stop signal, save a checkpoint and raise `Preempted` (`preemption.py`);
- `save_model` / `_save_checkpoint`: on a full disk, no half-written adapter or checkpoint is left and the error
  names it (`DiskFullError`);
- `__init__` tail: one reference only — no redundant adapter copy (what the reference is: `reference.py`) — the
  layout (chosen by `layout.choose_layout`; reported from the collator that runs), the reference cache
  (`refcache.py`) and the metric callbacks.
"""

import contextlib
import logging
import warnings
from pathlib import Path

import torch
import trl
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.trainer.utils import get_config_model_id

from .atomic import apply_umask_permissions, is_disk_full, removed_on_full_disk
from .checkpoints import INCOMPLETE_DIR, discard_failed_save, newest_complete, resolve_resume
from .collator import INDEX_COLUMN, PreferenceCollator
from .config import DPOConfig, extension_setting
from .errors import DiskFullError
from .launch import check_accelerator
from .layout import choose_layout, layout_configs
from .logps import NON_MODEL_KEYS, TokenLogps, completion_token_logps
from .losses import LOSSES, preference_loss
from .metrics import (
    DisplacementAlarmCallback,
    MetricsHistoryCallback,
    ThroughputCallback,
    add_metric_callbacks,
    kl_terms,
    reward_metrics,
)
from .model_card import extend_model_card, save_model_card, save_model_files
from .models import base_model, cast_adapter_weights, keep_fp32_cpu_kernels, safe_pad_id, upcast_adapter_weights
from .nonfinite import NonFiniteGuard
from .preemption import PreemptionCallback
from .preference_data import validate_preference_dataset
from .refcache import CACHE_COLUMNS, reference_cache_usable, with_reference_cache
from .reference import Reference, drop_identity_copy
from .saved_run import check_saved_adapter


logger = logging.getLogger(__name__)


def _not_saved_by_save_model(name: str) -> bool:
    """Subdirectories of an output_dir that a final `save_model` never writes in: checkpoints, complete or not, and
    transformers' default logging dir (a tracker may append there meanwhile)."""
    return name in (INCOMPLETE_DIR, "runs") or name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")


# What TRL's own `_compute_loss` reads from a batch besides the model inputs.
_STOCK_BATCH_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


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
        if args is None:  # TRL would build its own DPOConfig, without this package's fields
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = DPOConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-DPO")
        # A model given by name is loaded by TRL (with `peft_config`, TRL adds a fresh adapter and no "ref" copy).
        given_peft = not isinstance(model, str) and is_peft_model(model)
        copies_adapter = given_peft and ref_model is None and kwargs.get("peft_config") is None
        if args.accelerator_config.dispatch_batches:
            logger.warning("dispatch_batches=True is turned off: it would split this trainer's batches wrongly.")
        # Why: accelerate's batch dispatch (its default for an IterableDataset, e.g. one passed to `evaluate`) slices
        # every batch tensor to the first one's length, but a preference batch holds tensors of B and 2B rows (and
        # the layouts of fewer): each process fetches its own batches instead, as TRL does for an iterable train set.
        args.accelerator_config.dispatch_batches = False
        super().__init__(model, ref_model, args, data_collator, *pargs, **kwargs)
        check_accelerator(self.accelerator, self.args)  # accelerate drops an FSDP/DeepSpeed it cannot set up silently
        if copies_adapter:
            drop_identity_copy(self.model)
        # Why: on an AVX512-BF16 CPU, bitsandbytes would run eval-mode passes (the reference cache, evaluation) in bf16
        # while training runs in fp32, so π_ref would differ from the starting π.
        for m in (self.model, self.ref_model):
            if m is not None:
                keep_fp32_cpu_kernels(m)
        # Why: TRL casts a 4-bit base's trainable adapter to bf16, where AdamW's updates at DPO learning rates are
        # rounded away (issue #16: 6.4 % of lora_A entries move at lr 5e-6); fp32 masters keep every update.
        if extension_setting(args, "adapter_dtype") == "float32":
            upcast_adapter_weights(self.model)
        self.reference = Reference.of(self.model, self.ref_model)
        self._stock_loss_reasons = self._reasons_for_stock_loss()
        if self._stock_loss_reasons:
            logger.warning("Using stock TRL's loss because %s.", "; ".join(self._stock_loss_reasons))
        self.data_collator = self._layout_collator(args, data_collator)
        # Decided once: a later train set (`set_train_dataset`) is cached, or not, like this one.
        self._uses_ref_cache = extension_setting(args, "ref_cache") and reference_cache_usable(self.ld_alpha)
        if self._uses_ref_cache:
            self.train_dataset = with_reference_cache(self, self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: with_reference_cache(self, v, k) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = with_reference_cache(self, self.eval_dataset, "eval")
        self.nonfinite_guard = NonFiniteGuard(extension_setting(args, "max_consecutive_nonfinite"), self.accelerator)
        add_metric_callbacks(
            self,
            [
                ThroughputCallback(),
                DisplacementAlarmCallback(extension_setting(args, "displacement_margin")),
                self.nonfinite_guard,
                MetricsHistoryCallback(),
            ],
        )
        self.preemption = (
            PreemptionCallback(self.accelerator) if extension_setting(args, "save_on_preemption") else None
        )
        if self.preemption is not None:
            self.add_callback(self.preemption)

    @property
    def share_prompt(self) -> bool:
        """Whether batches run as `[prompt│chosen│rejected]` rows: read from the collator that runs, never assumed."""
        return bool(getattr(self.data_collator, "share_prompt", False))

    @property
    def packing(self) -> bool:
        """Whether a batch's sequences run packed in one row: read from the collator that runs."""
        return bool(getattr(self.data_collator, "packing", False))

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

    def _layout_collator(self, args, data_collator):
        """
        The collator that runs. Without one from the caller, ours is built with the layout the config asks for, or the
        plain one (with the logged reason) where the models or an option cannot take it; see
        [`trl_dpo_ext.layout.choose_layout`]. On rows with images that is TRL's vision collator, built by TRL's
        constructor. A caller's collator runs as given, so the layout reported and keyed on is its own; one that asks
        for a layout this trainer cannot run is refused.
        """
        if data_collator is not None:
            asked = [bool(getattr(data_collator, name, False)) for name in ("share_prompt", "packing")]
        else:
            asked = [extension_setting(args, name) for name in ("share_prompt", "packing")]
        models = [self.accelerator.unwrap_model(self.model)] + ([self.ref_model] if self.ref_model is not None else [])
        layout = choose_layout(
            *asked,
            *layout_configs(models),
            stock_loss=bool(self._stock_loss_reasons),
            precompute_ref_log_probs=args.precompute_ref_log_probs,
            compute_metrics=self.compute_metrics is not None,
            vision_inputs=self._is_vision_dataset,
        )
        if data_collator is not None:
            if layout.reasons:
                raise ValueError(
                    f"The data collator asks for {' + '.join(layout.refused)}, which this trainer cannot run because "
                    f"{'; '.join(layout.reasons)}. Pass a collator with share_prompt=False and packing=False, or none."
                )
            return data_collator
        if layout.reasons:
            logger.warning(layout.fallback_message())
        if self._is_vision_dataset:
            return self.data_collator  # TRL's DataCollatorForVisionPreference: the processor runs per batch
        return PreferenceCollator(
            pad_token_id=safe_pad_id(self._tokenizer, base_model(self.model)),
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            pad_to_multiple_of=args.pad_to_multiple_of,
            padding_side=extension_setting(args, "padding_side"),
            share_prompt=layout.share_prompt,
            packing=layout.packing,
        )

    def _set_signature_columns_if_needed(self):
        # Why: the Trainer drops dataset columns that are not in the signature; keep the cached reference columns
        # and the row index.
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *CACHE_COLUMNS, INDEX_COLUMN]

    def set_train_dataset(self, dataset: Dataset) -> None:
        """
        Train on `dataset` from the next `train()` on, prepared as the constructor prepares its train set (validated,
        tokenized, with the reference cache under `ref_cache`): how iterative DPO brings in each round's pairs while
        the model and its reference stay as they are.
        """
        if self.args.precompute_ref_log_probs:
            raise ValueError("precompute_ref_log_probs covers the constructor's dataset only; use ref_cache=True.")
        dataset = self._prepare_dataset(dataset, self.processing_class, self.args, "train")
        if self._uses_ref_cache:
            dataset = with_reference_cache(self, dataset, "train")
        self.train_dataset = dataset

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """
        [`transformers.Trainer.train`], resuming only from a completely written checkpoint: `True` or `"last"` picks
        the newest complete one in `output_dir` (or starts fresh if there is none); see
        [`trl_dpo_ext.checkpoints.resolve_resume`].

        Raises:
            [`trl_dpo_ext.errors.Preempted`]: with `save_on_preemption`, training stopped on SIGTERM, SIGUSR1 or a
                first Ctrl-C after writing a checkpoint (see [`trl_dpo_ext.preemption`]).
        """
        # The main process moves incomplete checkpoints aside first; the others then find the same complete one.
        with self.accelerator.main_process_first():
            resume = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if self.preemption is None:
            return super().train(resume_from_checkpoint=resume, **kwargs)
        try:
            output = super().train(resume_from_checkpoint=resume, **kwargs)
        finally:
            self.preemption.restore()  # also when training fails: a swallowed SIGTERM would outlive it
        self.preemption.raise_if_preempted()
        return output

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Why: peft upcasts a loaded adapter to fp32, but a run with `adapter_dtype="bfloat16"` trains it in bf16; a
        # resumed run must continue in the dtypes the interrupted one trained in, or it computes something else.
        target = model if model is not None else self.model
        dtypes = {name: p.dtype for name, p in target.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for dtype in set(dtypes.values()):
            cast_adapter_weights(target, dtype, names={name for name, d in dtypes.items() if d == dtype})

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
            return self._stock_compute_loss(model, inputs, return_outputs)
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

    def _stock_compute_loss(self, model, inputs, return_outputs):
        """TRL's `_compute_loss` on a plain-layout batch: only model inputs and the keys TRL reads reach it, and cached
        reference log-probs stand in for TRL's reference forward (as its own precomputed ones would)."""
        cached = "ref_token_logps" in inputs and "ref_chosen_logps" not in inputs
        sums = self.reference.token_logps(model, inputs).sequence_logps() if cached else None
        inputs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS or k in _STOCK_BATCH_KEYS}
        if not cached:
            return super()._compute_loss(model, inputs, return_outputs)
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = sums.chunk(2)
        # TRL reads the batch's reference values when `precompute_ref_logps` is set, as for its own precompute.
        stock_flag, self.precompute_ref_logps = self.precompute_ref_logps, True
        try:
            return super()._compute_loss(model, inputs, return_outputs)
        finally:
            self.precompute_ref_logps = stock_flag

    def _reference_token_logps(self, inputs: dict[str, torch.Tensor]) -> TokenLogps:
        """Reference log-probs of a batch: see [`trl_dpo_ext.reference.Reference.token_logps`]."""
        return self.reference.token_logps(self.model, inputs, self.args.gradient_checkpointing_kwargs)

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

        Raises:
            [`trl_dpo_ext.errors.DiskFullError`]: the disk filled up; the files this save wrote are removed (a final
                save), or the checkpoint is (see `_save_checkpoint`).
        """
        target = output_dir or self.args.output_dir
        final = not _internal_call and self.args.should_save
        # Why: transformers and peft write the adapter in place; on a full disk a half-written adapter must not stay
        # where `merge`, `score` or `from_pretrained` would load it.
        guard = removed_on_full_disk(target, self._final_save_advice(), _not_saved_by_save_model) if final else None
        with guard or contextlib.nullcontext():
            super().save_model(output_dir, _internal_call)
            if self.args.should_save and self._saves_adapter_weights():
                # Why: a sharded save can write an empty or partial adapter without an error (FSDP1 with peft 0.21).
                check_saved_adapter(self.accelerator.unwrap_model(self.model), target)
            save_model_files(self, target, final=False)
        if not _internal_call:
            # Apart: a full disk at the card leaves the complete adapter saved above in place.
            save_model_card(self, target, dataset_name=dataset_name)
        if self.is_world_process_zero():
            # Why: safetensors writes weights through a private (0600) temp file, whatever the umask; a checkpoint's
            # save comes through here too.
            apply_umask_permissions(target)

    def _final_save_advice(self) -> str:
        last = newest_complete(self.args.output_dir)
        if last is None:
            return "the final save did not finish, and there is no complete checkpoint to resume from."
        return (
            f"the final save did not finish. The newest complete checkpoint, {last}, is intact: free space and run "
            "again with `--resume_from_checkpoint last` to save from there."
        )

    def _save_checkpoint(self, model, trial):
        # Why: transformers writes a checkpoint in place, `trainer_state.json` last; on a full disk the half-written
        # one (never complete: it lacks a whole `trainer_state.json`) is taken out of the way, giving its space back,
        # and the error names it and the newest complete one, which stays as it was.
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        created = not folder.exists()
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            if not is_disk_full(error, folder):
                raise
            done = discard_failed_save(folder, created) if self.args.should_save else "it is incomplete"
            failed = getattr(error, "path", None) or getattr(error, "filename", None)
            last = newest_complete(run_dir)
            advice = (
                f"The newest complete checkpoint, {last}, is intact: free space and run the same command with "
                "`--resume_from_checkpoint last` to continue from it."
                if last is not None
                else "There is no complete checkpoint: free space and start again."
            )
            at = f" ({failed})" if failed else ""
            raise DiskFullError(folder, f"the checkpoint was not saved{at}; {done}. {advice}") from error

    def _saves_adapter_weights(self) -> bool:
        """Whether `save_model` writes the adapter file: for a PEFT model, except under FSDP with a sharded state dict
        (transformers then saves weights only in the checkpoint's shards)."""
        if not is_peft_model(self.accelerator.unwrap_model(self.model)):
            return False
        return not self.is_fsdp_enabled or "FULL_STATE_DICT" in str(self.accelerator.state.fsdp_plugin.state_dict_type)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None) -> None:
        """TRL's model card in `args.output_dir`, extended by [`trl_dpo_ext.model_card.extend_model_card`]."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            extend_model_card(self, self.args.output_dir, dataset_name)
