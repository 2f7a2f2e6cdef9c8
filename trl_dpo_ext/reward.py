"""Implicit-reward scoring of preference pairs: r(x, y) = β·(log π(y|x) − log π_ref(y|x)) (Rafailov et al., Eq. 5)."""

import torch
from datasets import Dataset


def reward_margins(trainer, dataset: Dataset) -> torch.Tensor:
    """
    r(x, y_w) − r(x, y_l) for every pair of `dataset` under the trainer's current policy and reference: the margins
    [`trl_dpo_ext.ImplicitReward.from_trainer`] computes, one per row (a pair whose prompt fills `max_length` keeps
    its row, as a tie), so the count and the values agree with `ImplicitReward.margins` by construction.

    Args:
        trainer ([`trl_dpo_ext.DPOTrainer`]): supplies the policy, the reference, β and the collator.
        dataset (`datasets.Dataset`): raw preference rows (prompt/chosen/rejected), validated and tokenized there.

    Returns:
        `torch.Tensor` of shape `(len(dataset),)`. Every process computes all rows (a held-out set is small).
    """
    from .implicit_reward import ImplicitReward  # here: ImplicitReward imports this module

    return ImplicitReward.from_trainer(trainer).margins(dataset)


def preference_accuracy(margins: torch.Tensor) -> float:
    """Share of pairs whose chosen completion has the higher implicit reward; a tie (e.g. π = π_ref) counts half."""
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()
