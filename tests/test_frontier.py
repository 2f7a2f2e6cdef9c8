"""The reward-vs-KL benchmark end to end in its quick mode, and the ground-truth reward it rests on."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from frontier_task import make_corpus, make_prompts, review_score, sentiment_reward  # noqa: E402


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


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    """`python benchmarks/frontier.py --quick --out DIR`, as a user runs it (about a minute on a 2-core CPU)."""
    out = tmp_path_factory.mktemp("frontier")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--quick", "--out", str(out)]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Wrote {out}/frontier.{{png,csv,json,md}}" in result.stdout
    return out


def test_quick_run_writes_every_output_and_they_agree(quick_run):
    results = json.loads((quick_run / "frontier.json").read_text())
    assert results["mode"] == "quick"
    points = results["points"]
    assert {p["method"] for p in points} == {"SFT", "DPO", "RLOO", "Preferred-FT"}
    for method in ("DPO", "RLOO", "Preferred-FT"):  # evaluated halfway and at the end
        steps = [(p["step"], p["max_steps"]) for p in points if p["method"] == method]
        assert [step for step, _ in steps] == [steps[0][1] // 2, steps[0][1]]

    rows = list(csv.DictReader((quick_run / "frontier.csv").open()))
    assert [(r["method"], r["setting"], int(r["step"])) for r in rows] == [
        (p["method"], p["setting"], p["step"]) for p in points
    ]
    assert [float(r["reward"]) for r in rows] == pytest.approx([p["reward"] for p in points])

    markdown = (quick_run / "frontier.md").read_text()
    assert markdown.count("\n| DPO | β=") == 2 and "## Does DPO's frontier dominate RLOO's?" in markdown
    assert (quick_run / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_measures_what_it_claims(quick_run):
    points = json.loads((quick_run / "frontier.json").read_text())["points"]
    sft = points[0]
    assert sft["method"] == "SFT" and sft["kl"] == 0.0  # π = π_ref exactly: a fresh LoRA adds nothing
    trained = points[1:]
    assert all(p["kl"] > 0 and 0 < p["reward"] < 1 and p["train_seconds"] > 0 for p in trained)
    rloo = [p for p in trained if p["method"] == "RLOO"]
    assert rloo[0]["train_gen_tokens"] < rloo[1]["train_gen_tokens"] and all(p["data_gen_tokens"] == 0 for p in rloo)
    offline = [p for p in trained if p["method"] != "RLOO"]
    assert all(p["train_gen_tokens"] == 0 and p["data_gen_tokens"] > 0 for p in offline)


def test_dpo_raises_heldout_reward_over_the_sft_model(quick_run):
    points = json.loads((quick_run / "frontier.json").read_text())["points"]
    sft = points[0]
    dpo = [p for p in points if p["method"] == "DPO"][-1]
    noise = 2 * math.hypot(sft["reward_sem"], dpo["reward_sem"])
    assert dpo["reward"] - sft["reward"] > noise, (sft, dpo)
