"""`benchmarks.bench_throughput`'s limit row: one bare forward + backward per step over its pairs' unique tokens."""

import pytest
from conftest import PAIRS

from benchmarks import bench_throughput as bench


def test_limit_runs_each_step_once_over_its_pairs_unique_tokens(load_4bit, tokenizer):
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

    # Per pair, by hand: the prompt once, then both answers (TRL's tokenization appends EOS to each answer); a step's
    # two pairs right-padded into one batch, one forward per step, no attention mask.
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    eos = [tokenizer.eos_token_id]
    expected = [encode(p["prompt"]) + encode(p["chosen"]) + eos + encode(p["rejected"]) + eos for p in PAIRS]
    padded = []
    for step in (expected[0:2], expected[2:4]):
        width = max(map(len, step))
        padded.append([row + [tokenizer.pad_token_id] * (width - len(row)) for row in step])
    assert [c["input_ids"].tolist() for c in calls] == padded
    assert all(c.get("attention_mask") is None for c in calls)
    # The head scores the answer tokens only (both answers with their EOS), never a padding position.
    answers = [len(encode(p["chosen"])) + len(encode(p["rejected"])) + 2 for p in PAIRS[:4]]
    assert head_rows == [answers[0] + answers[1], answers[2] + answers[3]]
    # Tokens/s counts TRL's num_tokens of the timed step (pairs 3 and 4): prompt + answer of both sequences.
    # Each pair's row holds the prompt once; TRL's count holds it twice.
    tokens = sum(len(row) + len(encode(p["prompt"])) for row, p in zip(expected[2:4], PAIRS[2:4]))
    assert result["tokens_per_second"] / result["steps_per_second"] == pytest.approx(tokens)
    assert result["impl"] == "limit" and result["peak_rss_mib"] > 0
