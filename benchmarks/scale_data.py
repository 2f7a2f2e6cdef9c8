"""Preference data at real size: 1k, 10k, 100k synthetic pairs through the trainer's setup and a few steps.

    python -m benchmarks.scale_data --out benchmarks/results          # 1k, 10k, 100k pairs (idle 2-core CPU)
    python -m benchmarks.scale_data --sizes 1000 --steps 2            # a quick look

What a large preference set costs before the first step, on a micro model so that the framework's own work
(validation, tokenization, the reference pass's bookkeeping, the cache) shows rather than the model's FLOPs. Every
run is its own process (its peak RSS is its own), on the same rows read from one JSONL file on disk with
`datasets.load_dataset("json")`, as a user's data arrives:

- ours: `trl_dpo_ext.DPOTrainer` with `ref_cache=True`, once with an empty cache directory (cold: the reference pass
  runs and the cache is written) and once more with the cache written (warm: no reference forward);
- stock: `trl.DPOTrainer` with `precompute_ref_log_probs=True`, cold (fresh datasets cache) and warm (its own cache
  file from the cold run, found by the dataset's fingerprint).

Both trainers get the same 4-bit NF4 base, LoRA, data, batch sizes and max length, ours with its default layout.
Measured per run: seconds from the start of trainer construction to its end (`setup_s`: validation, tokenization,
reference log-probs), seconds of `--steps` optimizer steps after it, peak RSS (sampled every 2 ms), and how far the
anonymous RSS (RSS less file-backed pages: memory-mapped Arrow files are page cache, not memory the run holds) rose
above its value before setup, at its peak during setup (`setup_anon_growth_mib`). `cache_mib` is the size of the
per-token reference log-probs as float32 tensors (4 bytes per answer token): what ours keeps for the run; stock keeps
one summed float per answer.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_throughput import PeakRSS, word_tokenizer
from benchmarks.results_io import command, write_results


REPO = Path(__file__).resolve().parents[1]
SIZES = (1_000, 10_000, 100_000)
PROMPT_TOKENS, ANSWER_TOKENS = 230, 80  # means; each row draws ±25 %, as in the measurement
MAX_LENGTH = 512  # above the longest prompt + answer (288 + 100): nothing is truncated
# A micro Llama: the framework's per-row work, not the model's FLOPs, is what this measures.
MICRO_MODEL = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=MAX_LENGTH,
)
RUNS = (("ours", "cold"), ("ours", "warm"), ("stock", "cold"), ("stock", "warm"))


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    """`n` rows of random words ("w3" ... ): prompt ≈ PROMPT_TOKENS, chosen and rejected ≈ ANSWER_TOKENS each."""
    generator = torch.Generator().manual_seed(seed)
    vocab = MICRO_MODEL["vocab_size"]

    def words(mean: int) -> str:
        length = int(mean * (0.75 + 0.5 * torch.rand(1, generator=generator).item()))
        return " ".join(f"w{i}" for i in torch.randint(3, vocab - 1, (length,), generator=generator).tolist())

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for _ in range(n):
            row = {"prompt": words(PROMPT_TOKENS), "chosen": " " + words(ANSWER_TOKENS)}
            row["rejected"] = " " + words(ANSWER_TOKENS)
            handle.write(json.dumps(row) + "\n")


def prepare(workdir: Path, sizes: list[int]) -> None:
    """The micro model, its tokenizer and one JSONL file per size, written once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = workdir / "model"
    if not (model_dir / "config.json").exists():
        tokenizer = word_tokenizer(MICRO_MODEL["vocab_size"])
        tokenizer.save_pretrained(model_dir)
        torch.manual_seed(0)
        config = LlamaConfig(**MICRO_MODEL, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        LlamaForCausalLM(config).save_pretrained(model_dir)
    for n in sizes:
        if not (workdir / f"pairs-{n}.jsonl").exists():
            write_rows(workdir / f"pairs-{n}.jsonl", n)


def worker(args) -> dict:
    """One run: load the rows and the 4-bit base, build the trainer (timed), train `args.steps` steps (timed)."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.bench_throughput import trainer_classes
    from trl_dpo_ext.models import keep_fp32_cpu_kernels, nf4_config

    model_dir = args.workdir / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4_config(torch.float32))
    keep_fp32_cpu_kernels(base)
    dataset = load_dataset(
        "json", data_files=str(args.workdir / f"pairs-{args.size}.jsonl"), split="train",
        cache_dir=str(args.datasets_cache),
    )  # fmt: skip
    config_class, trainer_class = trainer_classes(args.impl)
    ours = args.impl == "ours"
    flags = dict(ref_cache=True, ref_cache_dir=str(args.ref_cache)) if ours else dict(precompute_ref_log_probs=True)
    config = config_class(
        output_dir=tempfile.mkdtemp(prefix="scale-"),
        per_device_train_batch_size=4,
        precompute_ref_batch_size=32,
        max_length=MAX_LENGTH,
        max_steps=args.steps,
        learning_rate=1e-4,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **flags,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    # The LoRA initialisation is random: seeded, so stock's warm run finds the cache its cold run keyed by a hash of
    # the model (LoRA weights included).
    torch.manual_seed(0)
    with PeakRSS() as setup_rss:
        started = time.perf_counter()
        trainer = trainer_class(
            model=base, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
        )
        setup_s = time.perf_counter() - started
    with PeakRSS() as steps_rss:
        started = time.perf_counter()
        trainer.train()
        steps_s = time.perf_counter() - started
    answer_tokens = sum(
        len(ids) for column in ("chosen_ids", "rejected_ids") for ids in trainer.train_dataset[column]
    )  # the tokenized answers, as the trainer truncated them (nothing, here)
    return {
        "impl": args.impl,
        "cache": args.cache,
        "pairs": args.size,
        "setup_s": setup_s,
        "steps_s": steps_s,
        "peak_rss_mib": max(setup_rss.peak, steps_rss.peak) / 2**20,
        "setup_anon_growth_mib": (setup_rss.peak_anon - setup_rss.anon_at_start) / 2**20,
        "cache_mib": answer_tokens * 4 / 2**20,
    }


def spawn(args, impl: str, cache: str, size: int) -> dict:
    """One run in its own process; cold runs start from empty caches, warm ones reuse the cold run's."""
    caches = args.workdir / f"caches-{impl}-{size}"
    flags = ["--datasets_cache", caches / "datasets", "--ref_cache", caches / "ref"]
    if cache == "cold":
        shutil.rmtree(caches, ignore_errors=True)  # made by this benchmark, under its own workdir
    run = [sys.executable, "-m", "benchmarks.scale_data", "--worker", "--impl", impl, "--cache", cache]
    run += ["--size", str(size), "--steps", str(args.steps), "--workdir", str(args.workdir), *map(str, flags)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    done = subprocess.run(run, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{impl}/{cache}/{size} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def table(results: list[dict]) -> str:
    lines = [
        "| pairs | trainer | reference | setup s | setup s per 1k pairs | steps s | peak RSS MiB "
        "| setup's peak anonymous RSS growth MiB | per-token cache MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        reference = f"{'ref_cache' if r['impl'] == 'ours' else 'precompute_ref_log_probs'}, {r['cache']}"
        per_1k = r["setup_s"] / r["pairs"] * 1e3
        lines.append(
            f"| {r['pairs']:,} | {r['impl']} | {reference} | {r['setup_s']:.1f} | {per_1k:.2f} | {r['steps_s']:.1f} "
            f"| {r['peak_rss_mib']:.0f} | {r['setup_anon_growth_mib']:.0f} | {r['cache_mib']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps after setup, batch 4")
    parser.add_argument(
        "--impls", nargs="+", choices=["ours", "stock"], default=["ours", "stock"], help="the trainers to run"
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "trl_dpo_ext_scale")
    parser.add_argument("--out", type=Path, default=None, help="write scale_data.json and scale_data.md here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["ours", "stock"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", choices=["cold", "warm"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--datasets_cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ref_cache", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        sys.stdout.write("RESULT " + json.dumps(worker(args)) + "\n")
        return
    started = time.perf_counter()
    prepare(args.workdir, args.sizes)
    results = []
    for size in args.sizes:
        for impl, cache in RUNS:
            if impl not in args.impls:
                continue
            results.append(spawn(args, impl, cache, size))
            sys.stdout.write(json.dumps(results[-1]) + "\n")
            sys.stdout.flush()
    report = table(results)
    flags = ["--sizes", *args.sizes, "--steps", args.steps]
    name = "scale_data"
    if set(args.impls) != {"ours", "stock"}:  # one trainer's rows: a file of their own, beside the run of both
        flags += ["--impls", *args.impls]
        name += "_" + "_".join(args.impls)
    header = (
        f"`{command('scale_data', *flags, '--out', args.out)}` · torch {torch.__version__} · "
        f"wall {time.perf_counter() - started:.0f} s"
    )
    sys.stdout.write(header + "\n\n" + report + "\n")
    if args.out:
        write_results(args.out, name, results, report, header=header)


if __name__ == "__main__":
    main()
