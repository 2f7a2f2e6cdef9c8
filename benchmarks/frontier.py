"""The DPO paper's reward-vs-KL experiment (Rafailov et al. 2023, Sec. 6.1, Fig. 2 left), small, offline, on a CPU.

    python -m benchmarks.frontier --jobs 2                  # full mode, seeds 0 1 2: benchmarks/results/frontier/
    python -m benchmarks.frontier --quick --out /tmp/frontier   # a small smoke run of the same pipeline (CI)
    python -m benchmarks.frontier --task movies --jobs 3   # real parts: SmolLM2, movie-review prefixes, VADER (#31)

Pipeline, top to bottom:
1. a synthetic review corpus (`frontier_task.py`) → a locally trained BPE tokenizer and a tiny Llama trained on it
   from scratch with TRL's `SFTTrainer`: the SFT model. Loaded in 4-bit NF4, it is π_ref for every method
   (`--task movies`: SmolLM2-135M-Instruct is π_ref instead, continuing movie-review prefixes that VADER scores,
   `frontier_movies.py`);
2. k completions per training prompt sampled from π_ref, best and worst by the ground-truth sentiment reward
   (`trl_dpo_ext.build_preference_pairs`);
3. methods, each at several settings, each training LoRA on the same 4-bit base: `trl_dpo_ext.DPOTrainer` (several
   β), iterative DPO (`trl_dpo_ext.IterativeDPOTrainer`: R rounds, each sampling the next 1/R of the training prompts
   from the current policy, so its pairs, steps and generated tokens are those of one offline DPO run), TRL's
   `RLOOTrainer` maximising the ground-truth reward minus `beta`·KL (several `beta`), and Preferred-FT (TRL's
   `SFTTrainer` on the chosen completions);
4. every run is evaluated on held-out prompts halfway and at the end (iterative DPO: after each round): completions
   sampled at temperature 1 give the mean reward and the sequence-level KL(π‖π_ref); wall time and generated tokens
   are counted up to that point. Best-of-k needs no training: k samples from π_ref, the best kept; its reward is
   estimated from `bok_samples` samples per prompt, its KL is the bound log k − (k−1)/k (Beirami et al. 2024);
5. per seed, `seed-N/frontier.json`; over the seeds, `frontier.png`, `frontier.csv`, `frontier.json` and
   `frontier.md` in `--out` (see `frontier_report.py`), error bars ± one standard error over the seeds.

A seed drives everything after π_ref: pair sampling, LoRA initialisation, data order, RLOO's rollouts, the
evaluation's samples. The corpus, the prompts and the SFT model come from `data_seed` and are the same for every seed.
`--jobs N` runs N seeds at once, one thread each (`--threads`). Models and trainer outputs live in a temporary
directory.
"""

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase, TrainerCallback, set_seed  # noqa: E402

from benchmarks import frontier_movies, frontier_task  # noqa: E402
from benchmarks.frontier_report import aggregate_seeds, environment, mean, sem, write_outputs  # noqa: E402
from benchmarks.results_io import command, write_json  # noqa: E402
from trl_dpo_ext import DPOConfig, DPOTrainer, build_preference_pairs, load_qlora_model  # noqa: E402
from trl_dpo_ext.iterative import IterativeDPOConfig, IterativeDPOTrainer  # noqa: E402
from trl_dpo_ext.models import mask_pad_id  # noqa: E402
from trl_dpo_ext.sampling import SamplingConfig, generate, generation_model  # noqa: E402
from trl_dpo_ext.smollm2 import smollm2_path  # noqa: E402
from trl_dpo_ext.tiny_model import build_tokenizer, tiny_llama_config  # noqa: E402


DEFAULT_OUT = Path(__file__).parent / "results" / "frontier"
# A task is its prompts and its ground-truth reward: `split_prompts(n_train, n_heldout, seed)` and
# `sentiment_reward(prompt, completion)`.
# "products": the toy grammar and its 20-word lexicon; "movies": movie-review prefixes scored by VADER.
TASKS = {"products": frontier_task, "movies": frontier_movies}


