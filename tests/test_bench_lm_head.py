"""`benchmarks.lm_head_cpu` runs both heads on the shapes it is given and reports every timing."""

import json

from benchmarks import lm_head_cpu as bench


def test_lm_head_benchmark_times_both_heads(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "SHAPES", {"small": (6, 16, 100)})
    bench.main(["--repeats", "1", "--out", str(tmp_path)])
    report = (tmp_path / "lm_head_cpu.md").read_text()
    assert "| small: 6 × 16 → 100 |" in report
    results = json.loads((tmp_path / "lm_head_cpu.json").read_text())
    assert set(results["small"]) == {
        "trl_policy_fwd_bwd_ms",
        "ours_policy_fwd_bwd_ms",
        "trl_reference_fwd_ms",
        "trl_reference_log_probs_only_fwd_ms",
        "ours_reference_fwd_ms",
    }
    assert all(value > 0 for value in results["small"].values())
