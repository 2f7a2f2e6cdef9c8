"""The reference log-prob cache: exact values, the key, refusal of bad files, and no reference forward when warm."""

import json

import pyarrow as pa
import pytest
import torch
from numerics import (
    assert_within,
    backward_rtol,
    forward_rtol,
    fp32_4bit_kernels,
    sequence_logps_tol,
    sum_rtol,
)
from peft import LoraConfig

from trl_dpo_ext import DPOTrainer, refcache
from trl_dpo_ext.logps import AnswerLogps
from trl_dpo_ext.refcache import (
    CACHE_COLUMNS,
    cache_key,
    cache_path,
    load_reference_cache,
    save_reference_cache,
    weights_fingerprint,
)


def lora(seed: int) -> LoraConfig:
    # A random (non-zero) adapter: a different seed is a different policy, but the reference is the same base.
    torch.manual_seed(seed)
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)


@pytest.fixture
def make_trainer(tokenizer, toy, dpo_args, load_4bit, tmp_path):
    def make(seed: int = 0, **overrides) -> DPOTrainer:
        settings = dict(ref_cache=True, ref_cache_dir=str(tmp_path / "cache"), per_device_train_batch_size=4)
        args = dpo_args(**{**settings, **overrides})
        peft_config = lora(seed)
        rows = toy["train"].select(range(12))
        return DPOTrainer(
            model=fp32_4bit_kernels(load_4bit()),
            args=args,
            train_dataset=rows,
            processing_class=tokenizer,
            peft_config=peft_config,
        )

    return make


def test_save_load_roundtrip_and_refusals(tmp_path):
    key = {"num_rows": 2, "x": 1}
    chosen = AnswerLogps.from_lists([[-1.5, -0.25], [-3.0]])
    rejected = AnswerLogps.from_lists([[-2.0], [-0.5, -0.125, -7.0]])
    path = tmp_path / "c.safetensors"
    save_reference_cache(path, key, chosen, rejected)
    assert load_reference_cache(path, key) == (chosen, rejected)  # exact: float32 values of these are exact
    assert load_reference_cache(tmp_path / "missing.safetensors", key) is None
    with pytest.warns(UserWarning, match="recorded key does not match"):
        assert load_reference_cache(path, {**key, "x": 2}) is None
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 9])  # truncated, as by a crash mid-write without the atomic rename
    with pytest.warns(UserWarning, match="refused"):
        assert load_reference_cache(path, key) is None
    corrupt = bytearray(data)
    corrupt[-3] ^= 0xFF  # one flipped byte in the payload
    path.write_bytes(bytes(corrupt))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert load_reference_cache(path, key) is None
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert set(header) == {"__metadata__", "chosen", "chosen_offsets", "rejected", "rejected_offsets"}  # no pickle


@pytest.mark.numerics
def test_cache_equals_on_the_fly_reference_and_is_reused(make_trainer, tmp_path, monkeypatch):
    first = make_trainer(seed=0)
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1
    # Arrow float32 lists over the cached tensors (issue #28: no Python float per token), one row per pair.
    column = first.train_dataset.data.column(CACHE_COLUMNS[0])
    assert column.type == pa.large_list(pa.float32()) and len(column) == len(first.train_dataset)
    batch = first._prepare_inputs(next(iter(first.get_train_dataloader())))
    cached = first._reference_token_logps(batch).sequence_logps()
    without_cache = {k: v for k, v in batch.items() if k != "ref_token_logps"}
    reference = first._reference_token_logps(without_cache)
    computed = reference.sequence_logps()
    # cached in other batches (unshuffled) than this one: fp32 rounding of each Σ_t log p (tests/numerics.py)
    tol = sequence_logps_tol(computed, reference.lengths(), first.model.config, batch["input_ids"].size(1), lora_r=4)
    assert_within(cached, computed, tol, "cached vs computed reference")

    # A β sweep, a loss-type sweep and a new LoRA initialisation: all the same reference, so no recompute.
    def fail(*args, **kwargs):
        raise AssertionError("the reference was recomputed")

    monkeypatch.setattr(refcache, "reference_answer_logps", fail)
    for overrides in ({"beta": 0.5}, {"loss_type": ["ipo"]}):
        trainer = make_trainer(seed=1, **overrides)
        assert trainer.train_dataset[CACHE_COLUMNS[0]] == first.train_dataset[CACHE_COLUMNS[0]]
    assert list((tmp_path / "cache").glob("*.safetensors")) == files