@dataclass
class Settings:
    """Sizes and hyperparameters of one mode. Every method trains the same LoRA (rank `lora_r`, all linear layers)."""

    corpus_size: int  # SFT reviews
    sft_epochs: float
    train_prompts: int  # prompts for the pairs, and RLOO's prompts
    heldout_prompts: int
    eval_samples: int  # completions per held-out prompt
    dpo_betas: tuple[float, ...]
    dpo_epochs: float
    rloo_betas: tuple[float, ...]
    rloo_epochs: float  # passes over the training prompts, k rollouts each
    pft_learning_rates: tuple[float, ...]
    pft_epochs: float
    iterative_betas: tuple[float, ...]
    iterative_rounds: int  # each round samples the next 1/R of the training prompts
    bok_ks: tuple[int, ...] = (2, 4, 8, 16)  # best-of-k
    bok_samples: int = 32  # samples per held-out prompt from π_ref, from which every best-of-k reward is estimated
    model: str = "tiny"  # "tiny": the SFT model trained here; "smollm2": SmolLM2-135M-Instruct
    task: str = "products"  # prompts and reward: `TASKS`
    k: int = 4  # completions per prompt: the pairs' candidates and RLOO's group size
    max_new_tokens: int = 24
    dpo_learning_rate: float = 5e-3  # the DPO recipe's rate for the tiny model
    rloo_learning_rate: float = 2e-3  # 5e-3 collapsed or drifted in a pilot; see docs/frontier.md
    batch_size: int = 16  # pairs (DPO), rows (Preferred-FT), completions per optimizer step (RLOO)
    lora_r: int = 16
    data_seed: int = 0  # the corpus, the prompts, the SFT model: the same π_ref and prompts for every seed
    seed: int = 0  # everything after π_ref


FULL = Settings(
    corpus_size=6000,
    sft_epochs=2,
    train_prompts=2048,
    heldout_prompts=128,
    eval_samples=8,
    dpo_betas=(0.3, 1.0, 3.0, 10.0),  # a pilot's β=0.1 ended at KL ≈ 39 for reward 0.60
    dpo_epochs=1,
    rloo_betas=(0.01, 0.03, 0.1),
    rloo_epochs=1,
    pft_learning_rates=(5e-3, 1e-2),
    pft_epochs=2,
    iterative_betas=(1.0, 3.0, 10.0),
    iterative_rounds=3,
)
# Sized so that DPO's gain over π_ref clears twice the evaluation's noise (tests/test_frontier.py): 0.062 against 0.030
# measured; at 384 prompts and 48 held-out ones it was 0.034 against 0.036.
QUICK = Settings(
    corpus_size=1500,
    sft_epochs=2,
    train_prompts=768,
    heldout_prompts=64,
    eval_samples=8,
    dpo_betas=(1.0,),
    dpo_epochs=2,
    rloo_betas=(0.03,),
    rloo_epochs=0.125,
    pft_learning_rates=(5e-3,),
    pft_epochs=1,
    iterative_betas=(1.0,),
    iterative_rounds=2,
    bok_ks=(2, 4),
    bok_samples=8,
)
# The paper's experiment with real parts (`--task movies`, issue #31): SmolLM2-135M-Instruct as π_ref (4-bit NF4 +
# LoRA, as the recipes run it), movie-review prefixes, VADER's sentiment as the reward (`frontier_movies.py`). Sized
# for the 2-core CPU, 3 seeds at once (one thread each): 73 min measured. One-seed pilots (2 threads) set the rates:
# DPO β = 0.1 at lr 1e-3 ran to KL ≈ 15 nats in 47 steps, at 3e-4 to 1.0 nats in 31 (margins 0.08: β never binds),
# so lr 1e-3 with β large enough to stop the drift; RLOO at lr 1e-3, β = 0.1 moved 0.9 nats in 24 steps.
MOVIES = Settings(
    corpus_size=0,
    sft_epochs=0,
    train_prompts=256,
    heldout_prompts=32,
    eval_samples=4,
    dpo_betas=(0.3, 1.0, 3.0),
    dpo_epochs=1,
    rloo_betas=(0.03,),
    rloo_epochs=1,  # 4 rollouts for each of the 256 prompts: as many samples as the pairs took
    pft_learning_rates=(),
    pft_epochs=0,
    iterative_betas=(1.0,),
    iterative_rounds=2,
    bok_ks=(2, 4, 8, 16),
    bok_samples=16,
    model="smollm2",
    task="movies",
    max_new_tokens=16,
    dpo_learning_rate=1e-3,
    rloo_learning_rate=1e-3,
    batch_size=8,
)
# Its CI form (tests/test_frontier.py): every method's pipeline on SmolLM2 and VADER, a few steps each.
MOVIES_QUICK = replace(
    MOVIES,
    train_prompts=16,
    heldout_prompts=2,
    eval_samples=2,
    dpo_betas=(0.1,),
    rloo_betas=(0.1,),
    rloo_epochs=0.5,
    iterative_betas=(0.1,),
    bok_ks=(2,),
    bok_samples=2,
    max_new_tokens=12,
    batch_size=4,
)


