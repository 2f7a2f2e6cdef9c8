"""Sharded QLoRA DPO: the recipe under FSDP2 and under DeepSpeed ZeRO-3 on 2 CPU processes, against the DDP run.

Each engine trains the recipe's tiny configuration for 2 steps through `accelerate launch` with the config users get
(`recipes/accelerate/fsdp2_qlora.yaml`, `deepspeed_zero3.yaml`), wrapped by `tests/distributed_probe.py`, saving a
checkpoint at every step; a second launch starts from a copy of the first run's step-1 checkpoint alone, as a run
killed after step 1 would have left it, with `--resume_from_checkpoint last`. Both are compared with the 2-process DDP
run of `tests/test_distributed.py` (the session fixture `ddp_runs`): same flags, same seed, same pairs.

Why FSDP2 equals DDP exactly, not to a tolerance: every rank runs the same forward and backward on the same pairs as
its DDP twin, on the same weights (FSDP2 gathers the exact values before each layer; the 4-bit codes and constants
are the same whether packed into uint8 or bf16 storage). Reducing the gradients over 2 ranks adds two numbers
(commutative, so exact in any order) and halves them (a power of 2, exact), whether before (FSDP2's reduce-scatter)
or after (DDP's all-reduce); the gradient norm stays below `max_grad_norm`, so clipping multiplies by exactly 1; SGD
with momentum is elementwise. So the weights after each step, the saved adapter and the held-out margins are bitwise
equal, and so are the logged metrics but the gradient norm, whose sharded total sums per-shard squares in another
order (compared to fp32 summation rounding). A resumed run equals the uninterrupted one of the same engine exactly,
for both engines: same code, same values.

ZeRO-3 does not equal DDP bitwise (measured: the adapter's lora_B entries differ by up to 4 units in the last place,
2.9e-11 on entries of ~1e-4; the source is not pinned down: DeepSpeed reduces and steps on flattened fp32 partitions of
the gradients, with its own ops), so its comparisons with DDP take fp32 tolerances: the adapter to a gradient's
rounding (tests/numerics.py `backward_rtol`) of the updates each tensor received, the losses to `loss_tol` (as DDP
against one process), the other metrics and the held-out margins to the 1e-5 that tests/test_distributed.py uses
between DDP and one process.

FSDP2 runs in CI. ZeRO-3 needs `pip install deepspeed`, which CI does not install (its build and first JIT compile
take ~4 min of a 30-min CI budget): its tests skip without it. Run them with

    pip install deepspeed
    HF_HUB_OFFLINE=1 python -m pytest tests/test_sharded.py -k zero3
"""

import math
import shutil
from pathlib import Path

import pytest
import torch
from launches import BATCH, HELDOUT, STEPS, cache_log, launch, loss_tol, probe_lines
from numerics import assert_within, backward_rtol, sum_rtol
from safetensors.torch import load_file

from trl_dpo_ext.checkpoints import checkpoint_problem
from trl_dpo_ext.tiny_model import tiny_llama_config


ADAPTER = "adapter_model.safetensors"
# Not a function of the batch and the weights (wall time, process memory); num_tokens: a resumed run counts from 0
# again (TRL's token counter is not in the checkpoint), so it is compared for the uninterrupted run only.
UNCOMPARED = {"tokens_per_second", "memory/peak_mib"}
ENGINES = {
    # FSDP2 on the CPU: the probe lets accelerate set it up there (tests/distributed_probe.py); --use_cpu true gives
    # each process its gloo group and CPU device.
    "fsdp2": {
        "config": "fsdp2_qlora.yaml",
        "type": "DistributedType.FSDP",
        "flags": ("--use_cpu", "true"),
        "launcher": (),
        "env": {},
    },
    # ZeRO-3 on the CPU, unpatched: DeepSpeed's CPU accelerator and a gloo group; no --use_cpu (accelerate 1.16 would
    # drop DeepSpeed for DDP, and the recipe refuses that), fp32 (the config's bf16 is for GPUs).
    "zero3": {
        "config": "deepspeed_zero3.yaml",
        "type": "DistributedType.DEEPSPEED",
        "flags": ("--ddp_backend", "gloo"),
        "launcher": ("--mixed_precision", "no"),
        "env": {"DS_ACCELERATOR": "cpu"},
    },
}
# Engines whose runs equal DDP's bitwise (the module docstring).
EXACT = {"fsdp2"}
# Both engines shard floating-point tensors: the 4-bit weights must be stored as bf16. A checkpoint every step.
SHARDED = ("--bnb_4bit_quant_storage", "bfloat16", "--save_strategy", "steps", "--save_steps", "1")


