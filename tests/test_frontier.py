"""The reward-vs-KL benchmark end to end in its quick mode, and the ground-truth reward it rests on."""

import csv
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import frontier_movies
from benchmarks.frontier import expected_best_of_k
from benchmarks.frontier import main as frontier_main
from benchmarks.frontier_report import aggregate_seeds, compare
from benchmarks.frontier_task import make_corpus, make_prompts, review_score, sentiment_reward


ROOT = Path(__file__).parents[1]


def test_reward_is_the_lexicon_score_a_reader_can_check():
    assert review_score("It feels great. I love it.") == 2
    assert review_score("The lid is not awful. The cord is broken.") == 0  # "not" flips the next word
    assert review_score("It looks blue.") == 0
    assert sentiment_reward("The lid is awful.", " It feels great.") == pytest.approx(1 / (1 + math.exp(-1)))
    assert sentiment_reward("any prompt", "") == 0.5


def test_corpus_and_prompts_are_seeded_and_held_out_prompts_are_disjoint():
    assert make_corpus(5, seed=0) == make_corpus(5, seed=0) != make_corpus(5, seed=1)
    train = make_prompts(50, seed=1)
    heldout = make_prompts(20, seed=2, exclude=set(train))
    assert len(set(train)) == 50 and not set(train) & set(heldout)


def test_best_of_k_estimate_is_the_mean_best_over_all_k_subsets():
    scores = [0.2, 0.9, 0.5, 0.5, 0.1]
    for k in range(1, 6):
        subsets = list(itertools.combinations(scores, k))
        assert expected_best_of_k(scores, k) == pytest.approx(sum(map(max, subsets)) / len(subsets), abs=1e-15)
    assert expected_best_of_k(scores, 1) == pytest.approx(sum(scores) / 5) and expected_best_of_k(scores, 5) == 0.9
    with pytest.raises(ValueError, match="best-of-6 needs 1 <= k <= the 5 samples"):
        expected_best_of_k(scores, 6)


def test_seeds_aggregate_to_their_mean_with_the_standard_error_over_seeds():
    def run(seed: int, reward: float, kl: float) -> dict:
        point = {"method": "DPO", "setting": "β=1", "checkpoint": "end", "final": True, "step": 10 + seed,
                 "reward": reward, "reward_sem": 0.5, "kl": kl, "kl_sem": 0.5}  # fmt: skip
        pairs = {"count": 100 + seed, "prompts": 128, "score_chosen": 0.7, "score_rejected": 0.3, "data_seconds": 1.0}
        return {"seed": seed, "points": [point], "pairs": pairs, "sft_seconds": 3.0, "total_seconds": 9.0}

    merged = aggregate_seeds([run(0, 0.5, 1.0), run(1, 0.6, 2.0), run(2, 0.7, 6.0)])
    (point,) = merged["points"]
    assert point["reward"] == pytest.approx(0.6) and point["kl"] == pytest.approx(3.0)
    # Standard error over the 3 seeds: sample standard deviation / √3 (0.1 and √7 here), not the points' own 0.5.
    assert point["reward_sem"] == pytest.approx(0.1 / math.sqrt(3)) and point["kl_sem"] == pytest.approx(
        math.sqrt(7 / 3)
    )
    assert point["reward_seeds"] == [0.5, 0.6, 0.7] and point["seeds"] == 3 and point["step"] == 11
    assert merged["pairs"]["count"] == 101 and merged["seed_seconds"] == {"0": 9.0, "1": 9.0, "2": 9.0}
    # One seed: the point's own standard error over its samples.
    assert aggregate_seeds([run(0, 0.5, 1.0)])["points"][0]["reward_sem"] == 0.5


def test_a_point_whose_sampled_kl_is_below_0_is_compared_with_pi_ref():
    # KL estimated from a few samples can come out negative; π_ref (KL 0) is then the best the other method has.
    def point(method: str, kl: float, reward: float) -> dict:
        return {"method": method, "setting": "", "step": 1, "kl": kl, "reward": reward, "reward_sem": 0.01}

    points = [point("SFT", 0.0, 0.5), point("RLOO", -0.02, 0.51), point("DPO", 0.3, 0.6)]
    (row,) = compare("DPO", "RLOO", points)["rows"]
    assert (row["kl"], row["DPO_reward"], row["difference"]) == (-0.02, 0.5, pytest.approx(-0.01))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    """`python -m benchmarks.frontier --quick --out DIR` in the repository root, as a user runs it (about a minute)."""
    out = tmp_path_factory.mktemp("frontier")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "benchmarks.frontier", "--quick", "--out", str(out)]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Wrote {out}/frontier.{{png,csv,json,md}}" in result.stdout
    return out