def common_args(output_dir: Path, s: Settings, learning_rate: float) -> dict:
    """TrainingArguments shared by every trainer here: CPU-safe (no bf16, no checkpointing), quiet, seeded."""
    return dict(
        output_dir=str(output_dir),
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=50,
        disable_tqdm=True,
        seed=s.seed,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=5,
    )


def train_sft_model(corpus: list[str], path: Path, s: Settings) -> Path:
    """Train a BPE tokenizer and a tiny Llama from scratch on the corpus (full training, fp32); save both to `path`."""
    tokenizer = build_tokenizer(corpus, vocab_size=512)
    config = tiny_llama_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    set_seed(s.data_seed)
    args = trl.SFTConfig(
        **{**common_args(path / "trainer", s, learning_rate=3e-3), "warmup_steps": 20, "seed": s.data_seed},
        num_train_epochs=s.sft_epochs,
        per_device_train_batch_size=32,
        max_length=64,
    )
    trainer = trl.SFTTrainer(
        model=LlamaForCausalLM(config),
        args=args,
        train_dataset=Dataset.from_dict({"text": corpus}),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(str(path))
    tokenizer.save_pretrained(path)
    return path


def load_policy(sft_path: Path, s: Settings) -> PeftModel:
    """π: a fresh LoRA on the 4-bit SFT base. LoRA's B starts at 0, so π = π_ref until training moves it."""
    set_seed(s.seed)
    lora = LoraConfig(r=s.lora_r, lora_alpha=2 * s.lora_r, lora_dropout=0.0, target_modules="all-linear")
    return load_qlora_model(str(sft_path), lora, compute_dtype="float32")


def counting_reward(
    reward: Callable[[str, str], float], tokenizer: PreTrainedTokenizerBase, counter: dict[str, int]
) -> Callable[..., list[float]]:
    """
    The ground-truth `reward(prompt, completion)` as both the pair builder (`reward_fn(prompts, completions)`) and
    TRL's RLOO (keyword arguments) call it; it adds the number of tokens of the sampled completions (re-tokenized text,
    stop token not counted) to `counter["tokens"]`, so both methods' generation is counted the same way.
    """

    def sentiment(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        counter["tokens"] += sum(map(len, tokenizer(completions, add_special_tokens=False).input_ids))
        return [reward(p, c) for p, c in zip(prompts, completions)]

    return sentiment


@torch.no_grad()
def evaluate(model: PeftModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], s: Settings) -> dict:
    """
    Mean reward and sequence-level KL(π‖π_ref) on `prompts`, `s.eval_samples` completions each, sampled from π at
    temperature 1 with no top-k/top-p, so that Σ_t [log π(y_t|·) − log π_ref(y_t|·)] over a sampled completion (stop
    token included) is an unbiased estimate of the KL. π is `model` with its adapter on, π_ref the same 4-bit base with
    adapters off. Returns the means and their standard errors over the samples.
    """
    torch.manual_seed(s.seed)  # torch's RNG only: the probe forks it, so training's stream is untouched
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rewards, kls = [], []
    # Sampled from the dense copy of π (4-bit base dequantized, LoRA merged: the same function up to rounding), as the
    # pairs and iterative DPO's rounds are: bitsandbytes' CPU layers dequantize every weight again for each new token.
    # The log-probs below come from the 4-bit model itself.
    with generation_model(model) as sampler:
        samples = []
        for start in range(0, len(prompts), 16):
            chunk = prompts[start : start + 16]
            ids = [tokenizer(p, add_special_tokens=False).input_ids for p in chunk]
            width = max(map(len, ids))
            prompt_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids]).repeat_interleave(s.eval_samples, 0)
            prompt_mask = (prompt_ids != pad).long()
            out = sampler.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                max_new_tokens=s.max_new_tokens,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            samples.append((chunk, prompt_mask, width, out))
    for chunk, prompt_mask, width, out in samples:
        completion = out[:, width:]
        # The completion is every token up to and including the first stop token; `generate` pads after it.
        is_eos = (completion == eos).long()
        completion_mask = (is_eos.cumsum(1) - is_eos == 0).long()
        attention = torch.cat([prompt_mask, completion_mask], dim=1)
        # Left padding: positions must count real tokens only, as `generate` counted them.
        position_ids = (attention.cumsum(1) - 1).clamp(min=0)
        policy = completion_logps(model, out, attention, position_ids, width)
        with model.disable_adapter():
            reference = completion_logps(model, out, attention, position_ids, width)
        kls += ((policy - reference) * completion_mask).sum(1).tolist()
        texts = tokenizer.batch_decode(completion.masked_fill(completion_mask == 0, pad), skip_special_tokens=True)
        repeated = [p for p in chunk for _ in range(s.eval_samples)]
        rewards += [TASKS[s.task].sentiment_reward(p, c) for p, c in zip(repeated, texts)]
    return {"reward": mean(rewards), "reward_sem": sem(rewards), "kl": mean(kls), "kl_sem": sem(kls)}


