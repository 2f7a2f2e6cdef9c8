"""Preference losses as pure functions on per-pair tensors.

Every function takes the policy-vs-reference log-ratios of the chosen and rejected completions,

    chosen_logratios   = log π(y_w|x) − log π_ref(y_w|x)      shape (B,)
    rejected_logratios = log π(y_l|x) − log π_ref(y_l|x)      shape (B,)

the completion lengths in tokens (B,), and β, and returns the per-pair loss (B,). The trainer takes the mean.
Where TRL has the same loss, the definition follows `trl.DPOTrainer` 1.16 so that both give the same number.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F


def sigmoid_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7): `−log σ(β·[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)])`."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def hinge_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """SLiC hinge on the DPO margin (Zhao et al. 2023; Rafailov et al. 2023, App. A): `max(0, 1 − β·Δ)`."""
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


def ipo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """
    IPO (Azar et al. 2023, Eq. 17) with β as τ: `(Δ̄ − 1/(2τ))²`, where Δ̄ is the margin of the *per-token* log-ratios
    (each sequence log-ratio divided by its completion length), as in TRL and as confirmed by the IPO authors.
    """
    margin = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    return (margin - 1 / (2 * beta)) ** 2


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

# The loss types this package computes itself, so they work with every batch layout and reference source. Other
# `DPOConfig.loss_type` values run through stock TRL's loss (plain layout, reference forward each step).
LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
}


def preference_loss(
    loss_types: list[str],
    loss_weights: list[float],
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Weighted sum of the batch means of `loss_types` (TRL's multi-loss combination, e.g. MPO). Returns a scalar."""
    total = chosen_logratios.new_zeros(())
    for loss_type, weight in zip(loss_types, loss_weights, strict=True):
        per_pair = LOSSES[loss_type](chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, beta)
        total = total + weight * per_pair.mean()
    return total
