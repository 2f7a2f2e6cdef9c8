"""The losses against hand computations of their formulas."""

import math

import pytest
import torch

from trl_dpo_ext.losses import LOSSES, hinge_loss, ipo_loss, preference_loss, sigmoid_loss


# Two pairs: log π(y_w), log π_ref(y_w), log π(y_l), log π_ref(y_l), |y_w|, |y_l|
PI_W, REF_W, PI_L, REF_L = [-10.0, -4.0], [-11.0, -3.0], [-12.0, -5.0], [-11.5, -6.0]
LEN_W, LEN_L = [4.0, 2.0], [3.0, 5.0]
BETA = 0.5


def args():
    chosen = torch.tensor(PI_W) - torch.tensor(REF_W)
    rejected = torch.tensor(PI_L) - torch.tensor(REF_L)
    return chosen, rejected, torch.tensor(LEN_W), torch.tensor(LEN_L), BETA


def hand_margins():
    return [(PI_W[i] - REF_W[i]) - (PI_L[i] - REF_L[i]) for i in range(2)]  # [1.5, -2.0]


def test_sigmoid_matches_the_dpo_formula():
    expected = [-math.log(1 / (1 + math.exp(-BETA * m))) for m in hand_margins()]
    assert sigmoid_loss(*args()).tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[0] == pytest.approx(-math.log(1 / (1 + math.exp(-0.75))))


def test_hinge():
    expected = [max(0.0, 1 - BETA * m) for m in hand_margins()]  # [0.25, 2.0]
    assert hinge_loss(*args()).tolist() == pytest.approx(expected, abs=1e-6)
    assert expected == [0.25, 2.0]


def test_ipo_normalises_by_length():
    expected = []
    for i in range(2):
        margin = (PI_W[i] - REF_W[i]) / LEN_W[i] - (PI_L[i] - REF_L[i]) / LEN_L[i]
        expected.append((margin - 1 / (2 * BETA)) ** 2)
    assert ipo_loss(*args()).tolist() == pytest.approx(expected, abs=1e-6)


def test_weighted_combination_is_sum_of_weighted_means():
    chosen, rejected, lw, ll, beta = args()
    got = preference_loss(["sigmoid", "hinge"], [0.8, 0.2], chosen, rejected, lw, ll, beta)
    want = 0.8 * sigmoid_loss(*args()).mean() + 0.2 * hinge_loss(*args()).mean()
    assert got.item() == pytest.approx(want.item(), abs=1e-6)


def test_policy_equal_to_reference_gives_log_two():
    zeros = torch.zeros(3)
    assert sigmoid_loss(zeros, zeros, zeros + 1, zeros + 1, 0.1).tolist() == pytest.approx([math.log(2)] * 3)


def test_table_names():
    assert set(LOSSES) == {"sigmoid", "hinge", "ipo"}
