"""Steps/s, tokens/s and peak memory of `trl_dpo_ext.DPOTrainer` against stock `trl.DPOTrainer`.

    python -m benchmarks.bench_throughput                 # CPU: three workloads, alternating runs, 2 cores
    python -m benchmarks.bench_throughput --model smollm2 # CPU: the real SmolLM2-135M-Instruct on its chat pairs
    python -m benchmarks.bench_throughput --device cuda   # GPU: 8B- and 1.5B-shaped QLoRA models

Both trainers get the same 4-bit NF4 base (random weights built from a config: speed and memory do not depend on the
values), the same LoRA config (r=16, all linear layers), the same data and the same `DPOConfig` (dtype, gradient
checkpointing, batch size, max length); the only differences are the trainer class and our layout/cache flags.
Workloads, each a pair of prompt / answer lengths (±25 % per row, so batches have padding as real data does):

- (a) prompt-heavy: prompt ≈ 4 × answer;  (b) balanced: prompt ≈ answer;
- (c) = (a) with a warm reference cache (`ref_cache=True`, cache built beforehand, untimed);
- `--model smollm2`: (s) SmolLM2-135M-Instruct's real weights (49k vocabulary, 30 layers, tied head) on the bundled
  `smollm2-concise` chat pairs (system + question ≈ 40 tokens, answers ≈ 60), and (t) = (s) with a warm cache.

The adapter weights are bf16 in both trainers here (ours with `adapter_dtype="bfloat16"`, TRL's cast), so the two
run the same config; what fp32 masters cost is measured by `benchmarks.adapter_dtype`.

The limit row (issue #18): a bare forward + backward of the same LoRA model over each pair's unique tokens
(`prompt + chosen + rejected`, one causal row per pair, a step's pairs right-padded into one batch, the LM head over
the answer positions only; no reference forward, trainer, mask or optimizer), measured in the same run; the tables
give ours/limit and stock/limit beside ours/stock.

Runs alternate limit / stock / ours within each repeat; the table gives medians over repeats and the median of the
per-repeat ratios. On the CPU every run is its own process so that its peak RSS is its own. Tokens/s counts the same
tokens for both trainers (TRL's `num_tokens`: prompt + answer of every sequence), so its ratio is the steps/s ratio;
what differs is how many tokens each trainer actually computes.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.results_io import write_results


REPO = Path(__file__).resolve().parents[1]
WORKLOADS = {
    "a": ("prompt-heavy", 4.0),
    "b": ("balanced", 1.0),
    "c": ("prompt-heavy, warm ref cache", 4.0),
    "s": ("real chat pairs", None),
    "t": ("real chat pairs, warm ref cache", None),
}
# Small enough for 2 CPU cores, with a realistic 32k-vocabulary LM head and enough layers that the body, not the head,
# holds most of the compute (as in real models: ~93 % body for Llama-3-8B).
CPU_MODEL = dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` entries ("w0", "w1", ...): one token per word, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def preference_rows(n: int, sequence_length: int, prompt_share: float, vocab_size: int, seed: int) -> list[dict]:
    """Random word sequences: prompt + answer ≈ `sequence_length` tokens, prompt ≈ `prompt_share` × answer."""
    generator = torch.Generator().manual_seed(seed)
    answer = sequence_length / (1 + prompt_share)

    def words(mean: float) -> str:
        length = int(mean * (0.75 + 0.5 * torch.rand(1, generator=generator).item()))
        ids = torch.randint(3, vocab_size - 1, (max(length, 1),), generator=generator)
        return " ".join(f"w{i}" for i in ids.tolist())

    return [
        {"prompt": words(answer * prompt_share), "chosen": " " + words(answer), "rejected": " " + words(answer)}
        for _ in range(n)
    ]


class StepTimer:
    """Wall time of the steps after the warm-up ones (synchronizing CUDA so a step's time is its own)."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if state.global_step == warmup:
                    timer.start, timer.start_tokens = time.perf_counter(), None
                timer.end = time.perf_counter()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "num_tokens" in logs:
                    if state.global_step == warmup:
                        timer.start_tokens = logs["num_tokens"]
                    timer.end_tokens = logs["num_tokens"]

        self.callback = Callback()
        self.start = self.end = self.start_tokens = self.end_tokens = None


class PeakRSS:
    """
    Peak resident memory of this process while training, sampled every 2 ms (CPU has no allocator peak counter):
    `peak`, all of it, and `peak_anon`, less the file-backed pages (Linux: memory-mapped Arrow files and libraries,
    page cache the kernel can take back) — the memory the run itself holds; `anon_at_start`, the latter on entry.
    """

    def __init__(self):
        import psutil

        self.process, self.peak, self.peak_anon, self.running = psutil.Process(), 0, 0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def anonymous(self, memory) -> int:
        return memory.rss - getattr(memory, "shared", 0)

    def sample(self):
        while self.running:
            memory = self.process.memory_info()
            self.peak = max(self.peak, memory.rss)
            self.peak_anon = max(self.peak_anon, self.anonymous(memory))
            time.sleep(0.002)

    def __enter__(self):
        self.anon_at_start = self.anonymous(self.process.memory_info())
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def run_limit(base, tokenizer, rows: list[dict], settings: dict) -> dict:
    """
    The limit (issue #18): a bare forward + backward of the same LoRA model over each pair's unique tokens,
    `prompt + chosen + rejected` in one causal row per pair, a step's pairs in one right-padded batch (one forward,
    as the trainers run a step), with the LM head and its log-softmax over the answer positions only (the only
    log-probs DPO reads) — no reference forward, no trainer, no mask, no optimizer. The rows are tokenized by our
    trainer (same truncation, chat template), and the model is the one it wraps (same LoRA, same adapter dtype), so
    the limit computes exactly what ours must compute for the policy.
    """
    import trl_dpo_ext
    from trl_dpo_ext.models import base_model

    args = trl_dpo_ext.DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-"),
        max_length=settings["max_length"],
        bf16=settings["bf16"],
        gradient_checkpointing=settings["gradient_checkpointing"],
        adapter_dtype="bfloat16",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = _trainer(trl_dpo_ext.DPOTrainer, args, base, tokenizer, rows)
    model, data = trainer.model, trainer.train_dataset
    model.train()
    pretrained = base_model(model)  # peft's LoRA layers sit inside its backbone
    backbone, head = pretrained.base_model, pretrained.get_output_embeddings()
    device = next(model.parameters()).device
    batches = [
        [data[i] for i in range(step * settings["batch_size"], (step + 1) * settings["batch_size"])]
        for step in range(settings["warmup"] + settings["steps"])
    ]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=settings["bf16"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = 0
    with PeakRSS() as rss:
        for step, batch in enumerate(batches):
            if step == settings["warmup"]:
                _synchronize()
                start, tokens = time.perf_counter(), 0
            ids, scored = _limit_batch(batch, pad, device)
            with autocast:
                hidden = backbone(input_ids=ids).last_hidden_state[:, :-1][scored]
                torch.nn.functional.cross_entropy(head(hidden).float(), ids[:, 1:][scored]).backward()
            model.zero_grad(set_to_none=True)
            # TRL's num_tokens, so tokens/s compares with the trainers': prompt + answer of both sequences.
            tokens += sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in batch)
        _synchronize()
        elapsed = time.perf_counter() - start
    result = {"impl": "limit", "steps_per_second": settings["steps"] / elapsed, "tokens_per_second": tokens / elapsed}
    result["peak_rss_mib"] = rss.peak / 2**20
    if torch.cuda.is_available():
        result["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _limit_batch(batch: list[dict], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The limit's one forward per step: row i is pair i's `prompt + chosen + rejected`, right-padded to the longest,
    shape `(pairs, T)`; `scored` (shape `(pairs, T-1)`) marks the positions whose next token is an answer token.
    Under causal attention no real token sees the padding after it, so no mask is needed.
    """
    rows = [r["prompt_ids"] + r["chosen_ids"] + r["rejected_ids"] for r in batch]
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    scored = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    for i, (row, pair) in enumerate(zip(rows, batch)):
        ids[i, : len(row)] = torch.tensor(row)
        scored[i, max(len(pair["prompt_ids"]) - 1, 0) : len(row) - 1] = True
    return ids.to(device), scored.to(device)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _trainer(trainer_class, args, base, tokenizer, rows: list[dict]):
    from datasets import Dataset
    from peft import LoraConfig

    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    return trainer_class(
        model=base, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora
    )


def trainer_classes(impl: str) -> tuple[type, type]:
    """The config and trainer classes of `impl`: "ours" (`trl_dpo_ext`) or "stock" (`trl`)."""
    import trl

    import trl_dpo_ext

    return (trl_dpo_ext.DPOConfig, trl_dpo_ext.DPOTrainer) if impl == "ours" else (trl.DPOConfig, trl.DPOTrainer)


def training_config(impl: str, workload: str, settings: dict):
    """The config of one timed run: the same fields for both trainers, plus ours' layout and cache flags."""
    ours = impl == "ours"
    warm = workload in ("c", "t")
    flags = dict(share_prompt=True, packing=settings["packing"], ref_cache=warm, adapter_dtype="bfloat16")
    flags = flags if ours else {}
    config_class, _ = trainer_classes(impl)
    return config_class(
        output_dir=tempfile.mkdtemp(prefix="bench-"),
        per_device_train_batch_size=settings["batch_size"],
        max_length=settings["max_length"],
        max_steps=settings["warmup"] + settings["steps"],
        learning_rate=1e-4,
        logging_steps=1,
        bf16=settings["bf16"],
        gradient_checkpointing=settings["gradient_checkpointing"],
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **flags,
        **({"ref_cache_dir": settings["cache_dir"]} if ours else {}),
    )


def run_once(impl: str, workload: str, base, tokenizer, rows: list[dict], settings: dict) -> dict:
    """Train `warmup + steps` steps with one trainer and measure the timed steps."""
    if impl == "limit":
        return run_limit(base, tokenizer, rows, settings) | {"workload": workload}
    _, trainer_class = trainer_classes(impl)
    timer = StepTimer(settings["warmup"])
    trainer = _trainer(trainer_class, training_config(impl, workload, settings), base, tokenizer, rows)
    trainer.add_callback(timer.callback)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start_memory = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        trainer.train()
    elapsed = timer.end - timer.start
    result = {
        "impl": impl,
        "workload": workload,
        "steps_per_second": settings["steps"] / elapsed,
        "tokens_per_second": (timer.end_tokens - timer.start_tokens) / elapsed,
        "peak_rss_mib": rss.peak / 2**20,
    }
    if cuda:
        result["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["start_allocated_mib"] = start_memory / 2**20
    return result


# --------------------------------------------------------------------------------------------------------- CPU mode


def run_settings(args, max_length: int, cuda: bool) -> dict:
    """What `run_once` needs; bf16 and gradient checkpointing as TRL defaults them on a GPU, off on a CPU."""
    return dict(
        batch_size=args.batch_size,
        max_length=max_length,
        warmup=args.warmup,
        steps=args.steps,
        bf16=cuda,
        gradient_checkpointing=cuda,
        packing=args.packing,
        cache_dir=str(args.workdir / "ref_cache"),
    )


def prepare_cpu(args) -> None:
    """Save the random tiny model and tokenizer once; every worker loads the same files in 4-bit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = args.workdir / "model"
    if (model_dir / "config.json").exists():
        return
    tokenizer = word_tokenizer(CPU_MODEL["vocab_size"])
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(**CPU_MODEL, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(model_dir)


def cpu_inputs(args) -> tuple:
    """What a CPU worker trains: the 4-bit base, its tokenizer, the rows and `run_once`'s settings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_dpo_ext.models import keep_fp32_cpu_kernels, nf4_config

    rows_needed = args.batch_size * (args.warmup + args.steps)
    if args.model == "smollm2":
        from trl_dpo_ext.preference_data import bundled_preference_dataset
        from trl_dpo_ext.smollm2 import smollm2_path

        model_dir = smollm2_path()
        train = bundled_preference_dataset("smollm2-concise")["train"].select_columns(["prompt", "chosen", "rejected"])
        rows = [train[i % len(train)] for i in range(rows_needed)]
        settings = run_settings(args, 256, cuda=False)  # the longest pair is ~180 tokens: nothing is truncated
    else:
        model_dir = args.workdir / "model"
        prompt_share = WORKLOADS[args.workload][1]
        rows = preference_rows(rows_needed, args.sequence_length, prompt_share, CPU_MODEL["vocab_size"], seed=1)
        # max_length leaves room for the +25 % rows: nothing is truncated.
        settings = run_settings(args, args.sequence_length + args.sequence_length // 2, cuda=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4_config(torch.float32))
    keep_fp32_cpu_kernels(base)  # both trainers on the fp32 4-bit path (stock TRL would not set it)
    return base, tokenizer, rows, settings


def cpu_worker(args) -> None:
    base, tokenizer, rows, settings = cpu_inputs(args)
    print("RESULT " + json.dumps(run_once(args.impl, args.workload, base, tokenizer, rows, settings)))


def spawn(args, impl: str, workload: str) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_throughput",
        "--worker",
        "--impl",
        impl,
        "--workload",
        workload,
        "--model",
        args.model,
    ]
    for name in ("workdir", "batch_size", "sequence_length", "warmup", "steps"):
        command += [f"--{name}", str(getattr(args, name))]
    command += ["--packing"] if args.packing else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker {impl}/{workload} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def run_cpu(args) -> list[dict]:
    real = args.model == "smollm2"
    if not real:
        prepare_cpu(args)
    cold, warm = ("s", "t") if real else ("a", "c")
    # Untimed: build the reference cache for the warm workload (same rows, model and flags as its timed runs).
    spawn(args, "ours", warm)
    runs = [("limit", cold), ("stock", cold), ("ours", cold), ("ours", warm)]
    runs += [] if real else [("limit", "b"), ("stock", "b"), ("ours", "b")]
    results = []
    for repeat in range(args.repeats):
        for impl, workload in runs:
            result = spawn(args, impl, workload) | {"repeat": repeat, "shape": args.model}
            results.append(result)
            print(json.dumps(result), flush=True)
    # The warm workload is compared with stock's cold runs and the cold limit: neither has a reference to cache, so
    # their two configs are the same.
    results += [r | {"workload": warm} for r in results if r["impl"] in ("stock", "limit") and r["workload"] == cold]
    return results


# --------------------------------------------------------------------------------------------------------- GPU mode


def run_gpu(args) -> list[dict]:
    """All runs in one process (imports cost ~30 s there); `max_memory_allocated` is reset before each run."""
    import gc

    from benchmarks.gpu_models import random_nf4_base, shape_config

    results = []
    for shape in args.shapes:
        vocab = shape_config(shape).vocab_size
        tokenizer = word_tokenizer(vocab)
        for sequence_length in args.sequence_lengths:
            settings = run_settings(args, sequence_length, cuda=True)
            for workload in args.workloads:
                # Rows sized so that +25 % rows still fit in max_length (nothing truncated).
                rows = preference_rows(
                    args.batch_size * (args.warmup + args.steps),
                    int(sequence_length / 1.25),
                    WORKLOADS[workload][1],
                    vocab,
                    seed=1,
                )
                for repeat in range(args.repeats):
                    for impl in ("stock", "ours"):
                        base = random_nf4_base(shape, device="cuda")
                        result = run_once(impl, workload, base, tokenizer, rows, settings)
                        result |= {"shape": shape, "sequence_length": sequence_length, "repeat": repeat}
                        results.append(result)
                        print(json.dumps(result), flush=True)
                        del base
                        gc.collect()
                        torch.cuda.empty_cache()
    return results


def fits(shape: str, sequence_length: int, budget_gib: float, impl: str, tokenizer, workload: str = "b") -> bool:
    """Whether one training step at this pair length fits under a per-process memory cap of `budget_gib`."""
    import gc

    from benchmarks.gpu_models import random_nf4_base, shape_config

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * 2**30 / total))
    vocab = shape_config(shape).vocab_size
    rows = preference_rows(2, int(sequence_length / 1.25), WORKLOADS[workload][1], vocab, seed=2)
    settings = dict(
        batch_size=1,
        max_length=sequence_length,
        warmup=1,
        steps=1,
        bf16=True,
        gradient_checkpointing=True,
        packing=False,
        cache_dir=tempfile.mkdtemp(),
    )
    base = None
    try:
        base = random_nf4_base(shape, device="cuda")
        run_once(impl, workload, base, tokenizer, rows, settings)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del base
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)


