"""Preference batches from tokenized rows.

`PreferenceCollator` builds a batch of B pairs in one of three layouts (see `layout.py`):

- plain (TRL's): `2B` rows, `[prompt+chosen]` for every pair and then `[prompt+rejected]`, with left or right padding
  and position ids built from the attention mask, so that where the padding sits never changes a log-prob;
- shared prompt: `B` rows `[prompt│chosen│rejected]`, each prompt computed once;
- packed: every sequence of the batch in one row, no padding computed (with or without a shared prompt).

Rows that carry cached reference log-probs (`ref_chosen_token_logps`/`ref_rejected_token_logps`, from
`refcache.py`) come out as `ref_token_logps`, aligned with `input_ids` whatever the layout.
"""

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from .config import check_padding_side
from .layout import check_reference_length, pair_docs, rows_from_docs


# The dataset row of each example: `DPOTrainer` adds it, the collator batches it, errors name it.
INDEX_COLUMN = "example_index"


@dataclass
class PreferenceCollator(DataCollatorForPreference):
    """
    Collates `prompt_ids`/`chosen_ids`/`rejected_ids` rows.

    Args:
        pad_token_id (`int`): Token id used for padding.
        max_length (`int`, *optional*): Truncate each `prompt+completion` to this many tokens (see `truncation_mode`).
        truncation_mode (`str`, *optional*, defaults to `"keep_start"`): `"keep_start"` or `"keep_end"`.
        pad_to_multiple_of (`int`, *optional*): Pad the length to a multiple of this.
        padding_side (`str`, *optional*, defaults to `"right"`): `"right"` or `"left"` (plain layout only; the other
            layouts carry explicit position ids and a 4D mask, so padding sits on the right).
        share_prompt (`bool`, *optional*, defaults to `False`): One `[prompt│chosen│rejected]` row per pair.
        packing (`bool`, *optional*, defaults to `False`): All sequences of the batch in one row.

    A sequence's first token is never an answer token, whatever the layout: nothing precedes it, so it has no log-prob
    (this matters only when truncation left no prompt, or the prompt is empty). An answer with no token left after
    truncation is kept with log-prob 0 and length 0 (the trainer drops such rows beforehand, see
    `DPOTrainer._prepare_dataset`); a sequence with no token at all (empty prompt and empty answer) is a `ValueError`
    naming the pair, and its dataset row when rows carry `example_index`.

    Returns a dict with `input_ids`, `completion_mask`, `position_ids` of shape `(rows, T)`, `num_tokens` (the tokens
    the plain layout holds, TRL's count; shape `(1,)`, since accelerate's batch dispatch cannot concatenate 0-d
    tensors), and: `attention_mask` in the plain layout; `doc_ids`, `branch_ids`, `sequence_index`, `answer_lengths`
    in the others (`sequence_index` is b for the chosen answer of pair b, B + b for its rejected one, -1 elsewhere);
    `ref_token_logps` when rows carry cached reference log-probs; `example_index` (`(B,)`, the dataset row of each
    pair) when rows carry one.

    Example:
    ```python
    >>> collator = PreferenceCollator(pad_token_id=0, padding_side="left")
    >>> collator([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}])["input_ids"]
    tensor([[0, 1, 2, 3],
            [1, 2, 4, 5]])
    >>> collator = PreferenceCollator(pad_token_id=0, share_prompt=True)
    >>> collator([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}])["input_ids"]
    tensor([[1, 2, 3, 2, 4, 5]])
    ```
    """

    padding_side: str = "right"
    share_prompt: bool = False
    packing: bool = False

    def __post_init__(self):
        check_padding_side(self.padding_side)
        # max_length=1 leaves each sequence one token, which has no log-prob; 0 would empty every sequence.
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (or None), got {self.max_length}")

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("PreferenceCollator got an empty list of examples.")
        # A sequence without tokens would be an all-padding row (in the plain layout TRL even builds it as a float
        # tensor, which the embedding rejects deep in torch): name the pair instead.
        for b, example in enumerate(examples):
            for answer in ("chosen", "rejected"):
                if not example["prompt_ids"] and not example[f"{answer}_ids"]:
                    row = f" (dataset row {example[INDEX_COLUMN]})" if INDEX_COLUMN in example else ""
                    raise ValueError(
                        f"pair {b} of the batch{row}: empty 'prompt_ids' and empty '{answer}_ids', so the {answer} "
                        "sequence has no token at all."
                    )
        batch = self._layout_batch(examples)
        if INDEX_COLUMN in examples[0]:
            batch[INDEX_COLUMN] = torch.tensor([e[INDEX_COLUMN] for e in examples])
        return batch

    def _layout_batch(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.share_prompt or self.packing:
            docs, plain_tokens = pair_docs(
                examples,
                share_prompt=self.share_prompt,
                max_length=self.max_length,
                truncation_mode=self.truncation_mode,
            )
            batch = rows_from_docs(
                docs,
                num_sequences=2 * len(examples),
                packing=self.packing,
                pad_token_id=self.pad_token_id,
                pad_to_multiple_of=self.pad_to_multiple_of,
            )
            if "ref_chosen_token_logps" not in examples[0]:
                del batch["ref_token_logps"]
            batch["num_tokens"] = torch.tensor([plain_tokens])
            return batch
        batch = super().torch_call(examples)  # right-padded by TRL
        # Column 0 is each row's first token, which has no log-prob; TRL marks it as an answer token when no prompt is
        # left, and then left padding would score it from a pad and the cached reference would miss it.
        batch["completion_mask"][:, 0] = 0
        if "ref_chosen_token_logps" in examples[0]:
            batch["ref_token_logps"] = _place_answer_values(
                batch["completion_mask"],
                [e["ref_chosen_token_logps"] for e in examples] + [e["ref_rejected_token_logps"] for e in examples],
            )
        if self.padding_side == "left":
            # Rotate each row right by its pad count: same tokens, pads moved to the front.
            pads = (batch["attention_mask"] == 0).sum(dim=1)
            for key in ("input_ids", "attention_mask", "completion_mask", "ref_token_logps"):
                if key in batch:
                    batch[key] = torch.stack([row.roll(int(n)) for row, n in zip(batch[key], pads)])
        # Positions count real tokens only: 0..L-1 for every sequence whichever side the pads are on.
        batch["position_ids"] = (batch["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
        batch["num_tokens"] = batch["attention_mask"].sum().reshape(1)
        return batch


def _place_answer_values(completion_mask: torch.Tensor, values: list[list[float]]) -> torch.Tensor:
    """Row r's answer tokens get `values[r]` in order; zeros elsewhere. Shape of `completion_mask`."""
    placed = torch.zeros(completion_mask.shape, dtype=torch.float32)
    for row, row_values in enumerate(values):
        positions = completion_mask[row].nonzero().squeeze(1)
        check_reference_length(len(row_values), len(positions))
        placed[row, positions] = torch.tensor(row_values, dtype=torch.float32)
    return placed
