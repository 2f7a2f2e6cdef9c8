"""The recipes, as objects with a visible lifecycle: QLoRA DPO (`trl-dpo-ext dpo`, `recipes/dpo_qlora.py`) and
iterative DPO (`trl-dpo-ext iterative`), both on one 4-bit base.

    setup → measure (before) → train → measure (after) → save → report → shutdown

[`Recipe.run`] runs these steps in that order under the run lock; the two recipes share the setup of the model
(one default model, one resolution: [`trl_dpo_ext.model_source`]), the seed, the lock and the shutdown, and differ in
their data (preference pairs; prompts and a reward) and their trainer. Settings come from dataclasses that are flags
and YAML keys (`TrlParser`): the DPO recipe reads `configs/dpo_qlora.yaml` unless `--config` names another file.
`--resume_from_checkpoint last` continues a killed run of either (see [`trl_dpo_ext.checkpoints.resume_request`]).
"""

import contextlib
import gc
import os
import sys
from argparse import ArgumentParser
from pathlib import Path

from accelerate import PartialState
from datasets import DatasetDict
from transformers import AutoTokenizer, set_seed
from trl import ScriptArguments, TrlParser, get_peft_config

from . import sampling
from .command_args import IterativeArguments, RecipeArguments
from .config import CPU_DEFAULTS, DPOConfig, QLoRAModelConfig, device_defaults
from .errors import Preempted
from .implicit_reward import reward_margins
from .iterative import IterativeDPOConfig, IterativeDPOTrainer
from .launch import check_launch
from .length_rule import rule_score
from .metrics import preference_accuracy
from .model_source import resolve_model_path
from .models import load_qlora_model
from .preference_data import load_preference_dataset, to_conversational, validate_preference_dataset
from .runlock import RunLock
from .trainer import DPOTrainer


CONFIGS = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIGS / "dpo_qlora.yaml"


# `dpo --help` sections, in this order: where each flag's dataclass field is declared.
FLAG_GROUPS = {
    "trl_dpo_ext": ("trl_dpo_ext settings", "This package: the recipe, the trainer's additions to TRL, QLoRA."),
    "trl": ("TRL settings", "trl.ScriptArguments (data), trl.DPOConfig (DPO) and trl.ModelConfig (model, LoRA)."),
    "transformers": ("transformers settings", "transformers.TrainingArguments: optimizer, schedule, saving, logging."),
}


def make_parser(prog: str | None = None) -> TrlParser:
    """
    The recipe's parser: its four dataclasses, with bf16/gradient checkpointing off by default without CUDA, and the
    flags grouped in `--help` by the package that declares them (ours, TRL's, transformers').
    """
    dataclasses = (ScriptArguments, DPOConfig, QLoRAModelConfig, RecipeArguments)
    parser = TrlParser(
        dataclasses,
        prog=prog,
        usage="%(prog)s [--config FILE] [FLAGS]",
        epilog="--config FILE reads these settings from a YAML file (default: the recipe's dpo_qlora.yaml); flags "
        "override it.",
    )
    parser.set_defaults(**device_defaults())
    for action in parser._actions:
        if action.dest in CPU_DEFAULTS:
            # The default depends on the machine; `%(default).0s` prints nothing but keeps argparse from appending
            # this machine's value, so the help reads the same everywhere.
            action.help = f"{action.help} (default: off without CUDA, else as TRL/transformers set it)%(default).0s"
    _group_flags(parser, dataclasses)
    return parser


def _group_flags(parser: ArgumentParser, dataclasses: tuple[type, ...]) -> None:
    """Move each flag into the `FLAG_GROUPS` section of the package whose class declares its field."""
    owner = {}
    for config in dataclasses:
        for name in config.__dataclass_fields__:
            declaring = next(cls for cls in config.__mro__ if name in cls.__dict__.get("__annotations__", {}))
            owner[name] = declaring.__module__.split(".")[0]
    groups = {package: parser.add_argument_group(*texts) for package, texts in FLAG_GROUPS.items()}
    for group in list(parser._action_groups):
        if group in groups.values():
            continue
        for action in list(group._group_actions):
            if owner.get(action.dest) in groups:
                group._group_actions.remove(action)
                groups[owner[action.dest]]._group_actions.append(action)


