"""Metric math against hand values, and the callbacks on synthetic logs and on TRL's SFT trainer."""

import json
import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState
from trl import SFTConfig, SFTTrainer

from trl_dpo_ext.metrics import (
    DisplacementAlarmCallback,
    MetricsHistoryCallback,
    ThroughputCallback,
    add_metric_callbacks,
    kl_terms,
    plot_metrics,
    preference_accuracy,
    reward_metrics,
    strictly_preferred,
)


def test_reward_metrics_by_hand():
    m = reward_metrics(
        torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -5.0]), torch.tensor([-11.0, -3.0]),
        torch.tensor([-11.5, -6.0]), beta=0.5,
    )  # fmt: skip
    assert m["rewards/chosen"].tolist() == [0.5, -0.5]
    assert m["rewards/rejected"].tolist() == [-0.25, 0.5]
    assert m["rewards/margins"].tolist() == [0.75, -1.0]
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert m["logps/ref_chosen"].tolist() == [-11.0, -3.0]
    assert m["displacement"].tolist() == [-1.0, 1.0]


def test_the_two_accuracies_differ_only_on_ties():
    chosen, rejected = torch.tensor([1.0, 0.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 0.0, -1.0])
    assert strictly_preferred(chosen, rejected).tolist() == [1.0, 0.0, 0.0, 0.0]  # a tie counts 0, as TRL logs
    assert preference_accuracy(chosen - rejected) == (1 + 0.5 + 0.5 + 0) / 4  # a tie counts half
    # At step 0 (π = π_ref) every pair ties: 0 logged, chance level held out.
    ties = torch.zeros(3)
    assert reward_metrics(ties, ties, ties, ties, beta=0.1)["rewards/accuracies"].tolist() == [0.0] * 3
    assert preference_accuracy(ties) == 0.5


def test_kl_terms_by_hand():
    policy = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # k3 = e^d − 1 − d with d = ref − policy: d = −0.5 and 1.0; the masked token is ignored
    want = (math.exp(-0.5) - 1 + 0.5) + (math.exp(1.0) - 1 - 1.0)
    assert (kl_terms(policy, ref) * mask).sum().item() == pytest.approx(want, abs=1e-6)
    assert (kl_terms(policy, policy) * mask).sum().item() == 0.0
    assert (kl_terms(policy, ref) >= 0).all()


def state_with(step=1):
    state = TrainerState()
    state.global_step = step
    state.log_history.append({"step": step})
    return state


def test_displacement_alarm_fires_once_when_chosen_falls_and_accuracy_rises():
    alarm = DisplacementAlarmCallback(margin=1.0)
    control = TrainerControl()
    logs = [
        {"displacement": 0.0, "rewards/accuracies": 0.5},  # first log: the accuracy baseline
        {"displacement": 2.0, "rewards/accuracies": 0.5},  # fell, but accuracy did not rise: no alarm
        {"displacement": 0.5, "rewards/accuracies": 0.9},  # accuracy rose, fall within the margin: no alarm
        {"displacement": 1.5, "rewards/accuracies": 0.9},  # both: alarm
        {"displacement": 3.0, "rewards/accuracies": 1.0},  # again: silent (once)
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, row in enumerate(logs, start=1):
            alarm.on_log(None, state_with(step), control, logs=row)
    displacement = [w for w in caught if "Likelihood displacement" in str(w.message)]
    assert len(displacement) == 1
    assert "step 4" in str(displacement[0].message)
    assert alarm.fired_at == 4


def test_throughput_from_token_counter(monkeypatch):
    clock = iter([100.0, 102.0, 106.0])
    monkeypatch.setattr("trl_dpo_ext.metrics.time.perf_counter", lambda: next(clock))
    callback = ThroughputCallback()
    control = TrainerControl()
    callback.on_train_begin(None, state_with(), control)
    callback.on_step_begin(None, state_with(), control)  # t = 100
    first = {"num_tokens": 500.0}
    state = state_with()
    callback.on_log(None, state, control, logs=first)  # t = 102: 500 tokens / 2 s
    assert first["tokens_per_second"] == 250.0
    assert state.log_history[-1]["tokens_per_second"] == 250.0
    second = {"num_tokens": 1500.0}
    callback.on_log(None, state_with(), control, logs=second)  # t = 106: 1000 tokens / 4 s
    assert second["tokens_per_second"] == 250.0
    assert second["memory/peak_mib"] > 0
    eval_logs = {"eval_loss": 1.0}
    callback.on_log(None, state_with(), control, logs=eval_logs)
    assert eval_logs == {"eval_loss": 1.0}


def test_history_and_plot_are_written_and_read_back(tmp_path):
    history = [
        {"step": s, "loss": 1 / s, "rewards/accuracies": 0.5, "rewards/margins": s, "kl": 0.1 * s} for s in (1, 2)
    ]
    state = TrainerState()
    state.log_history = history

    class Args:
        output_dir = str(tmp_path)

    callback = MetricsHistoryCallback()
    callback.on_log(Args, state, TrainerControl(), logs={"loss": 0.5})
    callback.on_train_end(Args, state, TrainerControl())
    assert json.loads((tmp_path / "metrics_history.json").read_text()) == history
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 0, "loss": 0.5}
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # One 400-pixel panel per key (4 in at 100 dpi; width is big-endian at bytes 16-20 of a PNG), one key included.
    for keys in [("loss", "absent"), ("loss",)]:
        png = plot_metrics(history, tmp_path / f"{len(keys)}.png", keys=keys).read_bytes()
        assert int.from_bytes(png[16:20], "big") == 400 * len(keys)


def test_throughput_and_memory_hooks_work_on_trl_sft(tiny_dir, tokenizer, tmp_path):
    rows = [{"prompt": "User: hi\nAssistant:", "completion": " Sure! Hello."}] * 8
    from datasets import Dataset

    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=4, logging_steps=2, per_device_train_batch_size=2, report_to="none",
        bf16=False, gradient_checkpointing=False, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    add_metric_callbacks(trainer, [ThroughputCallback(), MetricsHistoryCallback()])
    trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert all(row["tokens_per_second"] > 0 and row["memory/peak_mib"] > 0 for row in logs)
    saved = json.loads((tmp_path / "metrics_history.json").read_text())
    assert [row["tokens_per_second"] for row in saved if "loss" in row] == [row["tokens_per_second"] for row in logs]
