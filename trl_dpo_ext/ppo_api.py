"""A PPO-shaped API over DPO, so a TRL PPO script runs on TRL ≥ 1.13 by changing one import line:

    from trl.experimental.ppo import PPOConfig, PPOTrainer      # TRL <= 1.12
    from trl_dpo_ext.ppo_api import PPOConfig, PPOTrainer    # any TRL this package supports

`PPOConfig` keeps the fields and defaults of TRL 1.12's `PPOConfig`; `PPOTrainer` keeps its constructor. Under the hood
it runs the DPO paper's pipeline: sample k completions per prompt from the reference policy, rank them with the PPO
reward model, keep the best and the worst as (chosen, rejected), drop ties, and train [`trl_dpo_ext.DPOTrainer`].
`kl_coef` is DPO's β (the same β of the KL-regularised objective, Rafailov et al. 2023, Eq. 3). Fields that only mean
something for PPO's value function and clipping are accepted and reported once as unused. The value model is never
moved to the training device nor optimized.
"""

import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from datasets import Dataset

from .atomic import atomic_dir, atomic_write
from .checkpoints import TRAINING_CONFIG_FILE, resume_request
from .config import DPOConfig
from .errors import UserError
from .models import mask_pad_id
from .pairs import build_preference_pairs, reward_model_scores
from .sampling import SamplingConfig, check_pair_samples, generate, prompt_ids
from .trainer import DPOTrainer


logger = logging.getLogger(__name__)

PAIRS_DIR = "preference_pairs"
# What a run of `PPOTrainer` leaves in its output_dir, any of which makes the directory one of its runs: the pairs, a
# save of ours (`dpo_config.json`, also in every checkpoint), the first round of iterative DPO (`num_rounds > 1`).
_RUN_MARKERS = (PAIRS_DIR, TRAINING_CONFIG_FILE, "round-1")