def completion_logps(model, input_ids, attention_mask, position_ids, width: int) -> torch.Tensor:
    """log p(token) of every token after the first `width` (the completion), from one plain forward."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logps = torch.log_softmax(logits[:, width - 1 : -1].float(), dim=-1)
    return logps.gather(-1, input_ids[:, width:, None]).squeeze(-1)


class FrontierProbe(TrainerCallback):
    """
    Evaluates π halfway through training and at the last step, or (`rounds` given, iterative DPO) at the last step of
    each round. The evaluation's time is kept out of the training wall time, and its sampling out of the
    training's random stream (it runs in a forked RNG).

    Args:
        evaluate: `model -> metrics`, e.g. [`evaluate`] with the held-out prompts bound.
        counter: tokens generated so far by the method itself (RLOO's rollouts, iterative DPO's rounds).
        rounds: `None` for one training run; the number of rounds (one `train()` each) for iterative DPO.
    """

    def __init__(self, evaluate: Callable[[PeftModel], dict], counter: dict[str, int], rounds: int | None = None):
        self.evaluate = evaluate
        self.counter = counter
        self.rounds = rounds
        self.started = time.perf_counter()  # before the trainer is built: its dataset preparation counts too
        self.eval_seconds = 0.0
        self.steps_before = 0  # steps of the finished rounds
        self.points: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        last = state.global_step == state.max_steps
        if self.rounds is not None:
            if not last:
                return
            round_ = len(self.points) + 1
            checkpoint, final = f"round {round_}", round_ == self.rounds
        elif state.global_step == state.max_steps // 2 and not last:
            checkpoint, final = "half", False
        elif last:
            checkpoint, final = "end", True
        else:
            return
        clock = time.perf_counter()
        with torch.random.fork_rng():
            metrics = self.evaluate(model)
        model.train()
        self.points.append(
            {
                "checkpoint": checkpoint,
                "final": final,
                "step": self.steps_before + state.global_step,
                "train_seconds": clock - self.started - self.eval_seconds,
                "train_gen_tokens": self.counter["tokens"],
                **metrics,
            }
        )
        if last:
            self.steps_before += state.global_step
        self.eval_seconds += time.perf_counter() - clock


def fp32_adapters(trainer) -> None:
    """
    Keep the LoRA weights in float32. TRL's trainers cast adapters on a 4-bit base to bfloat16 (the QLoRA paper's GPU
    setting); on this CPU run the 4-bit matmuls compute in float32 and bf16 adapter math made every step about twice
    as slow. Done for every method alike, before `train()` builds the optimizer.
    """
    from trl_dpo_ext.models import cast_adapter_weights

    cast_adapter_weights(trainer.model, torch.float32)


def train_and_probe(make_trainer: Callable[[list], object], evaluate, counter: dict, rounds=None) -> list[dict]:
    """Build a trainer with a [`FrontierProbe`], train it, and return the probe's points."""
    probe = FrontierProbe(evaluate, counter, rounds)
    trainer = make_trainer([probe])
    fp32_adapters(trainer)
    trainer.train()
    return probe.points