@pytest.mark.parametrize(
    "change",
    [
        {"max_length": 30},
        {"truncation_mode": "keep_end", "max_length": 30},
        {"share_prompt": False},
        {"packing": True},
    ],
)
def test_a_changed_key_recomputes(make_trainer, tmp_path, change):
    make_trainer()
    make_trainer(**change)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_key_depends_on_base_weights_and_tokens_not_on_lora(load_4bit, make_trainer):
    trainer = make_trainer()
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = weights_fingerprint(model)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data.add_(1.0)
    assert weights_fingerprint(model) == before
    base_param = next(p for n, p in model.named_parameters() if "lora_" not in n and p.dtype.is_floating_point)
    base_param.data.add_(1.0)
    assert weights_fingerprint(model) != before
    rows = trainer.train_dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    reordered = rows.select([1, 0, *range(2, len(rows))])
    assert cache_key(before, rows)["tokens"] != cache_key(before, reordered)["tokens"]
    assert cache_path("/c", cache_key(before, rows)) != cache_path("/c", cache_key(before, reordered))


def test_corrupt_cache_file_is_recomputed(make_trainer, tmp_path):
    first = make_trainer()
    (path,) = (tmp_path / "cache").glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="refused"):
        second = make_trainer()
    assert second.train_dataset[CACHE_COLUMNS[1]] == first.train_dataset[CACHE_COLUMNS[1]]
    assert load_reference_cache(path, json.loads(_metadata(path)["key"])) is not None  # rewritten whole


def _metadata(path):
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def count_forwards(trainer) -> list[int]:
    calls = [0]
    body = trainer.accelerator.unwrap_model(trainer.model).get_base_model().model
    body.register_forward_pre_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.numerics
def test_warm_cache_runs_no_reference_forward(make_trainer):
    make_trainer()  # warms the cache
    warm = make_trainer(seed=1, max_steps=3)
    calls = count_forwards(warm)
    warm.train()
    assert calls[0] == 3  # one policy forward per step, no reference forward
    logs = [row for row in warm.state.log_history if "loss" in row]
    assert all(row["kl"] >= 0 for row in logs)  # per-token cached values keep the kl metric

    cold = make_trainer(seed=1, max_steps=3, ref_cache=False)
    calls = count_forwards(cold)
    cold.train()
    assert calls[0] == 6  # policy + reference every step
    config, beta = warm.model.config, warm.beta
    seq_len = max(len(r["prompt_ids"]) + len(r[k]) for r in warm.train_dataset for k in ("chosen_ids", "rejected_ids"))
    rtol = forward_rtol(config, seq_len, lora_r=4) + sum_rtol(seq_len)
    first_loss = logs[0]["loss"]
    for ours, theirs in zip(logs, [row for row in cold.state.log_history if "loss" in row]):
        # the four mean log-probs of the margin, each to fp32 rounding (|d loss / d βm| ≤ 1), plus the updates: a
        # step moves the loss by its gradient, itself computed to backward_rtol
        names = ("logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected")
        loss_tol = beta * rtol * sum(abs(theirs[n]) for n in names)
        loss_tol += backward_rtol(config, seq_len, 8 * seq_len, lora_r=4) * abs(theirs["loss"] - first_loss)
        assert_within(ours["loss"], theirs["loss"], loss_tol, f"warm vs cold loss, step {ours['step']}")
