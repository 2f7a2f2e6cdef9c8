"""Per-sequence log-probabilities of the completions, from one forward through TRL's fused LM head.

The fused head (`trl.trainer.utils.add_fused_lm_head`, installed by `trl.DPOTrainer`) projects only the positions with
a label, in chunks, and never materializes the `(batch, seq, vocab)` logits.
"""

from dataclasses import dataclass

import torch


# Batch keys that describe the layout or carry precomputed values; everything else goes to the model.
NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


@dataclass
class TokenLogps:
    """
    Next-token statistics of one forward, aligned with `input_ids[:, 1:]`.

    Attributes:
        logps (`torch.Tensor` of shape `(N, T-1)`): log p(x_{t+1} | x_{≤t}); 0 where `mask` is 0.
        mask (`torch.Tensor` of shape `(N, T-1)`): 1 where x_{t+1} is a completion token.
        entropy, mean_logits, is_top1 (`torch.Tensor` of shape `(N, T-1)`, *optional*): extra fused-head outputs.
    """

    logps: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None

    def sequence_logps(self) -> torch.Tensor:
        """Σ_t log p over completion tokens, shape `(N,)` (Rafailov et al. 2023, Eq. 7 uses log π(y|x) this way)."""
        return (self.logps * self.mask).sum(dim=1)

    def lengths(self) -> torch.Tensor:
        """Completion lengths in tokens, shape `(N,)`."""
        return self.mask.sum(dim=1)


def completion_token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TokenLogps:
    """
    Run `model` on a collated batch and return the log-prob of every completion token.

    Args:
        model: a causal LM patched with TRL's fused LM head (optionally wrapped by peft / accelerate).
        batch: `input_ids`, `attention_mask`, `completion_mask` of shape `(N, T)`; optional `position_ids` or other
            model inputs.
    """
    model_kwargs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    completion_mask = batch["completion_mask"]
    labels = batch["input_ids"].masked_fill(completion_mask == 0, -100)
    outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
    mask = completion_mask[:, 1:]
    seq_len = mask.size(1)
    # Prompt-learning adapters prepend virtual tokens; keep the positions of the real ones.
    tail = {
        name: None if getattr(outputs, name, None) is None else getattr(outputs, name)[:, -seq_len:]
        for name in ("log_probs", "entropy", "mean_logits", "is_top1")
    }
    return TokenLogps(
        logps=tail["log_probs"],
        mask=mask.to(tail["log_probs"].dtype),
        entropy=tail["entropy"],
        mean_logits=tail["mean_logits"],
        is_top1=tail["is_top1"],
    )
