"""Preference pairs from a policy and a reward: the DPO paper's pipeline (Rafailov et al. 2023, Sec. 6.1).

For each prompt, sample k completions from the (reference) policy, score them with a reward model or function, and keep
the best as `chosen` and the worst as `rejected`; prompts whose k scores are all equal carry no preference and are
dropped.
"""

import logging
from collections.abc import Callable, Sequence

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl.experimental.utils import get_reward

from .models import mask_pad_id, safe_pad_id
from .preference_data import is_blank


logger = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


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


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False).input_ids
    if prompt and isinstance(prompt[0], dict):  # chat messages: rendered with the generation prompt, as TRL does
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    return list(prompt)


def prompts_as_ids(prompts, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """
    Prompts as token ids from a list of strings, chat message lists or id lists, or a `Dataset` with `input_ids` or
    `prompt`.
    """
    if isinstance(prompts, Dataset):
        if "input_ids" in prompts.column_names:
            prompts = prompts["input_ids"]
        elif "prompt" in prompts.column_names:
            prompts = prompts["prompt"]
        else:
            raise ValueError(
                f"prompt dataset needs an 'input_ids' (tokenized, as in TRL's PPO scripts) or a 'prompt' column; "
                f"got columns {prompts.column_names}"
            )
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts: the prompt set is empty")
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    for row, prompt in enumerate(ids):
        if not prompt:
            raise ValueError(f"prompt row {row} is empty")
    return ids


@torch.no_grad()
def sample_completions(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    k: int,
    max_new_tokens: int = 53,
    temperature: float = 0.7,
    batch_size: int = 16,
    stop_token_id: int | None = None,
    desc: str = "Sampling completions",
) -> list[tuple[torch.Tensor, int]]:
    """
    Sample `k` completions per prompt with batched `generate` (prompts left-padded), `batch_size` prompts at a time.

    Returns:
        One `(query_responses, context_length)` per batch: `query_responses` of shape `(b·k, context + new)` holds the
        left-padded prompt then the response, every token after the response's first stop token replaced by the
        tokenizer's pad id — the layout `trl.experimental.utils.get_reward` scores.
    """
    stop = tokenizer.eos_token_id if stop_token_id is None else stop_token_id
    gen_pad = safe_pad_id(tokenizer, policy)
    mask_pad = mask_pad_id(tokenizer, policy)
    device = next(policy.parameters()).device
    batches = []
    was_training = policy.training
    policy.eval()
    try:
        for start in tqdm(range(0, len(prompt_ids), batch_size), desc=desc, unit="batch"):
            chunk = prompt_ids[start : start + batch_size]
            width = max(map(len, chunk))
            input_ids = torch.tensor([[gen_pad] * (width - len(p)) + p for p in chunk], device=device)
            attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = policy.generate(
                input_ids=input_ids.repeat_interleave(k, dim=0),
                attention_mask=attention.repeat_interleave(k, dim=0),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                eos_token_id=stop,
                pad_token_id=gen_pad,
            )
            response = out[:, width:]
            after_stop = (response == stop).long().cumsum(dim=1) - (response == stop).long() > 0
            response = response.masked_fill(after_stop, mask_pad)
            query = input_ids.masked_fill(attention == 0, mask_pad).repeat_interleave(k, dim=0)
            batches.append((torch.cat([query, response], dim=1), width))
    finally:
        policy.train(was_training)
    return batches


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
    k: int = 4,
    max_new_tokens: int = 53,
    temperature: float = 0.7,
    batch_size: int = 16,
    stop_token_id: int | None = None,
    missing_eos_penalty: float | None = None,
    seed: int | None = 0,
) -> Dataset:
    """
    Sample `k` completions per prompt from `policy`, score them, and keep (best, worst) as (chosen, rejected).

    Args:
        policy: causal LM to sample from (the reference policy of the DPO run).
        tokenizer: its tokenizer (a pad token is needed only for the layout; an added, un-embedded `[PAD]` is fine).
        prompts: strings, token-id lists, or a `Dataset` with `input_ids` or `prompt`.
        reward_fn: `reward_fn(prompts, completions) -> scores`, on texts. Exclusive with `reward_model`.
        reward_model: a `*ForSequenceClassification` with `num_labels=1` (TRL's PPO reward model), scored at the last
            token of each response as in TRL.
        k: completions per prompt, at least 2.
        max_new_tokens, temperature, batch_size, stop_token_id: sampling settings (`batch_size` prompts at a time).
        missing_eos_penalty: subtracted from the score of a completion that never emits the stop token (PPO's rule).
        seed: seeds the sampling, without touching the caller's RNG state; None samples from the global RNG.

    Returns:
        `datasets.Dataset` with `prompt`, `chosen`, `rejected`, `score_chosen`, `score_rejected`.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2 to form a pair, got k={k}")
    if (reward_fn is None) == (reward_model is None):
        raise ValueError("pass exactly one of `reward_fn` or `reward_model`")
    if reward_model is not None and reward_model.config.num_labels != 1:
        raise ValueError(
            f"the reward model must output one score per sequence (num_labels=1), got num_labels="
            f"{reward_model.config.num_labels}"
        )
    prompt_ids = prompts_as_ids(prompts, tokenizer)
    stop = tokenizer.eos_token_id if stop_token_id is None else stop_token_id
    mask_pad = mask_pad_id(tokenizer, policy)
    rows, scored = [], 0
    # The seed applies to this sampling only: the caller's RNG state is restored afterwards, whatever it was.
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        batches = sample_completions(policy, tokenizer, prompt_ids, k, max_new_tokens, temperature, batch_size, stop)
        for query_responses, context in tqdm(batches, desc="Scoring completions", unit="batch"):
            queries, responses = query_responses[:, :context], query_responses[:, context:]
            prompt_text = [_prompt_text(tokenizer, q[q != mask_pad]) for q in queries]
            completion_text = [tokenizer.decode(r[r != mask_pad], skip_special_tokens=True) for r in responses]
            if reward_model is not None:
                scores = reward_model_scores(reward_model, query_responses, mask_pad, context)
            else:
                scores = _checked_scores(reward_fn(prompt_text, completion_text), len(completion_text))
            if missing_eos_penalty is not None:
                scores = scores - missing_eos_penalty * (~(responses == stop).any(dim=1)).float().cpu()
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
