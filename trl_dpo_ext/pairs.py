"""Preference pairs from a policy and a reward: the DPO paper's pipeline (Rafailov et al. 2023, Sec. 6.1).

For each prompt, sample k completions from the (reference) policy, score them with a reward model or function, and keep
the best as `chosen` and the worst as `rejected`; prompts whose k scores are all equal carry no preference and are
dropped.
"""

import logging

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl.experimental.utils import get_reward

from .models import mask_pad_id
from .preference_data import is_blank
from .sampling import DEFAULTS, RewardFn, SamplingConfig, check_pair_samples, generate, prompt_ids


logger = logging.getLogger(__name__)


def _prompt_text(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor) -> str:
    """
    The text of a sampled prompt that tokenizes back to the ids it was sampled from: special tokens (a chat
    template's `<|im_start|>`, ...) are kept, since dropping them would train DPO on another context; only a leading
    BOS that the tokenizer adds by itself is left out, or tokenizing the text would add a second one.
    """
    ids = ids.tolist()
    bos = tokenizer.bos_token_id
    if ids and bos is not None and ids[0] == bos and tokenizer("").input_ids[:1] == [bos]:
        ids = ids[1:]
    return tokenizer.decode(ids, skip_special_tokens=False)


@torch.no_grad()
def reward_model_scores(
    reward_model: PreTrainedModel, query_responses: torch.Tensor, pad_token_id: int, context_length: int
) -> torch.Tensor:
    """One float score per sequence, read by TRL's `get_reward` at the last non-pad token of each response."""
    scores = get_reward(reward_model, query_responses.to(reward_model.device), pad_token_id, context_length)[1]
    return scores.float().cpu()


def _checked_scores(scores, expected: int) -> torch.Tensor:
    """`reward_fn`'s output as a tensor, refused unless it is one finite number per completion."""
    try:
        scores = torch.as_tensor([float(s) for s in scores], dtype=torch.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`reward_fn` must return one number per completion: {error}") from error
    if len(scores) != expected:
        raise ValueError(f"`reward_fn` returned {len(scores)} scores for {expected} completions: one per completion.")
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"`reward_fn` returned a non-finite score ({scores[bad[0]].item()}) for completion {bad[0]}.")
    return scores.float()


def build_preference_pairs(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts,
    reward_fn: RewardFn | None = None,
    reward_model: PreTrainedModel | None = None,
    k: int = DEFAULTS.num_samples,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    temperature: float = DEFAULTS.temperature,
    batch_size: int = DEFAULTS.batch_size,
    stop_token_id: int | None = None,
    missing_eos_penalty: float | None = DEFAULTS.missing_eos_penalty,
    seed: int | None = DEFAULTS.seed,
    sampling: SamplingConfig | None = None,
) -> Dataset:
    """
    Sample `k` completions per prompt from `policy`, score them, and keep (best, worst) as (chosen, rejected).

    Args:
        policy: causal LM to sample from (the reference policy of the DPO run).
        tokenizer: its tokenizer (a pad token is needed only for the layout; an added, un-embedded `[PAD]` is fine).
        prompts: strings, chat message lists, token-id lists, or a `Dataset` with `input_ids` or `prompt`.
        reward_fn: `reward_fn(prompts, completions) -> scores`, on texts. Exclusive with `reward_model`.
        reward_model: a `*ForSequenceClassification` with `num_labels=1` (TRL's PPO reward model), scored at the last
            token of each response as in TRL.
        k, max_new_tokens, temperature, batch_size, missing_eos_penalty, seed: the sampling settings, as in
            [`trl_dpo_ext.sampling.SamplingConfig`] (its defaults); `k` is at least 2.
        stop_token_id: the token that ends a completion (default: EOS).
        sampling: all the sampling settings at once, instead of the keyword arguments above.

    Returns:
        `datasets.Dataset` with `prompt`, `chosen`, `rejected`, `score_chosen`, `score_rejected`.
    """
    if sampling is None:
        sampling = SamplingConfig.from_flags(
            {"num_samples": "k"}, num_samples=k, max_new_tokens=max_new_tokens, temperature=temperature,
            batch_size=batch_size, missing_eos_penalty=missing_eos_penalty, seed=seed,
        )  # fmt: skip
    check_pair_samples(sampling.num_samples, "k")
    k = sampling.num_samples
    if (reward_fn is None) == (reward_model is None):
        raise ValueError("pass exactly one of `reward_fn` or `reward_model`")
    if reward_model is not None and reward_model.config.num_labels != 1:
        raise ValueError(
            f"the reward model must output one score per sequence (num_labels=1), got num_labels="
            f"{reward_model.config.num_labels}"
        )
    ids = prompt_ids(prompts, tokenizer)
    stop = tokenizer.eos_token_id if stop_token_id is None else stop_token_id
    mask_pad = mask_pad_id(tokenizer, policy)
    rows, scored = [], 0
    batches = generate(policy, tokenizer, ids, sampling, stop)
    for query_responses, context in tqdm(batches, desc="Scoring completions", unit="batch"):
        queries, responses = query_responses[:, :context], query_responses[:, context:]
        prompt_text = [_prompt_text(tokenizer, q[q != mask_pad]) for q in queries]
        completion_text = [tokenizer.decode(r[r != mask_pad], skip_special_tokens=True) for r in responses]
        if reward_model is not None:
            scores = reward_model_scores(reward_model, query_responses, mask_pad, context)
        else:
            scores = _checked_scores(reward_fn(prompt_text, completion_text), len(completion_text))
        if sampling.missing_eos_penalty is not None:
            scores = scores - sampling.missing_eos_penalty * (~(responses == stop).any(dim=1)).float().cpu()
        for first in range(0, len(scores), k):
            scored += 1
            # A blank completion (the stop token at once, or only invisible characters) cannot be a DPO answer.
            candidates = [i for i in range(first, first + k) if not is_blank(completion_text[i])]
            if len(candidates) < 2:
                continue
            best = max(candidates, key=lambda i: scores[i])
            worst = min(candidates, key=lambda i: scores[i])
            if scores[best] == scores[worst] or completion_text[best] == completion_text[worst]:
                continue  # a tie carries no preference
            rows.append(
                {
                    "prompt": prompt_text[first],
                    "chosen": completion_text[best],
                    "rejected": completion_text[worst],
                    "score_chosen": float(scores[best]),
                    "score_rejected": float(scores[worst]),
                }
            )
    logger.info("Built %d preference pairs from %d prompts (%d ties dropped)", len(rows), scored, scored - len(rows))
    if not rows:
        raise ValueError(
            f"no preference pairs: for all {scored} prompts the {k} completions tied (or fewer than 2 were non-empty)"
        )
    return Dataset.from_list(rows)