def expected_best_of_k(scores: list[float], k: int) -> float:
    """
    The unbiased estimate of E[max of k draws] from N ≥ k samples: the mean, over all k-subsets of the samples, of
    the subset's best, Σ_i C(i−1, k−1) / C(N, k) · r_(i) with r_(1) ≤ … ≤ r_(N) (r_(i) is a subset's best in
    C(i−1, k−1) of the C(N, k) subsets).
    """
    n = len(scores)
    if not 1 <= k <= n:
        raise ValueError(f"best-of-{k} needs 1 <= k <= the {n} samples")
    return sum(math.comb(i, k - 1) * r for i, r in enumerate(sorted(scores))) / math.comb(n, k)


@torch.no_grad()
def best_of_k(reference: PeftModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], s: Settings) -> list[dict]:
    """
    Best-of-k from π_ref for every k in `s.bok_ks`, from `s.bok_samples` samples per held-out prompt (temperature 1).

    Reward: for each prompt, [`expected_best_of_k`] of its N samples; then the mean over prompts ± its standard
    error. KL: log k − (k−1)/k, the bound on KL(best-of-k ‖ π_ref) (Beirami et al. 2024; equal without ties).
    Cost: no training; k samples per query at inference.
    """
    clock, n = time.perf_counter(), s.bok_samples
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    per_prompt, tokens = [], 0
    settings = SamplingConfig(
        num_samples=n, max_new_tokens=s.max_new_tokens, temperature=1.0, batch_size=max(1, 64 // n), seed=s.seed
    )
    with generation_model(reference) as sampler:
        batches = generate(sampler, tokenizer, ids, settings)
        pad = mask_pad_id(tokenizer, sampler)
        for query_responses, context in batches:
            responses = [r[r != pad] for r in query_responses[:, context:]]
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            tokens += sum(map(len, tokenizer(texts, add_special_tokens=False).input_ids))  # as `counting_reward`
            for row in range(len(texts) // n):  # the batch's prompts in order, n completions each
                prompt = prompts[len(per_prompt)]
                per_prompt.append([TASKS[s.task].sentiment_reward(prompt, c) for c in texts[row * n : (row + 1) * n]])
    seconds = time.perf_counter() - clock
    points = []
    for k in s.bok_ks:
        rewards = [expected_best_of_k(scores, k) for scores in per_prompt]
        points.append(
            {
                "method": "best-of-k",
                "setting": f"k={k}",
                "checkpoint": "end",
                "final": True,
                "step": 0,
                "reward": mean(rewards),
                "reward_sem": sem(rewards),
                "kl": math.log(k) - (k - 1) / k,
                "kl_sem": 0.0,
                "train_seconds": 0.0,
                "train_gen_tokens": 0,
                "data_seconds": 0.0,
                "data_gen_tokens": 0,
                "samples_per_query": k,
                # What sampling k per held-out query cost here, from the N-per-prompt run's time and tokens.
                "inference_seconds": seconds * k / n,
                "inference_gen_tokens": round(tokens * k / n),
            }
        )
    return points


def load_tokenizer_and_pi_ref(s: Settings, work: Path) -> tuple[Path, float]:
    """The π_ref checkpoint: the SFT model trained here on the corpus, or SmolLM2 converted once from its GGUF."""
    clock = time.perf_counter()
    if s.model == "smollm2":
        return smollm2_path(), 0.0
    path = train_sft_model(frontier_task.make_corpus(s.corpus_size, seed=s.data_seed), work / "sft", s)
    return path, time.perf_counter() - clock


def run_seed(s: Settings) -> dict:
    """Every method at every setting for one seed: the points, the pairs' statistics and timings."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="frontier-") as tmp:
        work = Path(tmp)
        sft_path, sft_seconds = load_tokenizer_and_pi_ref(s, work)
        tokenizer = AutoTokenizer.from_pretrained(sft_path)
        task = TASKS[s.task]
        train_prompts, heldout = task.split_prompts(s.train_prompts, s.heldout_prompts, seed=s.data_seed)

        def held_out(model: PeftModel) -> dict:
            return evaluate(model, tokenizer, heldout, s)

        reference = load_policy(sft_path, s)
        points = [{"method": "SFT", "setting": "π_ref", "checkpoint": "end", "final": True, "step": 0}]
        points[0].update(held_out(reference))
        report(points[-1])
        for point in best_of_k(reference, tokenizer, heldout, s):
            points.append(point)
            report(point)

        # The paper's pipeline: k samples per prompt from π_ref, best and worst by the ground-truth reward. Sampled
        # from the dense copy of π_ref, as iterative DPO's rounds sample from the dense copy of the policy.
        clock, counter = time.perf_counter(), {"tokens": 0}
        with generation_model(reference) as sampler:
            pairs = build_preference_pairs(
                sampler,
                tokenizer,
                train_prompts,
                reward_fn=counting_reward(task.sentiment_reward, tokenizer, counter),
                k=s.k,
                max_new_tokens=s.max_new_tokens,
                temperature=1.0,  # sample π_ref itself, as RLOO and the evaluation do
                batch_size=16,
                seed=s.seed,
            )
        data = {"data_seconds": time.perf_counter() - clock, "data_gen_tokens": counter["tokens"]}
        del reference
        preferences = pairs.select_columns(["prompt", "chosen", "rejected"])
        chosen = pairs.select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")
        no_data = {"data_seconds": 0.0, "data_gen_tokens": 0}

        runs = []  # (method, setting, make_trainer, generation counter, data cost, rounds)
        for beta in s.dpo_betas:
            args = DPOConfig(
                **common_args(work / f"dpo-{beta}", s, s.dpo_learning_rate),
                beta=beta,
                num_train_epochs=s.dpo_epochs,
                per_device_train_batch_size=s.batch_size,
                max_length=128,
            )
            make = lambda callbacks, args=args: DPOTrainer(  # noqa: E731
                model=load_policy(sft_path, s),
                args=args,
                train_dataset=preferences,
                processing_class=tokenizer,
                callbacks=callbacks,
            )
            runs.append(("DPO", f"β={beta}", make, {"tokens": 0}, data, None))
        for beta in s.iterative_betas:
            counter = {"tokens": 0}
            args = IterativeDPOConfig(
                **common_args(work / f"iterative-{beta}", s, s.dpo_learning_rate),
                beta=beta,
                num_train_epochs=s.dpo_epochs,
                per_device_train_batch_size=s.batch_size,
                max_length=128,
                num_rounds=s.iterative_rounds,
                num_samples=s.k,
                max_new_tokens=s.max_new_tokens,
                temperature=1.0,
                generation_batch_size=16,
                prompts_per_round=len(train_prompts) // s.iterative_rounds,
            )
            make = lambda callbacks, args=args, counter=counter: IterativeDPOTrainer(  # noqa: E731
                load_policy(sft_path, s),
                args,
                train_prompts,
                tokenizer,
                reward_fn=counting_reward(task.sentiment_reward, tokenizer, counter),
                callbacks=callbacks,
            )
            runs.append(("iterative DPO", f"β={beta}", make, counter, no_data, s.iterative_rounds))
        for beta in s.rloo_betas:
            counter = {"tokens": 0}
            args = trl.RLOOConfig(
                **common_args(work / f"rloo-{beta}", s, s.rloo_learning_rate),
                beta=beta,
                num_generations=s.k,
                max_completion_length=s.max_new_tokens,
                temperature=1.0,
                num_train_epochs=s.rloo_epochs,
                per_device_train_batch_size=s.batch_size,
                # Sample 4 optimizer steps' worth at once: one `generate` for 64 costs little more than for 16.
                generation_batch_size=4 * s.batch_size,
            )
            make = lambda callbacks, args=args, counter=counter: trl.RLOOTrainer(  # noqa: E731
                model=load_policy(sft_path, s),
                reward_funcs=counting_reward(task.sentiment_reward, tokenizer, counter),
                args=args,
                train_dataset=Dataset.from_dict({"prompt": train_prompts}),
                processing_class=tokenizer,
                callbacks=callbacks,
            )
            runs.append(("RLOO", f"β={beta}", make, counter, no_data, None))
        for learning_rate in s.pft_learning_rates:
            args = trl.SFTConfig(
                **common_args(work / f"pft-{learning_rate}", s, learning_rate),
                num_train_epochs=s.pft_epochs,
                per_device_train_batch_size=s.batch_size,
                max_length=128,
            )
            make = lambda callbacks, args=args: trl.SFTTrainer(  # noqa: E731
                model=load_policy(sft_path, s),
                args=args,
                train_dataset=chosen,
                processing_class=tokenizer,
                callbacks=callbacks,
            )
            runs.append(("Preferred-FT", f"lr={learning_rate:g}", make, {"tokens": 0}, data, None))

        for method, setting, make, counter, data_cost, rounds in runs:
            for point in train_and_probe(make, held_out, counter, rounds):
                points.append({"method": method, "setting": setting, **point, **data_cost})
                report(points[-1])

    return {
        "seed": s.seed,
        "pairs": {
            "count": len(pairs),
            "prompts": len(train_prompts),
            "score_chosen": mean(pairs["score_chosen"]),
            "score_rejected": mean(pairs["score_rejected"]),
            **data,
        },
        "sft_seconds": sft_seconds,
        "total_seconds": time.perf_counter() - started,
        "points": points,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast run of the same pipeline (CI)")
    parser.add_argument(
        "--task",
        choices=sorted(TASKS),
        default="products",
        help="products: the toy grammar and lexicon, a tiny π_ref trained here; movies: SmolLM2 as π_ref, "
        "movie-review prefixes, VADER's sentiment (issue #31)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: 0 1 2; --quick: 0)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once, each in its own 1-thread process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per seed's process (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="where the PNG/CSV/JSON/markdown go")
    parser.add_argument(
        "--report_only", action="store_true", help="rewrite the outputs in --out from its seed-N/seed.json files"
    )
    cli = parser.parse_args(argv)
    if cli.task == "movies":
        mode = "movies_quick" if cli.quick else "movies"
    else:
        mode = "quick" if cli.quick else "full"
    base = {"quick": QUICK, "full": FULL, "movies": MOVIES, "movies_quick": MOVIES_QUICK}[mode]
    seeds = cli.seeds or ([0] if cli.quick else [0, 1, 2])
    out = cli.out or DEFAULT_OUT.with_name("frontier" if mode == "full" else f"frontier_{mode}")
    if len(set(seeds)) != len(seeds) or cli.jobs < 1:
        parser.error(f"--seeds must be distinct and --jobs >= 1, got seeds {seeds} and jobs {cli.jobs}")
    if cli.report_only:  # the run's own record (command, wall time, machine) and its seeds' points, re-reported
        results = json.loads((out / "frontier.json").read_text())
        # A run of several seeds keeps each in seed-N/; a one-seed run writes its seed.json beside its outputs.
        files = [out / f"seed-{seed}" / "seed.json" for seed in results["seeds"]] if len(results["seeds"]) > 1 else []
        per_seed = [json.loads(f.read_text()) for f in files or [out / "seed.json"]]
        results.update(aggregate_seeds(per_seed))
        write_outputs(results, out)
        return results
    TASKS[base.task].sentiment_reward("", "")  # a missing reward package fails here, not after the model loads
    transformers.logging.set_verbosity_error()
    logging.getLogger("trl_dpo_ext").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    # One thread by default: the tiny model is so small that every step is overhead-bound, and on a shared 2-core
    # machine a second OpenMP thread spin-waits behind other processes (a 5-10x slowdown measured here).
    torch.set_num_threads(cli.threads)
    started = time.perf_counter()

    out.mkdir(parents=True, exist_ok=True)
    if len(seeds) == 1:
        per_seed = [run_seed(replace(base, seed=seeds[0]))]
        write_json(out / "seed.json", per_seed[0])  # what a parent run of several seeds reads back
    else:  # one process per seed, `--jobs` at a time, each in OUT/seed-N
        per_seed = run_seed_processes(cli, seeds, out)
    results = {
        "mode": mode,
        "command": command("frontier", *(argv if argv is not None else sys.argv[1:])),
        "settings": asdict(replace(base, seed=seeds[0])) | {"seed": seeds},
        "seeds": seeds,
        "jobs": cli.jobs,
        "total_seconds": time.perf_counter() - started,
        "environment": environment(),
        **aggregate_seeds(per_seed),
    }
    write_outputs(results, out)
    print(f"Wrote {out}/frontier.{{png,csv,json,md}} in {results['total_seconds']:.0f} s", flush=True)
    return results


def run_seed_processes(cli: argparse.Namespace, seeds: list[int], out: Path) -> list[dict]:
    """
    Run each seed as `python -m benchmarks.frontier --seeds N --out OUT/seed-N` (log: OUT/seed-N.log), `cli.jobs` at
    a time.
    """
    mode = ["--task", cli.task] + (["--quick"] if cli.quick else [])
    pending, running = list(seeds), []
    while pending or running:
        while pending and len(running) < cli.jobs:
            seed = pending.pop(0)
            seed_command = [sys.executable, "-m", "benchmarks.frontier", *mode, "--seeds", str(seed)]
            seed_command += ["--threads", str(cli.threads), "--out", str(out / f"seed-{seed}")]
            log = (out / f"seed-{seed}.log").open("w")
            running.append((seed, subprocess.Popen(seed_command, stdout=log, stderr=subprocess.STDOUT), log))
        for item in list(running):
            seed, process, log = item
            if process.poll() is None:
                continue
            log.close()
            running.remove(item)
            if process.returncode != 0:
                for _, other, _ in running:
                    other.kill()
                raise RuntimeError(f"seed {seed} failed (exit {process.returncode}): see {out}/seed-{seed}.log")
            print(f"seed {seed} done", flush=True)
        time.sleep(1)
    return [json.loads((out / f"seed-{seed}" / "seed.json").read_text()) for seed in seeds]


def report(point: dict) -> None:
    print(
        f"{point['method']:>13} {point['setting']:>9} {point['checkpoint']:>7} step {point['step']:>4} "
        f"reward {point['reward']:.3f} ± {point['reward_sem']:.3f}  KL {point['kl']:6.2f} ± {point['kl_sem']:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
