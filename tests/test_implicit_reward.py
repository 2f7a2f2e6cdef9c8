"""`ImplicitReward`: β·(log π − log π_ref) from a saved adapter gives the recipe's held-out numbers, bit for bit."""

import logging
import re
import shutil

import pytest
import torch
from numerics import assert_effect, assert_within, mean_rtol, sequence_logps_tol
from recipe_run import HELDOUT_PAIRS, trained_run

from trl_dpo_ext import ImplicitReward, PreferenceCollator
from trl_dpo_ext.implicit_reward import _pair, _tokenize
from trl_dpo_ext.preference_data import bundled_preference_dataset


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def reward(run):
    return ImplicitReward.from_pretrained(run.output_dir)


@pytest.fixture(scope="module")
def heldout():
    return bundled_preference_dataset()["test"].select(range(HELDOUT_PAIRS))


def test_heldout_accuracy_equals_what_the_recipe_prints(run, reward, heldout):
    printed = re.search(r"Held-out reward accuracy \((\d+) pairs\): (\S+) before -> (\S+) after training", run.stdout)
    assert printed is not None, run.stdout
    assert reward.beta == 0.1  # read from dpo_config.json: the YAML's beta
    margins = reward.margins(heldout)
    # Same tokenization, collator layout, batch size and adapter dtype as the trainer: the same floats.
    assert margins.tolist() == run.result["heldout_margins"]
    accuracy = reward.accuracy(heldout)
    assert accuracy == run.result["heldout_accuracy_after"]
    assert (int(printed[1]), f"{accuracy:.3f}") == (HELDOUT_PAIRS, printed[3])


def by_hand(reward, prompt: str, answer: str) -> tuple[float, float, int]:
    """log π and log π_ref of `answer` from a plain forward with full logits (not the scorer's fused head and collator
    rows), and the answer's length in tokens."""
    prompt_ids = reward.tokenizer(prompt).input_ids
    full_ids = reward.tokenizer(prompt + answer + reward.tokenizer.eos_token).input_ids
    assert full_ids[: len(prompt_ids)] == prompt_ids
    input_ids = torch.tensor([full_ids])
    targets = input_ids[0, len(prompt_ids) :]

    def answer_logp() -> float:
        with torch.no_grad():
            logits = reward.model(input_ids=input_ids).logits[0, len(prompt_ids) - 1 : -1].float()
        return logits.log_softmax(-1).gather(1, targets[:, None]).sum().item()

    policy = answer_logp()
    with reward.model.disable_adapter():
        reference = answer_logp()
    return policy, reference, len(targets)


def reward_tol(reward, answers: list[tuple[float, float, int]], seq_len: int, score: float) -> float:
    """fp32 rounding of a reward (one answer) or a margin (two) computed in two batch layouts (tests/numerics.py):
    β times the forward + summation tolerances of each log-prob in it, plus the subtraction and the product by β."""
    r = reward.model.peft_config["default"].r
    logps = torch.tensor([logp for policy, reference, _ in answers for logp in (policy, reference)])
    lengths = [length for *_, length in answers for _ in range(2)]
    tols = sequence_logps_tol(logps, lengths, reward.model.config, seq_len, r)
    return reward.beta * tols.sum().item() + mean_rtol(1, 2 * len(answers)) * abs(score)


def longest_row(reward, dataset) -> int:
    """The longest row the scorer's collator makes of `dataset`'s pairs: a bound on any row they were scored in."""
    return reward.collator([_pair(row, row) for row in _tokenize(dataset, reward.tokenizer)])["input_ids"].size(1)


@pytest.mark.numerics
def test_score_is_beta_times_the_log_ratio_computed_by_hand(reward, heldout):
    row = heldout[0]
    policy, reference, length = by_hand(reward, row["prompt"], row["chosen"])
    score = reward.score([row["prompt"]], [row["chosen"]])
    assert score.shape == (1,)
    # Full logits against the fused head, a plain row against a shared-prompt row (the answer twice, ≤ twice the
    # plain row): other reduction orders, so equal up to fp32 rounding.
    seq_len = 2 * len(reward.tokenizer(row["prompt"] + row["chosen"] + reward.tokenizer.eos_token).input_ids)
    tol = reward_tol(reward, [(policy, reference, length)], seq_len, score.item())
    assert_within(score.item(), reward.beta * (policy - reference), tol, "score vs by hand")
    assert_effect(abs(score.item()), tol, what="score")  # training moved the policy: there is something to compare


