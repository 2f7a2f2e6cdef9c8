"""The DPO paper's reward-vs-KL experiment (Rafailov et al. 2023, Sec. 6.1, Fig. 2 left), small, offline, on a CPU.

    python benchmarks/frontier.py                           # full mode: writes benchmarks/results/frontier/
    python benchmarks/frontier.py --quick --out /tmp/frontier   # a small smoke run of the same pipeline

Pipeline, top to bottom:
1. a synthetic review corpus (`frontier_task.py`) → a locally trained BPE tokenizer and a tiny Llama trained on it
   from scratch with TRL's `SFTTrainer`: the SFT model. Loaded in 4-bit NF4, it is π_ref for every method;
2. k completions per training prompt sampled from π_ref, best and worst by the ground-truth sentiment reward
   (`trl_dpo_ext.build_preference_pairs`);
3. methods, each at several settings, each training LoRA on the same 4-bit base: `trl_dpo_ext.DPOTrainer` (several
   β), TRL's `RLOOTrainer` maximising the ground-truth reward minus `beta`·KL (several `beta`), and Preferred-FT (TRL's
   `SFTTrainer` on the chosen completions);
4. every run is evaluated halfway and at the end on held-out prompts: completions sampled at temperature 1 give the
   mean reward and the sequence-level KL(π‖π_ref); wall time and generated tokens are counted up to that point;
5. `frontier.png`, `frontier.csv`, `frontier.json` and `frontier.md` in `--out` (see `frontier_report.py`).

Seeds are fixed. Models and trainer outputs live in a temporary directory that is removed at the end.
"""

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase, TrainerCallback, set_seed  # noqa: E402

from trl_dpo_ext import DPOConfig, DPOTrainer, build_preference_pairs, load_qlora_model  # noqa: E402
from trl_dpo_ext.defaults import build_tokenizer, tiny_llama_config  # noqa: E402


sys.path.insert(0, str(Path(__file__).parent))
from frontier_report import environment, write_outputs  # noqa: E402
from frontier_task import make_corpus, make_prompts, sentiment_reward  # noqa: E402


