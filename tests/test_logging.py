"""`--report_to tensorboard` works offline: the event files hold TRL's metrics and ours, with the logged values."""

import json

import pytest
from recipe_run import trained_run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


# What stock `trl.DPOTrainer` logs, and what this package adds (see `DPOTrainer`'s docstring).
TRL_METRICS = {
    "loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
    "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy",
    "num_tokens", "mean_token_accuracy",
}  # fmt: skip
OUR_METRICS = {
    "kl", "displacement", "tokens_per_second", "memory/peak_mib", "logps/ref_chosen", "logps/ref_rejected",
}  # fmt: skip


def test_tensorboard_scalars_are_trl_metrics_plus_ours_with_the_logged_values(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    event_files = list((run.output_dir / "runs").rglob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"train/{name}" for name in TRL_METRICS | OUR_METRICS} <= tags

    history = json.loads((run.output_dir / "metrics_history.json").read_text())
    logged = {row["step"]: row for row in history if "loss" in row}
    assert sorted(logged) == [2, 4]
    for name in TRL_METRICS | OUR_METRICS:
        scalars = events.Scalars(f"train/{name}")
        assert [s.step for s in scalars] == [2, 4], name
        for scalar in scalars:  # TensorBoard stores float32
            assert scalar.value == pytest.approx(logged[scalar.step][name], rel=1e-6, abs=1e-6), name
    assert events.Scalars("train/kl")[-1].value > 0  # the policy moved away from the reference
