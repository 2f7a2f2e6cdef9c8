"""Iterative (on-policy) DPO: rounds of sample → score → pair → DPO, on one shared 4-bit base.

Offline DPO trains on pairs sampled once, from π_ref. Iterative DPO (Xu et al. 2023, "Some things are more CRINGE than
others"; Dong et al. 2024, "RLHF Workflow"; Guo et al. 2024, online AI feedback) gives back what PPO had, on-policy
samples, at DPO's cost. Round r = 1..R:

1. the *current* policy (the base with the adapter as trained so far, adapters on) samples `num_samples` replies per
   prompt (batched `generate`);
2. a reward function or reward model scores them; the best and the worst become (chosen, rejected), ties dropped;
3. DPO trains the same adapter on that round's pairs (a fresh optimizer and schedule each round).

The reference is π_ref in every round: the base with adapters off (or the frozen copy of the starting SFT adapter),
fixed before round 1. It is never the previous round's policy, and no second model is ever loaded: one trainer, one
model, for all rounds.

On disk, under `output_dir`:

    round-1/pairs/          the round's pairs with their scores (`datasets.save_to_disk`, written atomically)
    round-1/checkpoint-N/   the round's Trainer checkpoints
    round-1/adapter/        the adapter after the round (the whole model, for full fine-tuning)
    round-1/round.json      the round's summary, written last: its presence marks the round done
    round-2/...

`train(resume_from_checkpoint=True)` skips the rounds that are done, loads the last finished round's adapter, and
resumes the first unfinished round from its newest complete checkpoint (or from its start), with the pairs it saved;
so a run killed in round r ends with the same adapter as one that never stopped.

The reference cache (`ref_cache=True`): π_ref is the same in every round, but the cache is keyed by the token ids of a
dataset, and each round samples new pairs, so each round computes its pairs' reference log-probs once (one reference
forward per pair, as a cold cache always does); what it saves is the per-step reference forward within the round, and
everything on a resumed or repeated round (same pairs, same key). Rows repeated across rounds are not shared.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_from_disk
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .atomic import atomic_dir, atomic_write
from .checkpoints import resolve_resume, resume_request
from .config import DPOConfig
from .pairs import build_preference_pairs
from .sampling import DEFAULTS, RewardFn, SamplingConfig, check_pair_samples, generation_model
from .trainer import DPOTrainer


logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
PAIRS_DIR = "pairs"
DONE_FILE = "round.json"  # the round's summary, written last: its presence marks the round done


@dataclass
class IterativeDPOConfig(DPOConfig):
    r"""
    [`trl_dpo_ext.DPOConfig`] plus the rounds. Every training setting (`max_steps`, `num_train_epochs`, the learning
    rate and its schedule) applies to each round.

    Parameters:
        num_rounds (`int`, *optional*, defaults to `2`):
            Rounds of sample → score → DPO.
        num_samples (`int`, *optional*, defaults to `4`):
            Replies sampled per prompt in each round (k); the best and the worst make the pair.
        max_new_tokens (`int`, *optional*, defaults to `64`):
            Token budget of a sampled reply.
        temperature (`float`, *optional*, defaults to `0.7`):
            Sampling temperature.
        generation_batch_size (`int`, *optional*, defaults to `16`):
            Prompts per batched `generate` call.

        (The sampling defaults are [`trl_dpo_ext.sampling.SamplingConfig`]'s, shared by every command that samples.)
        missing_eos_penalty (`float`, *optional*):
            Subtracted from the score of a reply that does not end within `max_new_tokens` (PPO's rule).
        prompts_per_round (`int`, *optional*):
            Prompts sampled per round: round r takes the next `prompts_per_round` of the prompts, in order, wrapping
            around. `None`: every prompt, every round. `len(prompts) // num_rounds` gives R rounds the pairs, steps
            and generated tokens of one offline DPO epoch over the prompts.
    """

    num_rounds: int = field(default=2, metadata={"help": "Rounds of sample -> score -> DPO."})
    num_samples: int = field(
        default=DEFAULTS.num_samples,
        metadata={"help": "Replies sampled per prompt each round; best and worst make the pair."},
    )
    max_new_tokens: int = field(default=DEFAULTS.max_new_tokens, metadata={"help": "Token budget of a sampled reply."})
    temperature: float = field(default=DEFAULTS.temperature, metadata={"help": "Sampling temperature."})
    generation_batch_size: int = field(
        default=DEFAULTS.batch_size, metadata={"help": "Prompts per batched generate call."}
    )
    missing_eos_penalty: float | None = field(
        default=DEFAULTS.missing_eos_penalty,
        metadata={"help": "Subtracted from the score of a reply that does not end within the budget."},
    )
    prompts_per_round: int | None = field(
        default=None,
        metadata={"help": "Prompts per round: the next slice of the prompts each round, wrapping around. None: all."},
    )

    def __post_init__(self):
        if self.num_rounds < 1:
            raise ValueError(f"`num_rounds` must be >= 1, got {self.num_rounds}.")
        check_pair_samples(self.num_samples, "num_samples")
        self.sampling()  # validates the sampling settings, naming this config's fields
        if self.prompts_per_round is not None and self.prompts_per_round < 1:
            raise ValueError(f"`prompts_per_round` must be >= 1 or None, got {self.prompts_per_round}.")
        if self.precompute_ref_log_probs:
            # TRL precomputes once, in the constructor, for the data it was given; each round brings new pairs.
            raise ValueError("`precompute_ref_log_probs` precomputes one dataset; with rounds, use `ref_cache=True`.")
        super().__post_init__()

    def sampling(self, round_: int = 0) -> SamplingConfig:
        """The sampling settings of round `round_`: each round its own draw (seed + round), the same one when a round
        reruns."""
        return SamplingConfig.from_flags(
            {"batch_size": "generation_batch_size"},
            num_samples=self.num_samples,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            batch_size=self.generation_batch_size,
            missing_eos_penalty=self.missing_eos_penalty,
            seed=self.seed + round_,
        )


class IterativeDPOTrainer:
    """
    Iterative DPO with one [`trl_dpo_ext.DPOTrainer`] for all rounds (see the module docstring).

    Args:
        model: the policy: a `PeftModel` on a (4-bit) base, as [`trl_dpo_ext.load_qlora_model`] returns, or any model
            `DPOTrainer` takes.
        args ([`IterativeDPOConfig`]): settings.
        prompts: the prompts sampled each round: strings, chat messages, token-id lists, or a `Dataset` with `prompt`
            or `input_ids`.
        processing_class: the tokenizer.
        reward_fn: `reward_fn(prompts, completions) -> scores` on texts, one finite score per completion.
        reward_model: a `*ForSequenceClassification` with `num_labels=1`. Pass exactly one of the two.
        ref_model: a separate reference (full fine-tuning); `None` for QLoRA, where π_ref is the shared base.
        eval_dataset: preference pairs evaluated by the trainer, as in `DPOTrainer`.
        stop_token_id: the token that ends a reply (default: the tokenizer's EOS).
        trainer_kwargs: passed on to `DPOTrainer` (`callbacks`, `optimizers`, `peft_config`, ...).
    """

    def __init__(
        self,
        model: torch.nn.Module | str,
        args: IterativeDPOConfig,
        prompts,
        processing_class: PreTrainedTokenizerBase,
        reward_fn: RewardFn | None = None,
        reward_model: PreTrainedModel | None = None,
        ref_model: torch.nn.Module | None = None,
        eval_dataset: Dataset | None = None,
        stop_token_id: int | None = None,
        **trainer_kwargs,
    ):
        if not isinstance(args, IterativeDPOConfig):
            raise TypeError(f"args must be an IterativeDPOConfig, got {type(args).__name__}")
        if (reward_fn is None) == (reward_model is None):
            raise ValueError("Pass exactly one of `reward_fn` and `reward_model`.")
        if not isinstance(prompts, Dataset):
            prompts = list(prompts)
        if args.prompts_per_round is not None and args.prompts_per_round > len(prompts):
            raise ValueError(
                f"`prompts_per_round` ({args.prompts_per_round}) exceeds the {len(prompts)} prompts: a round would "
                "sample a prompt twice."
            )
        self.args, self.prompts = args, prompts
        self.reward_fn, self.reward_model, self.stop_token_id = reward_fn, reward_model, stop_token_id
        self.output_dir = Path(args.output_dir)
        # One trainer for every round: the reference is fixed here, once (TRL would copy the then-current adapter as
        # "ref" if a trainer were built again for round 2), and the model is never loaded twice. Its first train set
        # is a placeholder pair, replaced by each round's pairs before it trains.
        self.trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=Dataset.from_list([{"prompt": "placeholder", "chosen": " a", "rejected": " b"}]),
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **trainer_kwargs,
        )
        self.tokenizer = processing_class
        self.round_pairs: dict[int, Dataset] = {}

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.model

    def round_dir(self, round_: int) -> Path:
        return self.output_dir / f"round-{round_}"

    def round_done(self, round_: int) -> bool:
        return (self.round_dir(round_) / DONE_FILE).is_file()

    def prompts_for_round(self, round_: int):
        """The prompts round `round_` samples: all of them, or its slice of `prompts_per_round` (wrapping around)."""
        count = self.args.prompts_per_round
        if count is None:
            return self.prompts
        rows = [((round_ - 1) * count + i) % len(self.prompts) for i in range(count)]
        return self.prompts.select(rows) if isinstance(self.prompts, Dataset) else [self.prompts[i] for i in rows]

    def train(self, resume_from_checkpoint: bool | str | None = None) -> list[dict]:
        """
        Run the rounds (resuming after the last finished one when `resume_from_checkpoint` is `True` or `"last"`, read
        as every trainer reads it: [`trl_dpo_ext.checkpoints.resume_request`]).

        Returns:
            One dict per round run: `round`, `pairs`, `mean_score_chosen`, `mean_score_rejected`, `train_loss`.
        """
        resume = resume_request(resume_from_checkpoint) is True
        if resume_request(resume_from_checkpoint) not in (None, True):
            raise ValueError(
                "IterativeDPOTrainer resumes from its own rounds: pass resume_from_checkpoint=True, not a path."
            )
        done = [r for r in range(1, self.args.num_rounds + 1) if self.round_done(r)]
        if done and not resume:
            raise ValueError(
                f"output_dir {self.output_dir} already holds finished rounds {done}: pass "
                "resume_from_checkpoint=True to continue it, or choose a new output_dir."
            )
        start = max(done, default=0) + 1
        if start > 1:
            self._load_adapter(self.round_dir(start - 1) / ADAPTER_DIR)
        summary = []
        try:
            for round_ in range(start, self.args.num_rounds + 1):
                pairs = self.pairs_for_round(round_)
                output = self._train_round(round_, pairs, resume)
                summary.append(
                    {
                        "round": round_,
                        "pairs": len(pairs),
                        "mean_score_chosen": sum(pairs["score_chosen"]) / len(pairs),
                        "mean_score_rejected": sum(pairs["score_rejected"]) / len(pairs),
                        "train_loss": output.training_loss,
                    }
                )
                self._mark_done(round_, summary[-1])
                logger.info("Round %d/%d: %s", round_, self.args.num_rounds, summary[-1])
        finally:
            self.trainer.args.output_dir = str(self.output_dir)  # each round trained in its own directory
        return summary

    def save_model(self, output_dir: str | None = None) -> None:
        """Save the adapter as it is now (after `train`: the last round's) and its model card, in `output_dir`."""
        self.trainer.save_model(str(output_dir or self.output_dir))

    def pairs_for_round(self, round_: int) -> Dataset:
        """The round's pairs: read back if the round saved them (a resumed round), else sampled from the policy now."""
        path = self.round_dir(round_) / PAIRS_DIR
        if (path / "dataset_info.json").is_file():
            pairs = load_from_disk(str(path))
        else:
            with generation_model(self.trainer.accelerator.unwrap_model(self.model)) as policy:
                pairs = build_preference_pairs(
                    policy,
                    self.tokenizer,
                    self.prompts_for_round(round_),
                    reward_fn=self.reward_fn,
                    reward_model=self.reward_model,
                    stop_token_id=self.stop_token_id,
                    sampling=self.args.sampling(round_),
                )
            if self.trainer.accelerator.is_main_process:
                with atomic_dir(path) as staging:
                    pairs.save_to_disk(str(staging))
            self.trainer.accelerator.wait_for_everyone()
        self.round_pairs[round_] = pairs
        return pairs

    def _train_round(self, round_: int, pairs: Dataset, resume: bool):
        trainer, out = self.trainer, self.round_dir(round_)
        trainer.args.output_dir = str(out)
        # A round is a DPO run of its own from the current adapter: new optimizer and schedule, step 0.
        trainer.optimizer, trainer.lr_scheduler = None, None
        trainer.set_train_dataset(pairs.remove_columns(["score_chosen", "score_rejected"]))
        checkpoint = resolve_resume(True, str(out)) if resume else None
        output = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model(str(out / ADAPTER_DIR))
        return output

    def _mark_done(self, round_: int, row: dict) -> None:
        if self.trainer.accelerator.is_main_process:
            with atomic_write(self.round_dir(round_) / DONE_FILE) as handle:
                json.dump(row, handle, indent=1)
        self.trainer.accelerator.wait_for_everyone()

    def _load_adapter(self, path: Path) -> None:
        """Load a finished round's trained weights into the policy: its adapter (QLoRA), or the whole model."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        model = self.trainer.accelerator.unwrap_model(self.model)
        if (path / "adapter_model.safetensors").is_file():
            result = set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        else:  # full fine-tuning: the tied LM head is not saved, so it is the one weight allowed missing
            result = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{path}: weights that the policy does not have: {unexpected[:3]}")
