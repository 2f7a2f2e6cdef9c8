"""`benchmarks/bench_throughput.py`'s limit row: one bare forward + backward per pair over its unique tokens."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import PAIRS


ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "benchmarks" / "bench_throughput.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_limit_runs_each_pair_once_over_its_unique_tokens(load_4bit, tokenizer):
    base = load_4bit()
    calls = []
    original = base.forward

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    base.forward = recording
    settings = dict(batch_size=2, max_length=64, warmup=1, steps=1, bf16=False, gradient_checkpointing=False)
    result = bench.run_limit(base, tokenizer, PAIRS, settings)

    # Per pair, by hand: the prompt once, then both answers (TRL's tokenization appends EOS to each answer).
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    eos = [tokenizer.eos_token_id]
    expected = [encode(p["prompt"]) + encode(p["chosen"]) + eos + encode(p["rejected"]) + eos for p in PAIRS]
    assert [c["input_ids"].tolist() for c in calls] == [[ids] for ids in expected]
    assert all(torch.equal(c["labels"], c["input_ids"]) and c.get("attention_mask") is None for c in calls)
    # Tokens/s counts TRL's num_tokens of the timed step (pairs 3 and 4): prompt + answer of both sequences.
    # Each pair's row holds the prompt once; TRL's count holds it twice.
    tokens = sum(len(row) + len(encode(p["prompt"])) for row, p in zip(expected[2:], PAIRS[2:]))
    assert result["tokens_per_second"] / result["steps_per_second"] == pytest.approx(tokens)
    assert result["impl"] == "limit" and result["peak_rss_mib"] > 0
