"""`benchmarks/bench_throughput.py`'s limit row: one bare forward + backward per pair over its unique tokens."""

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import PAIRS


ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "benchmarks" / "bench_throughput.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_limit_runs_each_pair_once_over_its_unique_tokens(load_4bit, tokenizer):
    base = load_4bit()
    calls, head_rows = [], []
    original = base.model.forward

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    base.model.forward = recording
    base.lm_head.register_forward_hook(lambda module, args, output: head_rows.append(args[0].shape[0]))
    settings = dict(batch_size=2, max_length=64, warmup=1, steps=1, bf16=False, gradient_checkpointing=False)
    result = bench.run_limit(base, tokenizer, PAIRS, settings)

    # Per pair, by hand: the prompt once, then both answers (TRL's tokenization appends EOS to each answer).
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    eos = [tokenizer.eos_token_id]
    expected = [encode(p["prompt"]) + encode(p["chosen"]) + eos + encode(p["rejected"]) + eos for p in PAIRS]
    assert [c["input_ids"].tolist() for c in calls] == [[ids] for ids in expected]
    assert all(c.get("attention_mask") is None for c in calls)
    # The head scores the answer tokens only: both answers with their EOS.
    assert head_rows == [len(encode(p["chosen"])) + len(encode(p["rejected"])) + 2 for p in PAIRS[:4]]
    # Tokens/s counts TRL's num_tokens of the timed step (pairs 3 and 4): prompt + answer of both sequences.
    # Each pair's row holds the prompt once; TRL's count holds it twice.
    tokens = sum(len(row) + len(encode(p["prompt"])) for row, p in zip(expected[2:], PAIRS[2:]))
    assert result["tokens_per_second"] / result["steps_per_second"] == pytest.approx(tokens)
    assert result["impl"] == "limit" and result["peak_rss_mib"] > 0