def launch_engine(engine: str, tmp_path: Path, *flags: str, env: dict | None = None):
    spec = ENGINES[engine]
    return launch(
        spec["config"], tmp_path, *spec["flags"], *SHARDED, *flags,
        env={**spec["env"], **(env or {})}, launcher=spec["launcher"],
    )  # fmt: skip


def deepspeed_importable() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


# A mark, not importorskip in a fixture: the skip must come before the session's DDP launches, which a ZeRO-3-only
# selection (-k zero3) would otherwise start first (session fixtures are set up before module ones).
NO_DEEPSPEED = pytest.mark.skipif(
    not deepspeed_importable(), reason="ZeRO-3 needs `pip install deepspeed` (not in CI)"
)


@pytest.fixture(scope="module", params=["fsdp2", pytest.param("zero3", marks=NO_DEEPSPEED)])
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def sharded(engine, tmp_path_factory):
    """The uninterrupted sharded run, with a checkpoint at each step."""
    return launch_engine(engine, tmp_path_factory.mktemp(engine))


@pytest.fixture(scope="module")
def resumed(engine, sharded, tmp_path_factory):
    """A run killed after step 1: the uninterrupted run's step-1 checkpoint alone, resumed with `last` (its reference
    cache shared, as a rerun on one machine finds it)."""
    tmp_path = tmp_path_factory.mktemp(f"{engine}-resumed")
    shutil.copytree(sharded.output_dir / "checkpoint-1", tmp_path / "run" / "checkpoint-1")
    cache = sharded.output_dir.parent / "cache"
    return launch_engine(engine, tmp_path, "--resume_from_checkpoint", "last", env={"TRL_DPO_EXT_CACHE": str(cache)})


def test_accelerate_set_up_the_engine_asked_for_and_each_rank_holds_half_the_model(engine, sharded, ddp_runs):
    kind = ENGINES[engine]["type"]
    assert probe_lines(sharded.stdout) == [f"distributed_probe: process {rank} of 2 ({kind})" for rank in (0, 1)]
    assert f"Training on 2 process(es) ({kind}), global batch {2 * BATCH} pairs" in sharded.stdout
    held = sharded.probe("holds")
    assert sorted(held) == [0, 1]
    for rank in held.values():
        assert rank["type"] == kind and rank["fsdp_version"] == (2 if engine == "fsdp2" else None)
        # The tiny model's tensors all split evenly (FSDP2: dim 0 of each; ZeRO-3: each flattened), so each rank
        # holds exactly half of the base's floating-point elements (4-bit weights in their bf16 storage, norms,
        # embeddings) and half of the adapter.
        for part in ("base", "adapter"):
            assert 2 * rank[part]["local"] == rank[part]["full"] > 0, (part, rank)
        # The adapter's masters stay fp32 (adapter_dtype's default) in their shards; the base is its bf16 storage
        # (4-bit codes) and the fp32 compute dtype (norms, embeddings, on the CPU).
        assert rank["adapter"]["dtypes"] == ["torch.float32"]
        assert rank["base"]["dtypes"] == ["torch.bfloat16", "torch.float32"]
    # DDP, for contrast: every rank holds the whole model.
    for rank in ddp_runs["two"].probe("holds").values():
        assert rank["type"] == "DistributedType.MULTI_CPU" and rank["fsdp_version"] is None
        for part in ("base", "adapter"):
            assert rank[part]["local"] == rank[part]["full"] > 0
        # uint8 storage (the recipe's default): the 4-bit codes are not floating-point, only the fp32 tensors count.
        assert rank["adapter"]["dtypes"] == rank["base"]["dtypes"] == ["torch.float32"]
    assert held[0]["adapter"]["full"] == ddp_runs["two"].probe("holds")[0]["adapter"]["full"]