@dataclass
class PPOConfig(DPOConfig):
    r"""
    TRL 1.12's `PPOConfig` fields (same names and defaults) on top of [`trl_dpo_ext.DPOConfig`].

    Fields used by the DPO pipeline: `kl_coef` (→ β), `response_length` (→ max new tokens), `temperature`,
    `stop_token`/`stop_token_id`, `missing_eos_penalty`, `local_rollout_forward_batch_size` (→ prompts per generate
    call), `total_episodes` (→ prompts used to build pairs), `num_completions` (k, new). `sft_model_path` and
    `reward_model_path` are read by scripts, as in TRL. The rest is accepted and reported once as unused, except the
    derived `world_size`, which stays `TrainingArguments.world_size` (the trainer's real world size).
    """

    learning_rate: float = field(default=3e-6, metadata={"help": "Initial learning rate (TRL PPO's default)."})
    num_mini_batches: int = field(default=1, metadata={"help": "PPO only (unused by DPO)."})
    total_episodes: int | None = field(
        default=None, metadata={"help": "Prompts used to build preference pairs (all prompts once if None)."}
    )
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Prompts per batched `generate` call when sampling completions."}
    )
    num_sample_generations: int = field(default=10, metadata={"help": "PPO only (unused by DPO)."})
    response_length: int = field(default=53, metadata={"help": "Maximum new tokens per sampled completion."})
    stop_token: Literal["eos"] | None = field(
        default=None, metadata={"help": "'eos': stop at the tokenizer's eos (exclusive with stop_token_id)."}
    )
    stop_token_id: int | None = field(default=None, metadata={"help": "Token id that ends a completion."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the reward of a completion that never emits the stop token."}
    )
    sft_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "Path of the SFT (policy) model."})
    num_total_batches: int | None = field(default=None, metadata={"help": "PPO only (derived; unused by DPO)."})
    micro_batch_size: int | None = field(default=None, metadata={"help": "PPO only (derived; unused by DPO)."})
    local_batch_size: int | None = field(default=None, metadata={"help": "PPO only (derived; unused by DPO)."})
    batch_size: int | None = field(default=None, metadata={"help": "PPO only (derived; unused by DPO)."})
    local_mini_batch_size: int | None = field(default=None, metadata={"help": "PPO only (derived; unused by DPO)."})
    mini_batch_size: int | None = field(default=None, metadata={"help": "PPO only (derived; unused by DPO)."})
    reward_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "Path of the reward model."})
    model_adapter_name: str | None = field(default=None, metadata={"help": "PPO only (unused by DPO)."})
    ref_adapter_name: str | None = field(default=None, metadata={"help": "PPO only (unused by DPO)."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "PPO only (unused by DPO)."})
    whiten_rewards: bool = field(default=False, metadata={"help": "PPO only (unused by DPO)."})
    kl_coef: float = field(default=0.05, metadata={"help": "KL coefficient: DPO's beta."})
    kl_estimator: Literal["k1", "k3"] = field(default="k1", metadata={"help": "PPO only (unused by DPO)."})
    cliprange: float = field(default=0.2, metadata={"help": "PPO only (unused by DPO)."})
    vf_coef: float = field(default=0.1, metadata={"help": "PPO only (unused by DPO)."})
    cliprange_value: float = field(default=0.2, metadata={"help": "PPO only (unused by DPO)."})
    gamma: float = field(default=1.0, metadata={"help": "PPO only (unused by DPO)."})
    lam: float = field(default=0.95, metadata={"help": "PPO only (unused by DPO)."})
    ds3_gather_for_generation: bool = field(default=True, metadata={"help": "PPO only (unused by DPO)."})
    num_completions: int = field(
        default=4, metadata={"help": "Completions sampled per prompt (k >= 2); the best and worst form the pair."}
    )
    num_rounds: int = field(
        default=1,
        metadata={
            "help": "1: pairs sampled once from the reference policy (the DPO paper's pipeline). R > 1: iterative "
            "DPO, each round sampling from the policy trained so far (on-policy, as PPO), R rounds."
        },
    )

    # Value-function, clipping and PPO batch-geometry fields: accepted so scripts parse, meaningless for DPO.
    UNUSED = (
        "num_mini_batches", "num_sample_generations", "num_total_batches", "micro_batch_size",
        "local_batch_size", "batch_size", "local_mini_batch_size", "mini_batch_size", "model_adapter_name",
        "ref_adapter_name", "num_ppo_epochs", "whiten_rewards", "kl_estimator", "cliprange", "vf_coef",
        "cliprange_value", "gamma", "lam", "ds3_gather_for_generation",
    )  # fmt: skip

    def __post_init__(self):
        if self.stop_token is not None and self.stop_token_id is not None:
            raise ValueError("Set only one of `stop_token` and `stop_token_id`.")
        if self.stop_token not in (None, "eos"):
            raise ValueError(f"`stop_token` must be 'eos' or None, got {self.stop_token!r}")
        check_pair_samples(self.num_completions, "num_completions")
        self.sampling()  # validates the sampling settings, naming this config's fields
        if self.num_rounds < 1:
            raise ValueError(f"`num_rounds` must be >= 1, got {self.num_rounds}.")
        self.beta = self.kl_coef
        super().__post_init__()

    def sampling(self) -> SamplingConfig:
        """The pairs' sampling settings, from TRL PPO's field names (and its defaults, e.g. `response_length=53`)."""
        return SamplingConfig.from_flags(
            {"num_samples": "num_completions", "max_new_tokens": "response_length",
             "batch_size": "local_rollout_forward_batch_size"},
            num_samples=self.num_completions,
            max_new_tokens=self.response_length,
            temperature=self.temperature,
            batch_size=self.local_rollout_forward_batch_size,
            missing_eos_penalty=self.missing_eos_penalty,
            seed=self.seed,
        )  # fmt: skip

    def unused_settings(self) -> dict[str, object]:
        """PPO-only fields set away from their defaults."""
        defaults = {f.name: f.default for f in dataclasses.fields(PPOConfig) if f.name in self.UNUSED}
        return {name: getattr(self, name) for name in self.UNUSED if getattr(self, name) != defaults[name]}