def test_quick_run_writes_every_output_and_they_agree(quick_run):
    results = json.loads((quick_run / "frontier.json").read_text())
    assert results["mode"] == "quick" and results["seeds"] == [0]
    points = results["points"]
    assert {p["method"] for p in points} == {"SFT", "best-of-k", "DPO", "iterative DPO", "RLOO", "Preferred-FT"}
    for method in ("DPO", "RLOO", "Preferred-FT"):  # evaluated halfway and at the end
        steps = [(p["checkpoint"], p["step"], p["final"]) for p in points if p["method"] == method]
        assert [(c, f) for c, _, f in steps] == [("half", False), ("end", True)] and steps[0][1] == steps[1][1] // 2
    iterative = [p for p in points if p["method"] == "iterative DPO"]  # evaluated after each of its 2 rounds
    assert [(p["checkpoint"], p["final"]) for p in iterative] == [("round 1", False), ("round 2", True)]
    assert 0 < iterative[0]["step"] < iterative[1]["step"]  # steps counted across rounds
    # The per-seed record is what was aggregated (one seed: the same points).
    assert json.loads((quick_run / "seed.json").read_text())["points"] == results["per_seed"][0]["points"]

    rows = list(csv.DictReader((quick_run / "frontier.csv").open()))
    assert [(r["method"], r["setting"], r["checkpoint"]) for r in rows] == [
        (p["method"], p["setting"], p["checkpoint"]) for p in points
    ]
    assert [float(r["reward"]) for r in rows] == pytest.approx([p["reward"] for p in points])

    markdown = (quick_run / "frontier.md").read_text()
    assert markdown.count("\n| DPO | β=") == 2 and markdown.count("\n| iterative DPO | β=") == 2
    for a, b in [("DPO", "RLOO"), ("RLOO", "DPO"), ("iterative DPO", "DPO"), ("iterative DPO", "RLOO")]:
        assert f"## Does {a}'s frontier dominate {b}'s?" in markdown
    assert "\n| iterative DPO | 1 |" in markdown  # the compute table: one finished run
    assert (quick_run / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_only_rewrites_the_same_outputs_from_the_seed_record(quick_run, tmp_path):
    for name in ("frontier.json", "seed.json"):
        (tmp_path / name).write_bytes((quick_run / name).read_bytes())
    frontier_main(["--report_only", "--out", str(tmp_path)])
    assert (tmp_path / "frontier.md").read_text() == (quick_run / "frontier.md").read_text()
    assert (tmp_path / "frontier.csv").read_text() == (quick_run / "frontier.csv").read_text()


def test_quick_run_measures_what_it_claims(quick_run):
    points = json.loads((quick_run / "frontier.json").read_text())["points"]
    sft = points[0]
    assert sft["method"] == "SFT" and sft["kl"] == 0.0  # π = π_ref exactly: a fresh LoRA adds nothing
    trained = [p for p in points if p["method"] not in ("SFT", "best-of-k")]
    assert all(p["kl"] > 0 and 0 < p["reward"] < 1 and p["train_seconds"] > 0 for p in trained)
    for method in ("RLOO", "iterative DPO"):  # on-policy: they sample while training, and build no pairs beforehand
        online = [p for p in trained if p["method"] == method]
        assert 0 < online[0]["train_gen_tokens"] < online[1]["train_gen_tokens"]
        assert all(p["data_gen_tokens"] == 0 for p in online)
    offline = [p for p in trained if p["method"] in ("DPO", "Preferred-FT")]
    assert all(p["train_gen_tokens"] == 0 and p["data_gen_tokens"] > 0 for p in offline)
    # Best-of-k: k samples of π_ref per query, its KL the bound log k − (k−1)/k; more samples, no less reward.
    bok = [p for p in points if p["method"] == "best-of-k"]
    assert [(p["samples_per_query"], p["kl"]) for p in bok] == [(k, math.log(k) - (k - 1) / k) for k in (2, 4)]
    assert bok[0]["reward"] <= bok[1]["reward"] and all(p["train_seconds"] == 0 for p in bok)


def test_dpo_raises_heldout_reward_over_the_sft_model(quick_run):
    points = json.loads((quick_run / "frontier.json").read_text())["points"]
    sft = points[0]
    dpo = [p for p in points if p["method"] == "DPO"][-1]
    noise = 2 * math.hypot(sft["reward_sem"], dpo["reward_sem"])
    assert dpo["reward"] - sft["reward"] > noise, (sft, dpo)


def test_movies_reward_is_vaders_compound_score_mapped_to_0_1():
    # "great" is rated 3.1 in VADER's lexicon; its compound score is s / √(s² + 15), and "not" scales s by −0.74.
    great = round(3.1 / (3.1**2 + 15) ** 0.5, 4)
    assert frontier_movies.sentiment_reward("I saw this film", " It was great.") == (1 + great) / 2
    negated = 3.1 * -0.74
    assert frontier_movies.vader_compound("It was not great.") == round(negated / (negated**2 + 15) ** 0.5, 4)
    assert frontier_movies.sentiment_reward("The acting in", "") == 0.5  # no sentiment, as the toy task's empty reply


def test_movie_prompts_are_2_to_8_word_review_openings_seeded_and_disjoint():
    for seed in (0, 1, 2):
        train, heldout = frontier_movies.split_prompts(384, 48, seed=seed)
        assert (train, heldout) == frontier_movies.split_prompts(384, 48, seed=seed)
        assert len(set(train + heldout)) == 432 and {len(p.split()) for p in train + heldout} == set(range(2, 9))
        # One draw split at random: held-out openings as long as the training ones, within 2.5 standard errors of the
        # difference of the means. (A training set drawn first leaves mostly long ones: +0.78 to +1.29 words.)
        words = [[len(p.split()) for p in prompts] for prompts in (train, heldout)]
        se = statistics.stdev(words[0]) * (1 / len(train) + 1 / len(heldout)) ** 0.5
        assert abs(statistics.mean(words[1]) - statistics.mean(words[0])) < 2.5 * se
    with pytest.raises(ValueError, match="fewer than 5000 distinct prompts"):
        frontier_movies.make_prompts(5000, seed=1)
    assert frontier_movies.make_prompts(0, seed=1) == []


def test_movies_task_runs_every_method_on_smollm2_at_ci_size(smollm2_dir, tmp_path):
    """`--task movies --quick`: SmolLM2 as π_ref (no SFT), VADER's reward, DPO, iterative DPO, RLOO and best-of-k."""
    # The session's converted SmolLM2 (its conversion is tested in test_smollm2.py), linked into this run's cache.
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / smollm2_dir.name).symlink_to(smollm2_dir, target_is_directory=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TRL_DPO_EXT_CACHE": str(tmp_path / "cache"),
    }
    command = [sys.executable, "-m", "benchmarks.frontier", "--task", "movies", "--quick", "--threads", "2"]
    out = tmp_path / "out"
    result = subprocess.run(
        [*command, "--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "frontier.json").read_text())
    assert results["mode"] == "movies_quick" and results["settings"]["task"] == "movies"
    run = results["per_seed"][0]
    assert run["sft_seconds"] == 0.0 and run["pairs"]["count"] > 0  # no SFT: π_ref is the pretrained model
    points = {(p["method"], p["checkpoint"]): p for p in run["points"]}
    assert set(points) == {
        ("SFT", "end"),
        ("best-of-k", "end"),
        ("DPO", "half"),
        ("DPO", "end"),
        ("iterative DPO", "round 1"),
        ("iterative DPO", "round 2"),
        ("RLOO", "half"),
        ("RLOO", "end"),
    }
    assert points["SFT", "end"]["kl"] == 0.0 and all(0 < p["reward"] < 1 for p in points.values())
    for method, first, last in (("iterative DPO", "round 1", "round 2"), ("RLOO", "half", "end")):
        assert 0 < points[method, first]["train_gen_tokens"] < points[method, last]["train_gen_tokens"]
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