def test_training_logs_the_ddp_runs_steps(engine, sharded, ddp_runs):
    ddp, steps = ddp_runs["two"].steps, sharded.steps
    assert [row["step"] for row in steps] == [row["step"] for row in ddp] == list(range(1, STEPS + 1))
    # Step 1 with a fresh adapter on the sharded base: π = π_ref (the cache), so the loss is log 2 to rounding
    # (tests/launches.py: loss_tol); the KL term is exactly 0.
    assert_within(steps[0]["loss"], math.log(2), loss_tol(steps[0], steps[0]["loss"]), "step-1 loss vs log 2")
    assert steps[0]["kl"] == 0
    for row, twin in zip(steps, ddp):
        assert set(row) == set(twin)
        # A sum of ~45k squares in another order: fp32 summation rounding, halved by the square root.
        assert_within(row["grad_norm"], twin["grad_norm"], sum_rtol(45_056) * twin["grad_norm"], "grad norm")
        names = sorted(set(row) - UNCOMPARED - {"grad_norm"})
        if engine in EXACT:
            assert {name: row[name] for name in names} == {name: twin[name] for name in names}, row["step"]
            continue
        assert_within(row["loss"], twin["loss"], loss_tol(twin, ddp[0]["loss"]), f"loss, step {row['step']}")
        for name in names:
            assert row[name] == pytest.approx(twin[name], rel=1e-5, abs=1e-5), (row["step"], name)
    assert steps[0]["loss"] - steps[1]["loss"] > 5e-4  # trained: step 2 follows an update


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / ADAPTER)


def assert_same_adapter(got: dict, expected: dict, tol: dict | None = None) -> None:
    """Bitwise equal, or each tensor within `tol[key]` where given."""
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        if tol is None:
            assert torch.equal(got[key], tensor), key  # exact: the module docstring
        else:
            assert_within(got[key], tensor, tol[key], key)


def update_tol(final: dict, step_1: dict) -> dict:
    """Per tensor: a gradient's fp32 rounding (backward_rtol, relative to the gradient's largest entry) times the
    largest update the tensor received. lora_B starts at 0, so its step-1 update is its step-1 value; lora_A's step-1
    gradient is 0 (B = 0), so the step-1 checkpoint holds its initial value; both then move by final − step 1."""
    rtol = backward_rtol(tiny_llama_config(512), 512, 2 * BATCH * 512, 16)  # the recipe's max_length, LoRA rank
    return {
        key: rtol * ((tensor - step_1[key]).abs().max() + (step_1[key].abs().max() if "lora_B" in key else 0))
        for key, tensor in final.items()
    }


def test_the_saved_adapter_is_complete_and_equals_the_ddp_runs(engine, sharded, ddp_runs):
    # The final save gathers the whole adapter (FSDP2: the recipe switches to FULL_STATE_DICT; ZeRO-3: the config's
    # zero3_save_16bit_model), and DPOTrainer.save_model checked its keys (trl_dpo_ext.saved_run).
    saved, ddp = adapter(sharded.output_dir), adapter(ddp_runs["two"].output_dir)
    assert len(saved) == 28  # lora_A and lora_B of 7 linear layers in each of the tiny model's 2 decoder layers
    if engine in EXACT:
        assert_same_adapter(saved, ddp)
    else:  # ZeRO-3's step-1 checkpoint holds its adapter (test_checkpoints_hold_shards_and_count_as_complete)
        tol = update_tol(ddp, adapter(sharded.output_dir / "checkpoint-1"))
        assert_same_adapter(saved, ddp, tol)
        for key, tensor in saved.items():  # the comparison can fail: what training moved dwarfs the tolerance
            if "lora_B" in key:
                assert tensor.abs().max() > 100 * tol[key], key
    assert any(tensor.abs().max() > 0 for key, tensor in saved.items() if "lora_B" in key)  # B moved from 0