class PPOTrainer:
    """
    TRL 1.12's `PPOTrainer` constructor and methods, running DPO on pairs ranked by the reward model.

    `train()` samples `num_completions` completions per training prompt from the reference policy (`ref_model`, or
    `model` before training), ranks them with `reward_model`, saves the pairs with their scores to
    `output_dir/preference_pairs` (a `datasets` dataset) and trains [`trl_dpo_ext.DPOTrainer`] on them.
    """

    def __init__(
        self,
        args: PPOConfig,
        processing_class,
        model,
        ref_model,
        reward_model,
        train_dataset: Dataset,
        value_model=None,
        data_collator=None,
        eval_dataset: Dataset | None = None,
        optimizers=(None, None),
        callbacks=None,
        peft_config=None,
    ):
        if not isinstance(args, PPOConfig):
            raise TypeError(f"args must be trl_dpo_ext.ppo_api.PPOConfig, got {type(args).__name__}")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        if ref_model is not None and ref_model is model:
            raise ValueError("`model` and `ref_model` cannot be the same object")
        if reward_model.config.num_labels != 1:
            raise ValueError(
                f"reward_model must output one score (num_labels=1), got num_labels={reward_model.config.num_labels}"
            )
        for name in ("input_ids", "prompt"):
            if name in train_dataset.column_names:
                break
        else:
            raise ValueError(
                f"train_dataset needs an 'input_ids' (tokenized prompts) or 'prompt' column; got "
                f"{train_dataset.column_names}"
            )
        if len(train_dataset) == 0:
            raise ValueError("train_dataset is empty: no prompts to sample from")
        unused = args.unused_settings()
        if unused:
            warnings.warn(f"PPO-only settings have no meaning for DPO and are unused: {unused}", stacklevel=2)
        if value_model is not None:
            logger.info("The value model is not used by DPO: it is neither moved to the device nor trained.")
        if data_collator is not None:
            logger.info("The PPO data collator is not used: DPO batches come from trl_dpo_ext.PreferenceCollator.")
        self.args = args
        self.processing_class = processing_class
        self.model = model
        self.ref_model = ref_model
        self.reward_model = reward_model
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.optimizers = optimizers
        self.callbacks = callbacks
        self.peft_config = peft_config
        self.preference_dataset: Dataset | None = None
        self.dpo_trainer: DPOTrainer | None = None

    @property
    def stop_token_id(self) -> int | None:
        return self.processing_class.eos_token_id if self.args.stop_token == "eos" else self.args.stop_token_id

    def _prompts_beside(self, sampler) -> Dataset:
        """The prompts to sample pairs for (`total_episodes` of them); the reward model moved to `sampler`'s device."""
        prompts = self.train_dataset
        if self.args.total_episodes is not None:
            prompts = prompts.select(range(min(self.args.total_episodes, len(prompts))))
        if not getattr(self.reward_model, "is_loaded_in_4bit", False):  # 4-bit models cannot be moved
            self.reward_model.to(next(sampler.parameters()).device)
        return prompts

    def build_pairs(self) -> Dataset:
        """Sample, score and rank completions for the training prompts; save the pair set under `output_dir`."""
        sampler = self.ref_model if self.ref_model is not None else self.model
        prompts = self._prompts_beside(sampler)
        pairs = build_preference_pairs(
            sampler,
            self.processing_class,
            prompts,
            reward_model=self.reward_model,
            stop_token_id=self.stop_token_id,
            sampling=self.args.sampling(),
        )
        if self.args.process_index == 0:
            with atomic_dir(Path(self.args.output_dir) / PAIRS_DIR) as staging:
                pairs.save_to_disk(str(staging))
        return pairs

    def train(self):
        """
        Build the preference pairs, then train DPO on them; returns the DPO `TrainOutput`. With `num_rounds > 1`,
        iterative DPO instead ([`trl_dpo_ext.IterativeDPOTrainer`], rounds under `output_dir/round-N`); returns the
        per-round summaries.
        """
        if self.args.num_rounds > 1:
            return self._train_iterative()
        self.preference_dataset = self.build_pairs()
        # No collator of ours: the DPO trainer builds its own, with the layout it decides (and a pad id in range).
        self.dpo_trainer = DPOTrainer(
            model=self.model,
            ref_model=self.ref_model,
            args=self.args,  # a PPOConfig is a DPOConfig whose beta is kl_coef
            train_dataset=self.preference_dataset.remove_columns(["score_chosen", "score_rejected"]),
            processing_class=self.processing_class,
            optimizers=self.optimizers,
            callbacks=self.callbacks,
            peft_config=self.peft_config,
        )
        output = self.dpo_trainer.train(resume_from_checkpoint=self.args.resume_from_checkpoint)
        self.model = self.dpo_trainer.model
        return output

    def _train_iterative(self) -> list[dict]:
        from .iterative import IterativeDPOConfig, IterativeDPOTrainer

        # The PPO settings, as the iterative trainer names them; every DPO/Trainer field carries over as it is.
        shared = {f.name: getattr(self.args, f.name) for f in dataclasses.fields(DPOConfig) if f.init}
        sampling = self.args.sampling()
        args = IterativeDPOConfig(
            **shared,
            num_rounds=self.args.num_rounds,
            num_samples=sampling.num_samples,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            generation_batch_size=sampling.batch_size,
            missing_eos_penalty=sampling.missing_eos_penalty,
        )
        prompts = self._prompts_beside(self.model)
        iterative = IterativeDPOTrainer(
            self.model,
            args,
            prompts,
            self.processing_class,
            reward_model=self.reward_model,
            ref_model=self.ref_model,
            stop_token_id=self.stop_token_id,
            optimizers=self.optimizers,
            callbacks=self.callbacks,
            peft_config=self.peft_config,
        )
        summary = iterative.train(resume_from_checkpoint=resume_request(self.args.resume_from_checkpoint))
        self.dpo_trainer, self.model = iterative.trainer, iterative.model
        return summary

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the policy (the LoRA adapter with PEFT) and the tokenizer, like PPO's policy-only save."""
        if self.dpo_trainer is None:
            raise RuntimeError("save_model() before train(): there is no trained policy to save yet")
        self.dpo_trainer.save_model(output_dir, _internal_call=_internal_call)

    def push_to_hub(self, **kwargs):
        if self.dpo_trainer is None:
            raise RuntimeError("push_to_hub() before train(): there is no trained policy to push yet")
        return self.dpo_trainer.push_to_hub(**kwargs)

    @torch.no_grad()
    def generate_completions(self, sampling: bool = False) -> list[dict] | None:
        """
        As in TRL's PPO: near-greedy completions (temperature 0.01) for the eval prompts, scored by the reward model,
        shown as a `query | model response | score` table (first 5 rows) and saved to `output_dir/completions.jsonl`.
        With `sampling=True` only the first batch is used. Returns the rows, or None without an eval dataset.
        """
        if self.eval_dataset is None:
            return None
        tokenizer, policy = self.processing_class, self.model
        prompts = self.eval_dataset
        if sampling:
            prompts = prompts.select(range(min(self.args.per_device_eval_batch_size, len(prompts))))
        near_greedy = SamplingConfig(
            num_samples=1, max_new_tokens=self.args.response_length, temperature=0.01,
            batch_size=self.args.per_device_eval_batch_size, seed=None,
        )  # fmt: skip
        batches = generate(
            policy,
            tokenizer,
            prompt_ids(prompts, tokenizer),
            near_greedy,
            self.stop_token_id,
            "Generating completions",
        )
        pad = mask_pad_id(tokenizer, policy)
        rows = []
        for query_responses, context in batches:
            scores = reward_model_scores(self.reward_model, query_responses, pad, context)
            for sequence, score in zip(query_responses, scores):
                query, response = sequence[:context], sequence[context:]
                rows.append(
                    {
                        "query": tokenizer.decode(query[query != pad], skip_special_tokens=True),
                        "model response": tokenizer.decode(response[response != pad]),
                        "score": float(score),
                    }
                )
        _show_table(rows[:5])
        if self.args.process_index == 0:
            with atomic_write(Path(self.args.output_dir) / "completions.jsonl") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows)
        return rows


def _show_table(rows: list[dict]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for row in rows:
            logger.info("%s", row)
        return
    table = Table(show_lines=True)
    for column in ("query", "model response", "score"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["query"], row["model response"], f"{row['score']:.4f}")
    Console().print(table)


def check_reusable_output_dir(output_dir: str | Path) -> None:
    """
    Refuse an `output_dir` that holds something else than a run of [`PPOTrainer`]: it is written into, so files of
    the user's would be mixed with (or replaced by) a run's. A missing or empty directory, or one of its own runs
    (reused, or resumed with `resume_from_checkpoint`), passes. Nothing is deleted either way.

    Raises:
        [`trl_dpo_ext.errors.UserError`]: naming the directory and what to do.
    """
    path = Path(output_dir)
    if not path.is_dir() or not any(path.iterdir()) or any((path / name).exists() for name in _RUN_MARKERS):
        return
    raise UserError(
        f"output_dir {path} is not empty and holds no run of this script (no {PAIRS_DIR}/ or {TRAINING_CONFIG_FILE}); "
        "nothing was deleted. Pass a new or empty --output_dir."
    )