def parse(argv: list[str] | None = None, prog: str | None = None):
    """
    Parse `argv` (default: `sys.argv[1:]`) into `(ScriptArguments, DPOConfig, QLoRAModelConfig, RecipeArguments)`,
    reading `DEFAULT_CONFIG` unless `--config` names another YAML file (or a packaged one by name, see
    [`config_path`]). Flags override the YAML.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    at = argv.index("--config") + 1
    if at < len(argv):
        argv[at] = config_path(argv[at])
    return make_parser(prog).parse_args_and_config(argv)


def config_path(value: str) -> str:
    """
    `--config` as a file: a path as given, or the name of a config shipped with the package — `tiny` is
    `configs/dpo_qlora_tiny.yaml` (the tiny random model and toy pairs that the fast tests use).
    """
    packaged = CONFIGS / f"dpo_qlora_{value}.yaml"
    if "/" not in value and os.sep not in value and not Path(value).suffix and packaged.is_file():
        return str(packaged)
    return value


def make_iterative_parser(prog: str | None = None) -> TrlParser:
    parser = TrlParser(
        (IterativeArguments, IterativeDPOConfig, QLoRAModelConfig),
        prog=prog,
        epilog="--config FILE reads these settings from a YAML file; flags override it.",
    )
    parser.set_defaults(**device_defaults())
    return parser


def parse_iterative(argv: list[str] | None = None, prog: str | None = None):
    """Parse `argv` into `(IterativeArguments, IterativeDPOConfig, QLoRAModelConfig)`."""
    return make_iterative_parser(prog).parse_args_and_config(list(sys.argv[1:] if argv is None else argv))


class Recipe:
    """
    The lifecycle both recipes share; a subclass fills in its steps. [`run`] calls them in order, in the world the
    launch asked for ([`trl_dpo_ext.launch.check_launch`]), under the run lock (taken by the main process: the other
    ranks are the same run).
    """

    def __init__(self, training_args: DPOConfig, model_args: QLoRAModelConfig):
        self.args, self.model_args = training_args, model_args
        self.state = PartialState()
        self.trainer = None

    def run(self):
        check_launch(self.state, self.args)
        with RunLock(self.args.output_dir) if self.state.is_main_process else contextlib.nullcontext():
            # Seed before the LoRA init (the Trainer seeds only later), so two runs with one seed start from one
            # adapter.
            set_seed(self.args.seed)
            self.setup()
            before = self.measure("before")
            try:
                trained = self.train()
            except Preempted:
                self.shutdown()  # the checkpoint is written; the same clean exit as a finished run (DDP)
                raise
            after = self.measure("after")
            self.save()
            result = self.report(before, trained, after)
            self.shutdown()
            return result

    def setup(self) -> None:
        """Read and check the data (before any model loads: a bad file fails in seconds), then build the trainer."""
        raise NotImplementedError

    def measure(self, when: str):
        """What the recipe measures of the policy before and after training (nothing by default)."""
        return None

    def train(self):
        raise NotImplementedError

    def save(self) -> None:
        raise NotImplementedError

    def report(self, before, trained, after):
        raise NotImplementedError

    def load_tokenizer(self):
        """`--model_name_or_path` resolved once (by the main process first: it builds or converts a local model once,
        and the other ranks then read it), and its tokenizer."""
        with self.state.main_process_first():
            self.model_path = resolve_model_path(self.model_args.model_name_or_path)
        return AutoTokenizer.from_pretrained(
            self.model_path, revision=self.model_args.model_revision, trust_remote_code=self.args.trust_remote_code
        )

    def load_policy(self):
        """The 4-bit base with LoRA that the model settings describe (a fresh adapter, or the SFT one)."""
        args = self.model_args
        return load_qlora_model(
            self.model_path,
            None if args.sft_adapter_path else get_peft_config(args),
            sft_adapter_path=args.sft_adapter_path,
            compute_dtype=args.bnb_4bit_compute_dtype,
            double_quant=args.use_bnb_nested_quant,
            quant_storage=args.bnb_4bit_quant_storage,
            revision=args.model_revision,
            attn_implementation=args.attn_implementation,
            trust_remote_code=self.args.trust_remote_code,
        )

    def shutdown(self) -> None:
        # Why: DDP's C++ reducer holds the gloo process group. If the reducer is its last holder (freed with the
        # trainer, after `trainer.end()`), the group's destructor joins gloo's worker threads while holding the GIL,
        # and a worker still freeing the tensors of training's last all_gather waits for the GIL: the rank hangs at
        # exit (torch 2.13; a rank with nothing to save gets there within milliseconds). Free the DDP wrapper while
        # torch.distributed still holds the group: its Python handle, destroyed in `trainer.end()`, releases the GIL
        # first.
        trainer = self.dpo_trainer
        trainer.model_wrapped = trainer.model
        trainer.accelerator.free_memory()
        gc.collect()
        trainer.end()

    @property
    def dpo_trainer(self) -> DPOTrainer:
        return self.trainer


class DPORecipe(Recipe):
    """
    QLoRA DPO: load the 4-bit base with LoRA, train with DPO, save the adapter (with its model card), and measure the
    held-out implicit-reward accuracy and the length rule's score of greedy held-out replies before and after.
    """

    def __init__(self, script_args: ScriptArguments, training_args, model_args, recipe_args: RecipeArguments):
        super().__init__(training_args, model_args)
        self.script_args, self.recipe_args = script_args, recipe_args

    def setup(self) -> None:
        script_args, recipe_args = self.script_args, self.recipe_args
        dataset = load_preference_dataset(script_args.dataset_name, script_args.dataset_config)
        if script_args.dataset_train_split not in dataset:
            raise ValueError(
                f"`dataset_train_split` {script_args.dataset_train_split!r}: the dataset has no such split; its "
                f"splits are {list(dataset)}."
            )
        validate_preference_dataset(dataset[script_args.dataset_train_split], script_args.dataset_train_split)
        has_test = script_args.dataset_test_split in dataset
        measure_heldout = recipe_args.heldout_pairs and has_test
        if has_test and (measure_heldout or recipe_args.heldout_generations):
            validate_preference_dataset(dataset[script_args.dataset_test_split], script_args.dataset_test_split)

        self.tokenizer = self.load_tokenizer()
        if recipe_args.dataset_format == "chat":
            if self.tokenizer.chat_template is None:
                raise ValueError(
                    f"--dataset_format chat needs a tokenizer with a chat template; {self.model_path} has none."
                )
            dataset = DatasetDict({split: to_conversational(rows, split) for split, rows in dataset.items()})
        self.heldout, self.prompts = None, []
        if has_test and recipe_args.heldout_generations:
            test_prompts = dataset[script_args.dataset_test_split]["prompt"]
            self.prompts = sampling.distinct(test_prompts, recipe_args.heldout_generations)
        if measure_heldout:
            test = dataset[script_args.dataset_test_split]
            self.heldout = test.select(range(min(recipe_args.heldout_pairs, len(test))))

        self.trainer = DPOTrainer(
            model=self.load_policy(),
            args=self.args,
            train_dataset=dataset[script_args.dataset_train_split],
            eval_dataset=self.heldout if self.args.eval_strategy != "no" else None,
            processing_class=self.tokenizer,
        )
        processes = self.trainer.accelerator.num_processes
        pairs = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * processes
        self.trainer.accelerator.print(
            f"Training on {processes} process(es) ({self.trainer.accelerator.distributed_type}), global batch {pairs} "
            "pairs"
        )

    def measure(self, when: str) -> dict:
        """The held-out margins (implicit reward, chosen − rejected) and greedy replies of the policy as it is now."""
        margins = reward_margins(self.trainer, self.heldout) if self.heldout is not None else None
        budget = self.recipe_args.generation_max_new_tokens
        desc = f"Held-out replies, {when}"
        return {
            "margins": margins,
            "replies": sampling.answer(self.trainer.model, self.tokenizer, self.prompts, budget, desc),
        }

    def train(self):
        return self.trainer.train(resume_from_checkpoint=self.args.resume_from_checkpoint)

    def save(self) -> None:
        # The model card's `datasets` field holds Hub ids; a local file or directory is not one.
        name = self.script_args.dataset_name
        hub_dataset = name if name is not None and not Path(name).exists() else None
        if self.trainer.is_fsdp_enabled:
            # Why: under FSDP, Trainer.save_model writes weights only with FULL_STATE_DICT; checkpoints stay sharded.
            self.trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        self.trainer.save_model(self.args.output_dir, dataset_name=hub_dataset)
        if self.args.push_to_hub:
            self.trainer.push_to_hub(dataset_name=hub_dataset)

    def report(self, before: dict, trained, after: dict) -> dict:
        """
        Print what changed, and return it: `heldout_accuracy_before`, `heldout_accuracy_after` (`None` without a
        test split), `heldout_margins` (the per-pair reward margins after training, a list, or `None`) and
        `heldout_rule` (the rule's score of the greedy held-out replies, `{"before": {...}, "after": {...}}`, or
        `None`).
        """
        say, out = self.trainer.accelerator.print, Path(self.args.output_dir)
        accuracy = {when: preference_accuracy(m["margins"]) if m["margins"] is not None else None for when, m in
                    (("before", before), ("after", after))}  # fmt: skip
        if self.heldout is not None:
            say(
                f"Held-out reward accuracy ({len(self.heldout)} pairs): {accuracy['before']:.3f} before -> "
                f"{accuracy['after']:.3f} after training"
            )
        rule = None
        if self.prompts:
            rule = {"before": rule_score(before["replies"]), "after": rule_score(after["replies"])}
            say(
                f"Held-out replies ({len(self.prompts)} prompts, greedy, at most "
                f"{self.recipe_args.generation_max_new_tokens} new tokens): ended on their own "
                f"{rule['before']['ended']:.3f} before -> {rule['after']['ended']:.3f} after; mean words "
                f"{rule['before']['words']:.1f} -> {rule['after']['words']:.1f}"
            )
            for prompt, old, new in list(zip(self.prompts, before["replies"], after["replies"]))[:3]:
                question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
                say(f"  Q: {question}\n    before: {_clip(old)}\n    after:  {_clip(new)}")
        say(f"Adapter saved to {out}")
        say(f"Metrics: {out / 'metrics_history.json'}  plot: {out / 'metrics.png'}")
        margins = after["margins"]
        return {
            "heldout_accuracy_before": accuracy["before"],
            "heldout_accuracy_after": accuracy["after"],
            "heldout_margins": margins.tolist() if margins is not None else None,
            "heldout_rule": rule,
        }


class IterativeRecipe(Recipe):
    """Iterative DPO: rounds of sampling from the policy, scoring, and DPO (see [`trl_dpo_ext.iterative`])."""

    def __init__(self, iter_args: IterativeArguments, training_args: IterativeDPOConfig, model_args):
        super().__init__(training_args, model_args)
        self.iter_args = iter_args

    def setup(self) -> None:
        iter_args = self.iter_args
        prompts = sampling.load_prompts(iter_args.prompts, iter_args.prompts_split, iter_args.max_prompts)
        if iter_args.reward_model_path:  # a directory or a Hub id
            reward = sampling.Reward(model_path=iter_args.reward_model_path)
        else:
            reward = sampling.load_reward(iter_args.reward, "--reward")
        if reward.missing_eos_penalty is not None and self.args.missing_eos_penalty is None:
            self.args.missing_eos_penalty = reward.missing_eos_penalty
        tokenizer = self.load_tokenizer()
        self.trainer = IterativeDPOTrainer(
            self.load_policy(),
            self.args,
            prompts,
            tokenizer,
            reward_fn=reward.function,
            reward_model=reward.load_model(),
        )

    def train(self) -> list[dict]:
        return self.trainer.train(resume_from_checkpoint=self.args.resume_from_checkpoint)

    def save(self) -> None:
        self.trainer.save_model()

    def report(self, before, summary: list[dict], after) -> list[dict]:
        """Print each round's summary; returns them (see [`IterativeDPOTrainer.train`])."""
        for row in summary:
            self.state.print(
                f"Round {row['round']}: {row['pairs']} pairs, mean score chosen {row['mean_score_chosen']:.3f} / "
                f"rejected {row['mean_score_rejected']:.3f}, train loss {row['train_loss']:.4f}"
            )
        self.state.print(f"Adapter saved to {self.args.output_dir} (each round's in round-N/adapter)")
        return summary

    @property
    def dpo_trainer(self) -> DPOTrainer:
        return self.trainer.trainer


def main(
    script_args: ScriptArguments,
    training_args: DPOConfig,
    model_args: QLoRAModelConfig,
    recipe_args: RecipeArguments,
) -> dict:
    """`trl-dpo-ext dpo`: the [`DPORecipe`]; returns its report."""
    return DPORecipe(script_args, training_args, model_args, recipe_args).run()


def iterative_main(iter_args: IterativeArguments, training_args: IterativeDPOConfig, model_args) -> list[dict]:
    """`trl-dpo-ext iterative`: the [`IterativeRecipe`]; returns the rounds' summaries."""
    return IterativeRecipe(iter_args, training_args, model_args).run()


def _clip(reply, width: int = 160) -> str:
    text = " ".join(reply.text.split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    return f"{text!r}{'' if reply.finished else ' [cut off]'}"