@pytest.mark.numerics
def test_rank_orders_candidates_and_scores_agree_with_margins(run, reward, heldout):
    first, second = heldout[0], heldout[1]
    candidates = [first["rejected"], " Maybe.", first["chosen"]]
    ranked = reward.rank(first["prompt"], candidates)
    scores = reward.score([first["prompt"]] * 3, candidates)
    assert [c for c, _ in ranked] == [candidates[i] for i in scores.argsort(descending=True).tolist()]
    assert ranked[0][0] == first["chosen"] and ranked[-1][0] == first["rejected"]
    # Pairs of responses to one prompt go through the collator together; a lone one (odd count) on its own.
    mixed = reward.score(
        [first["prompt"], first["prompt"], second["prompt"]], [first["chosen"], first["rejected"], second["chosen"]]
    )
    # The same pair in other batches (of 1 pair and a lone answer here, of 8 held-out pairs in the recipe): other
    # shapes, so equal up to the fp32 rounding of its four log-probs; the context is at most the longest held-out row.
    chosen, rejected = (by_hand(reward, first["prompt"], first[k]) for k in ("chosen", "rejected"))
    seq_len = longest_row(reward, heldout)
    margin = run.result["heldout_margins"][0]
    tol = reward_tol(reward, [chosen, rejected], seq_len, margin)
    assert_within((mixed[0] - mixed[1]).item(), margin, tol, "margin vs the recipe's")
    assert_effect(abs(margin), tol, what="margin")  # swapped or misplaced slots would be off by about the margin
    tol = reward_tol(reward, [chosen], seq_len, scores[2].item())
    assert_within(mixed[0].item(), scores[2].item(), tol, "score in two batches")
    assert_effect(abs(scores[2] - scores[0]).item(), tol, what="chosen vs rejected score")


def test_beta_override_scales_the_reward(run, reward, heldout):
    row = heldout[0]
    doubled = ImplicitReward.from_pretrained(run.output_dir, beta=0.2)
    # Exact: the same weights, batch and kernels in one process give the same log-probs, and fp32(0.2) = 2·fp32(0.1),
    # so fl(0.2·x) = 2·fl(0.1·x) (a product by 2 is exact).
    assert (
        doubled.score([row["prompt"]], [row["chosen"]]).item()
        == 2 * reward.score([row["prompt"]], [row["chosen"]]).item()
    )


def test_a_saved_reference_adapter_is_the_reference(run, tmp_path, heldout):
    """An SFT-started run saves its frozen reference adapter in `ref/`: scoring must use it, not the bare base."""
    adapter = tmp_path / "adapter"
    shutil.copytree(run.output_dir, adapter, ignore=shutil.ignore_patterns("runs"))
    shutil.copytree(run.output_dir, adapter / "ref", ignore=shutil.ignore_patterns("runs"))
    same = ImplicitReward.from_pretrained(adapter)  # reference = the policy's own weights, so every reward is 0
    assert same.score([heldout[0]["prompt"]], [heldout[0]["chosen"]]).tolist() == [0.0]


def test_an_answer_truncated_away_scores_zero_with_a_warning(reward, heldout, caplog):
    short = ImplicitReward(
        reward.model, reward.tokenizer, 0.1, collator=PreferenceCollator(reward.tokenizer.pad_token_id, max_length=4)
    )
    with caplog.at_level(logging.WARNING, logger="trl_dpo_ext.implicit_reward"):
        scores = short.score([heldout[0]["prompt"]], [heldout[0]["chosen"]])
    assert scores.tolist() == [0.0]
    assert "no token left after truncation to max_length=4: their reward is 0" in caplog.text


def test_errors(run, reward, tmp_path):
    with pytest.raises(ValueError, match="got 2 prompts but 1 responses"):
        reward.score(["a", "b"], ["c"])
    bare = tmp_path / "bare"
    shutil.copytree(run.output_dir, bare, ignore=shutil.ignore_patterns("runs", "dpo_config.json"))
    with pytest.raises(ValueError, match="has no dpo_config.json to read beta from: pass beta explicitly"):
        ImplicitReward.from_pretrained(bare)
    with pytest.raises(ValueError, match="beta must be > 0, got 0"):
        ImplicitReward(reward.model, reward.tokenizer, beta=0)
