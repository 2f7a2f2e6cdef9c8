"""PreferenceCollator against tensors written out by hand."""

import pytest
import torch

from trl_dpo_ext import PreferenceCollator


ROWS = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
    {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11, 12]},
]


def test_right_padding():
    batch = PreferenceCollator(pad_token_id=0)(ROWS)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5],
        [7, 8, 9, 0, 0],
        [1, 2, 3, 6, 0],
        [7, 8, 10, 11, 12],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 2, 2], [0, 1, 2, 3, 3], [0, 1, 2, 3, 4]]


def test_left_padding():
    batch = PreferenceCollator(pad_token_id=0, padding_side="left")(ROWS)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5],
        [0, 0, 7, 8, 9],
        [0, 1, 2, 3, 6],
        [7, 8, 10, 11, 12],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1], [0, 0, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]


def test_truncation_keeps_start_and_reference_logps_pass_through():
    rows = [{**row, "ref_chosen_logps": -1.0 - i, "ref_rejected_logps": -2.0 - i} for i, row in enumerate(ROWS)]
    batch = PreferenceCollator(pad_token_id=0, max_length=4)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [7, 8, 9, 0], [1, 2, 3, 6], [7, 8, 10, 11]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 1]]
    assert batch["ref_chosen_logps"].tolist() == [-1.0, -2.0]
    assert batch["ref_rejected_logps"].tolist() == [-2.0, -3.0]


def test_pad_to_multiple_of():
    batch = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=4)(ROWS)
    assert batch["input_ids"].shape == (4, 8)
    assert batch["attention_mask"][:, 5:].sum() == 0


def test_bad_padding_side():
    with pytest.raises(ValueError, match="`padding_side` must be 'right' or 'left', got 'middle'"):
        PreferenceCollator(pad_token_id=0, padding_side="middle")


def test_dtypes():
    batch = PreferenceCollator(pad_token_id=0)(ROWS)
    assert all(
        batch[k].dtype == torch.long for k in ("input_ids", "attention_mask", "completion_mask", "position_ids")
    )
