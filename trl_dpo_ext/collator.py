"""Preference batches from tokenized rows.

`PreferenceCollator` lays a batch of B pairs out as TRL does — `2B` rows, `[prompt+chosen]` for every pair and then
`[prompt+rejected]` — and adds what TRL's collator leaves out: left padding for models that need it, and position ids
built from the attention mask, so that where the padding sits never changes a log-prob.
"""

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference


@dataclass
class PreferenceCollator(DataCollatorForPreference):
    """
    Pads `prompt_ids`/`chosen_ids`/`rejected_ids` rows into a `[chosen rows; rejected rows]` batch.

    Args:
        pad_token_id (`int`): Token id used for padding.
        max_length (`int`, *optional*): Truncate each `prompt+completion` to this many tokens (see `truncation_mode`).
        truncation_mode (`str`, *optional*, defaults to `"keep_start"`): `"keep_start"` or `"keep_end"`.
        pad_to_multiple_of (`int`, *optional*): Pad the length to a multiple of this.
        padding_side (`str`, *optional*, defaults to `"right"`): `"right"` or `"left"`.

    Returns a dict with `input_ids`, `attention_mask`, `completion_mask` and `position_ids` of shape `(2B, T)` (plus
    `ref_chosen_logps`/`ref_rejected_logps` of shape `(B,)` when the rows carry them).

    Example:
    ```python
    >>> collator = PreferenceCollator(pad_token_id=0, padding_side="left")
    >>> collator([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}])["input_ids"]
    tensor([[0, 1, 2, 3],
            [1, 2, 4, 5]])
    ```
    """

    padding_side: str = "right"

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)  # right-padded by TRL
        if self.padding_side == "left":
            # Rotate each row right by its pad count: same tokens, pads moved to the front.
            pads = (batch["attention_mask"] == 0).sum(dim=1)
            for key in ("input_ids", "attention_mask", "completion_mask"):
                batch[key] = torch.stack([row.roll(int(n)) for row, n in zip(batch[key], pads)])
        # Positions count real tokens only: 0..L-1 for every sequence whichever side the pads are on.
        batch["position_ids"] = (batch["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
        return batch
