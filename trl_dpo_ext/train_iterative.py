"""`trl-dpo-ext iterative`: iterative (on-policy) DPO from the command line, on one 4-bit base.

    trl-dpo-ext iterative --num_rounds 2 --output_dir runs/iterative          # SmolLM2 on its bundled prompts
    trl-dpo-ext iterative --prompts my_prompts.jsonl --reward my_module:score --model_name_or_path DIR ...

Each round samples `--num_samples` replies per prompt from the current policy, scores them (`--reward` or
`--reward_model_path`), keeps best and worst, and trains DPO on them; see [`trl_dpo_ext.iterative`]. The final adapter
is saved in `output_dir` (each round's in `output_dir/round-N/adapter`). `--resume_from_checkpoint last` continues a
killed run in the round and at the step it reached.
"""

import contextlib
import importlib
import sys
from dataclasses import dataclass, field

from accelerate import PartialState
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
from trl import TrlParser

from .config import QLoRAModelConfig, device_defaults
from .iterative import IterativeDPOConfig, IterativeDPOTrainer
from .preference_data import load_preference_dataset
from .recipe import load_policy
from .runlock import RunLock
from .smollm2 import SMOLLM2_NAME, resolve_model_name


def concise_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Fewer words score higher; with `missing_eos_penalty`, a reply cut off at the budget ranks below any that ended
    (the rule of [`trl_dpo_ext.behaviour.concise_key`])."""
    return [-float(len(c.split())) for c in completions]


def longer_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """More words score higher (a reward any policy can move, for tests and demonstrations)."""
    return [float(len(c.split())) for c in completions]


REWARDS = {"concise": concise_reward, "longer": longer_reward}
# Makes "ended within the budget" outrank every word count under the concise rule (a reply has < 1000 words).
CONCISE_EOS_PENALTY = 1000.0


@dataclass
class IterativeArguments:
    """What the rounds sample from and how replies are scored."""

    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: a preference or prompt dataset (file, saved dataset, bundled name or Hub id; its "
            "'prompt' column). Default: the bundled smollm2-concise prompts."
        },
    )
    prompts_split: str = field(default="train", metadata={"help": "Split of --prompts to read."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N distinct prompts."})
    reward: str = field(
        default="concise",
        metadata={
            "help": "'concise' (ended within max_new_tokens, then fewer words: trl_dpo_ext.behaviour's rule), "
            "'longer', or 'module:function' called as function(prompts, completions) -> one score each."
        },
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "A reward model (num_labels=1) instead of --reward."}
    )

    def __post_init__(self):
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"`max_prompts` must be >= 1, got {self.max_prompts}.")
        if self.reward not in REWARDS and ":" not in self.reward:
            raise ValueError(f"`reward` {self.reward!r}: expected one of {sorted(REWARDS)} or 'module:function'.")


def make_parser(prog: str | None = None) -> TrlParser:
    parser = TrlParser(
        (IterativeArguments, IterativeDPOConfig, QLoRAModelConfig),
        prog=prog,
        epilog="--config FILE reads these settings from a YAML file; flags override it.",
    )
    parser.set_defaults(**device_defaults())
    return parser


def parse(argv: list[str] | None = None, prog: str | None = None):
    return make_parser(prog).parse_args_and_config(list(sys.argv[1:] if argv is None else argv))


def reward_function(spec: str):
    """`--reward` as a callable: a name of `REWARDS`, or `module:function` imported."""
    if spec in REWARDS:
        return REWARDS[spec]
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"`reward` {spec!r}: cannot import {name} from {module}: {error}") from error


def load_prompts(args: IterativeArguments) -> list:
    data = load_preference_dataset(args.prompts or "smollm2-concise")
    if args.prompts_split not in data:
        raise ValueError(f"`prompts_split` {args.prompts_split!r}: the prompts have splits {list(data)}.")
    rows = data[args.prompts_split]
    if "prompt" not in rows.column_names:
        raise ValueError(f"--prompts {args.prompts}: no 'prompt' column (columns: {rows.column_names}).")
    seen, prompts = set(), []
    for prompt in rows["prompt"]:
        if repr(prompt) not in seen:
            seen.add(repr(prompt))
            prompts.append(prompt)
    return prompts[: args.max_prompts]


def main(iter_args: IterativeArguments, training_args: IterativeDPOConfig, model_args: QLoRAModelConfig) -> list:
    """Run the rounds; returns their summaries (see [`IterativeDPOTrainer.train`])."""
    state = PartialState()
    with RunLock(training_args.output_dir) if state.is_main_process else contextlib.nullcontext():
        set_seed(training_args.seed)
        prompts = load_prompts(iter_args)  # the data first: a bad file fails before any model loads
        reward_fn = None if iter_args.reward_model_path else reward_function(iter_args.reward)
        if iter_args.reward == "concise" and training_args.missing_eos_penalty is None:
            training_args.missing_eos_penalty = CONCISE_EOS_PENALTY
        with state.main_process_first():
            model_path = resolve_model_name(model_args.model_name_or_path or SMOLLM2_NAME)
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
        reward_model = None
        if iter_args.reward_model_path:
            reward_model = AutoModelForSequenceClassification.from_pretrained(iter_args.reward_model_path)
        model = load_policy(model_path, model_args, training_args.trust_remote_code)
        trainer = IterativeDPOTrainer(
            model, training_args, prompts, tokenizer, reward_fn=reward_fn, reward_model=reward_model
        )
        resume = str(training_args.resume_from_checkpoint).lower() in ("true", "last")
        summary = trainer.train(resume_from_checkpoint=True if resume else None)
        trainer.save_model()
        for row in summary:
            state.print(
                f"Round {row['round']}: {row['pairs']} pairs, mean score chosen {row['mean_score_chosen']:.3f} / "
                f"rejected {row['mean_score_rejected']:.3f}, train loss {row['train_loss']:.4f}"
            )
        state.print(f"Adapter saved to {training_args.output_dir} (each round's in round-N/adapter)")
        return summary