def test_heldout_scoring_runs_through_the_sharded_model_and_equals_ddp(engine, sharded, ddp_runs):
    reports, ddp = sharded.probe("report"), ddp_runs["two"].probe("report")[0]
    assert sorted(reports) == [0, 1] and reports[0] == reports[1]  # every rank scores every held-out pair
    report = reports[0]
    # Before training the adapter is fresh (B = 0): the policy is the reference (adapters off), exactly.
    assert report["heldout_margins_before"] == [0.0] * HELDOUT
    # After training the margins come from the sharded model (its weights are gathered for the forward; the
    # reference is the same sharded base with adapters off), and equal DDP's, where nothing is sharded.
    assert len(report["heldout_margins"]) == HELDOUT and all(margin != 0 for margin in report["heldout_margins"])
    if engine in EXACT:
        assert report["heldout_margins"] == ddp["heldout_margins"]
    else:  # margins of ≥ 3e-3: 1e-5 (as DDP against one process) cannot pass an untrained or sign-flipped one
        assert report["heldout_margins"] == pytest.approx(ddp["heldout_margins"], rel=0, abs=1e-5)
    assert (report["heldout_accuracy_before"], report["heldout_accuracy_after"]) == (0.5, 1.0)
    assert f"Held-out reward accuracy ({HELDOUT} pairs): 0.500 before -> 1.000 after training" in sharded.stdout


def test_the_reference_cache_is_written_by_rank_0_and_read_by_rank_1(sharded, resumed):
    written, hits = cache_log(sharded.stderr)
    assert [rank for rank, _ in written] == ["0"] and [rank for rank, _ in hits] == ["1"]
    path = Path(written[0][1])
    assert hits[0][1] == str(path) and sorted(path.parent.iterdir()) == [path]
    # The resumed run finds the same file on both ranks and computes nothing.
    assert cache_log(resumed.stderr) == ([], [("0", str(path)), ("1", str(path))])


def test_checkpoints_hold_shards_and_count_as_complete(engine, sharded, ddp_runs):
    for step in range(1, STEPS + 1):
        checkpoint = sharded.output_dir / f"checkpoint-{step}"
        assert checkpoint_problem(checkpoint) is None
        if engine == "fsdp2":
            # SHARDED_STATE_DICT: each rank's shard of the model and of the optimizer (torch.distributed.checkpoint),
            # no adapter file.
            shards = [".metadata", "__0_0.distcp", "__1_0.distcp"]
            for part in ("pytorch_model_fsdp_0", "optimizer_0"):
                assert sorted(p.name for p in (checkpoint / part).iterdir()) == shards
            assert not (checkpoint / ADAPTER).exists()
        else:
            # ZeRO-3: each rank's partition (DeepSpeed's own files), and the gathered adapter, checked at the save.
            states = sorted(p.name for p in (checkpoint / f"global_step{step}").iterdir())
            names = [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
            assert states == names
            assert sorted(adapter(checkpoint)) == sorted(adapter(ddp_runs["two"].output_dir))


def test_a_run_resumed_after_step_1_ends_where_the_uninterrupted_run_does(sharded, resumed):
    for rank in (0, 1):
        assert f"[rank {rank}] trl_dpo_ext.checkpoints: Resuming from {resumed.output_dir / 'checkpoint-1'}" in (
            resumed.stderr
        )
    assert [row["step"] for row in resumed.steps] == [2]
    (row,), twin = resumed.steps, sharded.steps[1]
    for name in sorted(set(twin) - UNCOMPARED - {"num_tokens"}):
        assert row[name] == twin[name], name  # the same step 2: weights, optimizer state and data order restored
    # Momentum: the last update adds 0.9 × the step-1 gradient, restored from the checkpoint's optimizer shards.
    assert_same_adapter(adapter(resumed.output_dir), adapter(sharded.output_dir))
    assert checkpoint_problem(resumed.output_dir / "checkpoint-2") is None
