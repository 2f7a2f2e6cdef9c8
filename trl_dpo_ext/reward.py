"""Implicit-reward scoring of preference pairs: r(x, y) = β·(log π(y|x) − log π_ref(y|x)) (Rafailov et al., Eq. 5)."""

import torch
from datasets import Dataset

from .logps import completion_token_logps


@torch.no_grad()
def reward_margins(trainer, dataset: Dataset) -> torch.Tensor:
    """
    r(x, y_w) − r(x, y_l) for every pair of `dataset` under the trainer's current policy and reference.

    Args:
        trainer ([`trl_dpo_ext.DPOTrainer`]): supplies the policy, the reference, β and the collator.
        dataset (`datasets.Dataset`): raw preference rows (prompt/chosen/rejected), validated and tokenized here.

    Returns:
        `torch.Tensor` of shape `(len(dataset),)`, gathered across processes.
    """
    prepared = trainer._prepare_dataset(dataset, trainer.processing_class, trainer.args, "eval")
    loader = trainer.get_eval_dataloader(prepared)
    was_training = trainer.model.training
    trainer.model.eval()
    margins = []
    try:
        for batch in loader:
            policy = completion_token_logps(trainer.model, batch).sequence_logps()
            reference = trainer._reference_token_logps(batch).sequence_logps()
            chosen, rejected = (trainer.beta * (policy - reference)).chunk(2)
            margins.append(trainer.accelerator.gather_for_metrics(chosen - rejected).float().cpu())
    finally:
        trainer.model.train(was_training)
    return torch.cat(margins)


def preference_accuracy(margins: torch.Tensor) -> float:
    """Share of pairs whose chosen completion has the higher implicit reward; a tie (e.g. π = π_ref) counts half."""
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()