DEFAULT_OUT = Path(__file__).parent / "results" / "frontier"


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
    k: int = 4  # completions per prompt: the pairs' candidates and RLOO's group size
    max_new_tokens: int = 24
    dpo_learning_rate: float = 5e-3  # the DPO recipe's rate for the tiny model
    rloo_learning_rate: float = 2e-3  # 5e-3 collapsed or drifted in a pilot; see docs/frontier.md
    batch_size: int = 16  # pairs (DPO), rows (Preferred-FT), completions per optimizer step (RLOO)
    lora_r: int = 16
    seed: int = 0


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
)
QUICK = Settings(
    corpus_size=1500,
    sft_epochs=2,
    train_prompts=384,
    heldout_prompts=48,
    eval_samples=8,
    dpo_betas=(1.0,),
    dpo_epochs=2,
    rloo_betas=(0.03,),
    rloo_epochs=0.25,
    pft_learning_rates=(5e-3,),
    pft_epochs=1,
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
    set_seed(s.seed)
    args = trl.SFTConfig(
        **{**common_args(path / "trainer", s, learning_rate=3e-3), "warmup_steps": 20},
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


def counting_reward(tokenizer: PreTrainedTokenizerBase, counter: dict[str, int]) -> Callable[..., list[float]]:
    """
    The ground-truth reward as both the pair builder (`reward_fn(prompts, completions)`) and TRL's RLOO (keyword
    arguments) call it; it adds the number of tokens of the sampled completions (re-tokenized text, stop token not
    counted) to `counter["tokens"]`, so both methods' generation is counted the same way.
    """

    def sentiment(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        counter["tokens"] += sum(map(len, tokenizer(completions, add_special_tokens=False).input_ids))
        return [sentiment_reward(p, c) for p, c in zip(prompts, completions)]

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
    for start in range(0, len(prompts), 16):
        chunk = prompts[start : start + 16]
        ids = [tokenizer(p, add_special_tokens=False).input_ids for p in chunk]
        width = max(map(len, ids))
        prompt_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids]).repeat_interleave(s.eval_samples, 0)
        prompt_mask = (prompt_ids != pad).long()
        out = model.generate(
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
        rewards += [sentiment_reward(p, c) for p, c in zip([p for p in chunk for _ in range(s.eval_samples)], texts)]
    return {"reward": mean(rewards), "reward_sem": sem(rewards), "kl": mean(kls), "kl_sem": sem(kls)}


def completion_logps(model, input_ids, attention_mask, position_ids, width: int) -> torch.Tensor:
    """log p(token) of every token after the first `width` (the completion), from one plain forward."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logps = torch.log_softmax(logits[:, width - 1 : -1].float(), dim=-1)
    return logps.gather(-1, input_ids[:, width:, None]).squeeze(-1)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def sem(values: list[float]) -> float:
    """Standard error of the mean."""
    m = mean(values)
    return (sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5


class FrontierProbe(TrainerCallback):
    """
    Evaluates π halfway through training and at the last step. The evaluation's time is kept out of the training
    wall time, and its sampling out of the training's random stream (it runs in a forked RNG).

    Args:
        evaluate: `model -> metrics`, e.g. [`evaluate`] with the held-out prompts bound.
        counter: tokens generated so far by the method itself (RLOO's rollouts); read at each evaluation.
    """

    def __init__(self, evaluate: Callable[[PeftModel], dict], counter: dict[str, int]):
        self.evaluate = evaluate
        self.counter = counter
        self.started = time.perf_counter()  # before the trainer is built: its dataset preparation counts too
        self.eval_seconds = 0.0
        self.points: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step not in (state.max_steps // 2, state.max_steps):
            return
        clock = time.perf_counter()
        with torch.random.fork_rng():
            metrics = self.evaluate(model)
        model.train()
        self.points.append(
            {
                "step": state.global_step,
                "max_steps": state.max_steps,
                "train_seconds": clock - self.started - self.eval_seconds,
                "train_gen_tokens": self.counter["tokens"],
                **metrics,
            }
        )
        self.eval_seconds += time.perf_counter() - clock


def fp32_adapters(trainer) -> None:
    """
    Keep the LoRA weights in float32. TRL's trainers cast adapters on a 4-bit base to bfloat16 (the QLoRA paper's GPU
    setting); on this CPU run the 4-bit matmuls compute in float32 and bf16 adapter math made every step about twice
    as slow. Done for every method alike, before `train()` builds the optimizer.
    """
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def train_and_probe(make_trainer: Callable[[list], transformers.Trainer], evaluate, counter: dict) -> list[dict]:
    """Build a trainer with a [`FrontierProbe`], train it, and return the probe's points."""
    probe = FrontierProbe(evaluate, counter)
    trainer = make_trainer([probe])
    fp32_adapters(trainer)
    trainer.train()
    return probe.points


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast run of the same pipeline (CI)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the PNG/CSV/JSON/markdown go")
    cli = parser.parse_args(argv)
    s = QUICK if cli.quick else FULL
    transformers.logging.set_verbosity_error()
    logging.getLogger("trl_dpo_ext").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    # One thread: the model is so small that every step is overhead-bound, and on a shared 2-core machine a second
    # OpenMP thread spin-waits behind other processes (a 5-10x slowdown measured here).
    torch.set_num_threads(1)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="frontier-") as tmp:
        work = Path(tmp)
        clock = time.perf_counter()
        sft_path = train_sft_model(make_corpus(s.corpus_size, seed=s.seed), work / "sft", s)
        sft_seconds = time.perf_counter() - clock
        tokenizer = AutoTokenizer.from_pretrained(sft_path)
        train_prompts = make_prompts(s.train_prompts, seed=s.seed + 1)
        heldout = make_prompts(s.heldout_prompts, seed=s.seed + 2, exclude=set(train_prompts))

        def held_out(model: PeftModel) -> dict:
            return evaluate(model, tokenizer, heldout, s)

        reference = load_policy(sft_path, s)
        points = [{"method": "SFT", "setting": "π_ref", "step": 0, "max_steps": 0, **held_out(reference)}]
        report(points[-1])

        # The paper's pipeline: k samples per prompt from π_ref, best and worst by the ground-truth reward.
        clock, counter = time.perf_counter(), {"tokens": 0}
        pairs = build_preference_pairs(
            reference,
            tokenizer,
            train_prompts,
            reward_fn=counting_reward(tokenizer, counter),
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

        runs = []
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
            runs.append(("DPO", f"β={beta}", make, {"tokens": 0}, data))
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
                reward_funcs=counting_reward(tokenizer, counter),
                args=args,
                train_dataset=Dataset.from_dict({"prompt": train_prompts}),
                processing_class=tokenizer,
                callbacks=callbacks,
            )
            runs.append(("RLOO", f"β={beta}", make, counter, {"data_seconds": 0.0, "data_gen_tokens": 0}))
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
            runs.append(("Preferred-FT", f"lr={learning_rate:g}", make, {"tokens": 0}, data))

        for method, setting, make, counter, data_cost in runs:
            for point in train_and_probe(make, held_out, counter):
                points.append({"method": method, "setting": setting, **point, **data_cost})
                report(points[-1])

    results = {
        "mode": "quick" if cli.quick else "full",
        "command": " ".join(["python", "benchmarks/frontier.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": asdict(s),
        "pairs": {
            "count": len(pairs),
            "prompts": len(train_prompts),
            "score_chosen": mean(pairs["score_chosen"]),
            "score_rejected": mean(pairs["score_rejected"]),
            **data,
        },
        "sft_seconds": sft_seconds,
        "total_seconds": time.perf_counter() - started,
        "environment": environment(),
        "points": points,
    }
    write_outputs(results, cli.out)
    print(f"Wrote {cli.out}/frontier.{{png,csv,json,md}} in {results['total_seconds']:.0f} s", flush=True)
    return results


def report(point: dict) -> None:
    print(
        f"{point['method']:>12} {point['setting']:>9} step {point['step']:>4}/{point['max_steps']:<4} "
        f"reward {point['reward']:.3f} ± {point['reward_sem']:.3f}  KL {point['kl']:6.2f} ± {point['kl_sem']:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