# --------------------------------------------------------------------------------------------------------- report


def table(results: list[dict], memory_key: str) -> str:
    keys = sorted({(r.get("shape", "tiny-32k"), r.get("sequence_length"), r["workload"]) for r in results}, key=str)
    lines = [
        "| model | seq len | workload | stock steps/s | ours steps/s | steps/s ratio | limit steps/s | ours/limit "
        f"| stock/limit | stock tokens/s | ours tokens/s | stock peak {memory_key} | ours peak {memory_key} "
        "| memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, length, workload in keys:
        rows = {
            impl: [
                r
                for r in results
                if r["impl"] == impl
                and r["workload"] == workload
                and r.get("shape", "tiny-32k") == shape
                and r.get("sequence_length") == length
            ]
            for impl in ("stock", "ours", "limit")
        }
        by_repeat = {impl: {r["repeat"]: r for r in rows[impl]} for impl in rows}
        ratios = [
            by_repeat["ours"][k]["steps_per_second"] / by_repeat["stock"][k]["steps_per_second"]
            for k in by_repeat["ours"]
            if k in by_repeat["stock"]
        ]
        memory_ratios = [
            by_repeat["ours"][k][memory_key] / by_repeat["stock"][k][memory_key]
            for k in by_repeat["ours"]
            if k in by_repeat["stock"]
        ]

        def median(impl, key, rows=rows):
            return statistics.median(r[key] for r in rows[impl])

        def of_limit(impl, by_repeat=by_repeat):  # median of per-repeat shares, like the ratio column
            shares = [
                by_repeat[impl][k]["steps_per_second"] / by_repeat["limit"][k]["steps_per_second"]
                for k in by_repeat[impl]
                if k in by_repeat["limit"]
            ]
            return f"{100 * statistics.median(shares):.0f} %" if shares else "-"

        limit = f"{median('limit', 'steps_per_second'):.3f}" if rows["limit"] else "-"
        lines.append(
            f"| {shape} | {length or '-'} | ({workload}) {WORKLOADS[workload][0]} "
            f"| {median('stock', 'steps_per_second'):.3f} | {median('ours', 'steps_per_second'):.3f} "
            f"| **{statistics.median(ratios):.2f}×** | {limit} | {of_limit('ours')} | {of_limit('stock')} "
            f"| {median('stock', 'tokens_per_second'):.0f} "
            f"| {median('ours', 'tokens_per_second'):.0f} | {median('stock', memory_key):.0f} "
            f"| {median('ours', memory_key):.0f} | {statistics.median(memory_ratios):.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--model",
        choices=["tiny-32k", "smollm2"],
        default="tiny-32k",
        help="CPU: the random 32k-vocabulary model "
        "on synthetic rows, or the real SmolLM2-135M-Instruct on its bundled chat pairs",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=None, help="default: 4 on CPU, 2 on GPU")
    parser.add_argument("--sequence_length", type=int, default=100, help="CPU: mean prompt + answer tokens")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--packing", action="store_true", help="ours: pack the batch into one row too")
    parser.add_argument("--shapes", nargs="+", default=["qwen2.5-1.5b", "llama3-8b"])
    parser.add_argument("--sequence_lengths", nargs="+", type=int, default=[1024, 2048])
    parser.add_argument("--workloads", nargs="+", default=["a", "b"])
    parser.add_argument(
        "--fit", action="store_true", help="GPU: only find the largest max_length of llama3-8b in 16/24 GiB"
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "trl_dpo_ext_bench")
    parser.add_argument("--out", type=Path, default=None, help="write the results (JSON) and table (markdown) here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["stock", "ours", "limit"], help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (4 if args.device == "cpu" else 2)
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return cpu_worker(args)

    started = time.perf_counter()
    if args.fit:
        results, report = [], fit_table()
    elif args.device == "cpu":
        results = run_cpu(args)
        report = table(results, "peak_rss_mib")
    else:
        results = run_gpu(args)
        report = table(results, "peak_allocated_mib")
    runs = (
        "batch 1, balanced split, one step per probe"
        if args.fit
        else f"{args.repeats} repeats × ({args.warmup} warm-up + {args.steps} timed steps) · batch {args.batch_size}"
    )
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    header = f"device: {device} · torch {torch.__version__} · {runs} · wall {time.perf_counter() - started:.0f} s"
    print(header + "\n\n" + report)
    if args.out:
        name = (
            "fit_cuda" if args.fit else f"throughput_{args.device}" + ("_smollm2" if args.model == "smollm2" else "")
        )
        write_results(args.out, name, results, report, header=header)


def fit_table() -> str:
    """Largest pair length (prompt + both answers, balanced split) that trains within each memory budget."""
    tokenizer = word_tokenizer(128256)
    lines = ["| budget | stock: largest max_length | ours: largest max_length |", "|---|---|---|"]
    for budget in (16, 24):
        best = {}
        for impl in ("stock", "ours"):
            low, high = 0, 32768  # bisect on multiples of 256
            while high - low > 256:
                middle = (low + high) // 2 // 256 * 256
                if fits("llama3-8b", middle, budget, impl, tokenizer):
                    low = middle
                else:
                    high = middle
            best[impl] = low
            print(json.dumps({"budget_gib": budget, "impl": impl, "largest_max_length": low}), flush=True)
        lines.append(f"| {budget} GiB | {best['stock']} | {best['ours']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
