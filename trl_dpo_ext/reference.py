"""What the reference policy π_ref is, decided once, and how it runs.

DPO's loss and implicit reward compare the policy with a fixed reference (Rafailov et al. 2023, Eq. 7). Here the
reference is one of:

- `adapters_off`: the shared (4-bit) base with every adapter disabled — a fresh LoRA starts at B = 0, so this is the
  starting policy exactly, and no second copy of the base exists;
- `adapter:ref`: the frozen copy of a pretrained (SFT) adapter that `trl.DPOTrainer` adds under the name
  [`REFERENCE_ADAPTER`], on the same base;
- `ref_model`: a separate model (full fine-tuning, or a reference passed by the caller);
- `precomputed`: full fine-tuning with `precompute_ref_log_probs` and no `ref_model`: the reference values come with
  the data and no reference can be run.

On top of any of them, a batch that carries cached per-token reference log-probs (`ref_token_logps`, from the on-disk
cache of `refcache.py`) is read instead of running a forward. [`Reference.label`] is what the cache key records.
The trainer, [`trl_dpo_ext.ImplicitReward`], the model card and the cache all ask this module.
"""

import contextlib
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel, is_peft_model
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from .logps import TokenLogps, cached_reference_logps, completion_token_logps
from .models import is_identity_adapter
from .private_api import TRL_REFERENCE_ADAPTER


# The name `trl.DPOTrainer.__init__` gives the frozen copy of a pretrained adapter; peft saves a non-default adapter in
# a sub-directory of that name.
REFERENCE_ADAPTER = TRL_REFERENCE_ADAPTER
ADAPTERS_OFF = "adapters_off"
FROZEN_ADAPTER = f"adapter:{REFERENCE_ADAPTER}"
REF_MODEL = "ref_model"
PRECOMPUTED = "precomputed"
_DESCRIPTIONS = {
    ADAPTERS_OFF: "the same base with the adapter switched off",
    FROZEN_ADAPTER: "a frozen copy of the starting SFT adapter on the same base",
    REF_MODEL: "a separate reference model",
    PRECOMPUTED: "reference log-probs precomputed from the starting model",
}


@dataclass(frozen=True)
class Reference:
    """
    The reference of a policy: its `kind` (one of the module docstring's) and, for `ref_model`, that model.

    Build it with [`Reference.of`]; run it with [`Reference.token_logps`].
    """

    kind: str
    ref_model: torch.nn.Module | None = None

    @classmethod
    def of(cls, policy: torch.nn.Module, ref_model: torch.nn.Module | None = None) -> "Reference":
        """The reference of `policy` (a model or a `PeftModel`, maybe wrapped by accelerate) given its `ref_model`."""
        if ref_model is not None:
            return cls(REF_MODEL, ref_model)
        unwrapped = extract_model_from_parallel(policy)
        if is_peft_model(unwrapped):
            return cls(FROZEN_ADAPTER if REFERENCE_ADAPTER in unwrapped.peft_config else ADAPTERS_OFF)
        return cls(PRECOMPUTED)

    @property
    def label(self) -> str:
        """What the reference cache key records about the reference."""
        return self.kind

    @property
    def adapter(self) -> str | None:
        """The adapter active while the reference runs; `None` means adapters off (or no adapters)."""
        return REFERENCE_ADAPTER if self.kind == FROZEN_ADAPTER else None

    def describe(self) -> str:
        """One phrase for people (the model card)."""
        return _DESCRIPTIONS[self.kind]

    def weights(self, policy: torch.nn.Module) -> tuple[torch.nn.Module, str | None]:
        """The module whose weights define the reference, and the adapter that is part of it (for the cache key)."""
        if self.kind == REF_MODEL:
            return self.ref_model, None
        return extract_model_from_parallel(policy), self.adapter

    @contextlib.contextmanager
    def active(self, policy: torch.nn.Module):
        """Within: the module to call to run the reference (the policy with its adapters switched, or `ref_model`)."""
        if self.kind == REF_MODEL:
            yield self.ref_model
        elif self.kind == PRECOMPUTED:
            raise ValueError(
                "No reference model to run: full fine-tuning with precompute_ref_log_probs=True keeps no reference in "
                "memory, so reference log-probs exist only for the datasets precomputed before training."
            )
        else:
            with use_adapter(extract_model_from_parallel(policy), self.adapter):
                yield policy

    def token_logps(
        self,
        policy: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        gradient_checkpointing_kwargs: dict | None = None,
    ) -> TokenLogps:
        """Reference log-probs of every answer token of a collated batch: read from the batch when it carries cached
        ones, else one forward without gradients (and without gradient checkpointing, which would only recompute)."""
        if "ref_token_logps" in batch:
            return cached_reference_logps(batch)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(extract_model_from_parallel(policy), gradient_checkpointing_kwargs),
            self.active(policy) as module,
        ):
            return completion_token_logps(module, batch, statistics=False)


def drop_identity_copy(policy: torch.nn.Module) -> None:
    """
    Delete TRL's frozen copy of the adapter when the adapter is fresh (every LoRA B is zero): that copy computes the
    bare base, which adapters-off computes too without its memory. A pretrained (SFT) adapter keeps its copy, frozen.
    """
    model = extract_model_from_parallel(policy)
    if REFERENCE_ADAPTER in model.peft_config and is_identity_adapter(model, "default"):
        model.delete_adapter(REFERENCE_ADAPTER)
        model.set_adapter("default")
    marker = f".{REFERENCE_ADAPTER}."
    for name, param in model.named_parameters():
        if marker in name:
            param.requires_grad_(False)
