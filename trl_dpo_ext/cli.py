"""`trl-dpo-ext`: the package's command line.

    trl-dpo-ext dpo [--config FILE] [FLAGS]     train: the QLoRA DPO recipe (`trl_dpo_ext.recipe`)
    trl-dpo-ext iterative [FLAGS]               iterative DPO: sample from the policy, score, DPO; R rounds
    trl-dpo-ext pairs --output FILE ...         build preference pairs from prompts and a reward model or function
    trl-dpo-ext merge --adapter DIR --out DIR   a plain model: dequantized base + merged LoRA, safetensors
    trl-dpo-ext score --adapter DIR ...         held-out preference accuracy of the adapter's implicit reward
    trl-dpo-ext plot --metrics FILE             metrics_history.json -> PNG
    trl-dpo-ext env                             versions and CUDA visibility, for bug reports

Every command takes `--help`; the ones with settings read them as TRL scripts do (`TrlParser`: dataclass fields as
flags, `--config FILE` for YAML). `python -m trl_dpo_ext.cli` and `accelerate launch -m trl_dpo_ext.cli` work too.

A mistake the user can fix ends the command with `error: MESSAGE` on stderr and exit status 2, no traceback
(`trl-dpo-ext --debug COMMAND ...` or `TRL_DPO_EXT_DEBUG=1` shows it; see `trl_dpo_ext.errors`).

This module imports no torch, transformers or TRL at the top: `--help` prints help stored in
`trl_dpo_ext/data/cli_help.json` (generated from the parsers, see `write_help_cache`) without them, and a command
imports what it needs when it runs.
"""

import contextlib
import importlib
import importlib.util
import json
import os
import sys
from argparse import ArgumentParser, RawDescriptionHelpFormatter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from .errors import DEBUG_ENV, exit_status_of
from .quiet import silence_known_noise


@dataclass
class PairsArguments:
    """Settings of `trl-dpo-ext pairs`."""

    output: str = field(metadata={"help": "Where to write the pairs: a .jsonl or .parquet file."})
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: a .txt file (one per line), a .jsonl/.json/.parquet/.csv file or dataset with a "
            "'prompt' column (strings, or message lists rendered by the chat template). Default: the training "
            "prompts of the bundled toy set."
        },
    )
    prompts_split: str = field(default="train", metadata={"help": "Split to read when `prompts` has several."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Policy to sample from (the DPO run's reference). Default: the embedded tiny model."},
    )
    reward_model: str | None = field(
        default=None,
        metadata={"help": "Reward model (a *ForSequenceClassification with num_labels=1): a directory or Hub id."},
    )
    reward_fn: str | None = field(
        default=None,
        metadata={
            "help": "Reward function 'module:function' or 'path/to/file.py:function', called as "
            "function(prompts, completions) -> scores on texts. Exclusive with `reward_model`."
        },
    )
    k: int = field(default=4, metadata={"help": "Completions per prompt; the best and the worst form the pair."})
    max_new_tokens: int = field(default=53, metadata={"help": "Maximum new tokens per completion."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generate call."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a completion that never emits EOS."}
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed."})


@dataclass
class MergeArguments:
    """Settings of `trl-dpo-ext merge`."""

    adapter: str = field(metadata={"help": "Adapter directory saved by the trainer (a run's output_dir)."})
    out: str = field(metadata={"help": "Directory for the merged model and tokenizer."})
    dtype: str = field(
        default="bf16", metadata={"help": "Dtype of the saved weights.", "choices": ["bf16", "fp16", "fp32"]}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty --out."})
    base_model: str | None = field(
        default=None, metadata={"help": "Base model to merge into; default: the one in adapter_config.json."}
    )
    device: str = field(
        default="cpu", metadata={"help": "Where to dequantize and merge ('cuda' is faster if the model fits)."}
    )


@dataclass
class ScoreArguments:
    """Settings of `trl-dpo-ext score`."""

    adapter: str = field(metadata={"help": "Adapter directory saved by the trainer (a run's output_dir)."})
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Preference pairs to score: a local .jsonl/.parquet/.csv file, a saved dataset directory or a "
            "Hub id. Default: the bundled toy set."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Split to score; a dataset with a single split is scored whole."}
    )
    max_pairs: int | None = field(default=None, metadata={"help": "Score only the first N pairs."})
    dataset_format: str = field(
        default="as_is",
        metadata={
            "help": "As the recipe's flag: 'chat' renders transcripts through the chat template.",
            "choices": ["as_is", "chat"],
        },
    )
    beta: float | None = field(default=None, metadata={"help": "Override the β read from the adapter."})
    batch_size: int | None = field(
        default=None, metadata={"help": "Pairs per forward; default: the run's per_device_eval_batch_size."}
    )


@dataclass
class PlotArguments:
    """Settings of `trl-dpo-ext plot`."""

    metrics: str = field(metadata={"help": "A metrics_history.json file, or the run directory holding one."})
    out: str | None = field(
        default=None,
        metadata={
            "help": "PNG to write; default: metrics_plot.png beside the history (training's own plot, metrics.png, "
            "is left alone)."
        },
    )
    keys: list[str] | None = field(
        default=None,
        metadata={"help": "Metrics to plot, one panel each; default: loss, rewards/accuracies, rewards/margins, kl."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace --out if it exists (it is refused otherwise)."})


def run_dpo(argv: list[str]) -> int:
    from . import recipe

    recipe.main(*recipe.parse(argv, prog="trl-dpo-ext dpo"))
    return 0


def run_iterative(argv: list[str]) -> int:
    from . import train_iterative

    train_iterative.main(*train_iterative.parse(argv, prog="trl-dpo-ext iterative"))
    return 0


def run_pairs(args: PairsArguments) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from .atomic import atomic_write
    from .pairs import build_preference_pairs
    from .smollm2 import resolve_model_name
    from .tiny_model import default_model_path

    output = Path(args.output)
    if output.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"--output must end in .jsonl or .parquet, got {output}")
    if (args.reward_model is None) == (args.reward_fn is None):
        raise ValueError("pass exactly one of --reward_model and --reward_fn")
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy_path = resolve_model_name(args.model_name_or_path) or str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype="auto", device_map={"": device})
    reward_model = None
    if args.reward_model:
        reward_model = AutoModelForSequenceClassification.from_pretrained(
            args.reward_model, dtype="auto", device_map={"": device}
        )
    prompts = load_prompts(args.prompts, args.prompts_split, tokenizer)
    if args.max_prompts is not None:
        prompts = prompts[: args.max_prompts]
    pairs = build_preference_pairs(
        policy,
        tokenizer,
        prompts,
        reward_fn=reward_fn,
        reward_model=reward_model,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        batch_size=args.batch_size,
        missing_eos_penalty=args.missing_eos_penalty,
        seed=args.seed,
    )
    with atomic_write(output, "wb") as handle:
        (pairs.to_json if output.suffix == ".jsonl" else pairs.to_parquet)(handle)
    print(f"Wrote {len(pairs)} preference pairs from {len(prompts)} prompts to {output}")
    return 0


def load_reward_fn(spec: str) -> Callable:
    """
    The function named by `"module:function"` or `"path/to/file.py:function"`.

    Example:
    ```python
    >>> load_reward_fn("os.path:join")("a", "b")
    'a/b'
    ```
    """
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise ValueError(f"--reward_fn must look like 'module:function' or 'file.py:function', got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"--reward_fn {spec!r}: no file {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"--reward_fn {spec!r}: {module_name} has no function {name!r}")
    return function


def load_prompts(source: str | None, split: str, tokenizer) -> list[str]:
    """Prompt texts from `source` (see `PairsArguments.prompts`); message lists go through the chat template."""
    from .preference_data import bundled_preference_dataset, load_preference_dataset

    if source is not None and source.endswith(".txt"):
        prompts = [line for line in Path(source).read_text().splitlines() if line.strip()]
    else:
        dataset = bundled_preference_dataset() if source is None else load_preference_dataset(source)
        rows = dataset[split] if split in dataset else dataset[next(iter(dataset))]
        if "prompt" not in rows.column_names:
            raise ValueError(f"{source}: no 'prompt' column; columns are {rows.column_names}")
        prompts = rows["prompt"]
    return [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) if isinstance(p, list) else p
        for p in prompts
    ]


def check_adapter_dir(adapter: str) -> None:
    """Raise a `ValueError` unless `adapter` is a directory with a saved LoRA adapter (`adapter_config.json`)."""
    path = Path(adapter)
    if not path.is_dir():
        raise ValueError(
            f"--adapter {path}: no such directory. Pass a training run's output_dir (or one of its checkpoint-N "
            "directories)."
        )
    if not (path / "adapter_config.json").is_file():
        raise ValueError(
            f"--adapter {path} holds no adapter_config.json, so it is no saved adapter. Pass a training run's "
            "output_dir (or one of its checkpoint-N directories)."
        )


def run_merge(args: MergeArguments) -> int:
    from .export import merge_adapter

    check_adapter_dir(args.adapter)
    out = merge_adapter(args.adapter, args.out, args.dtype, args.overwrite, args.base_model, args.device)
    print(f"Merged model ({args.dtype}) saved to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it")
    return 0


def run_score(args: ScoreArguments) -> int:
    from datasets import DatasetDict

    from .implicit_reward import ImplicitReward
    from .preference_data import load_preference_dataset, to_conversational

    check_adapter_dir(args.adapter)
    dataset = load_preference_dataset(args.dataset_name, args.dataset_config)
    if args.dataset_test_split in dataset:
        pairs = dataset[args.dataset_test_split]
    elif isinstance(dataset, DatasetDict) and len(dataset) == 1:
        pairs = next(iter(dataset.values()))
    else:
        raise ValueError(f"no split {args.dataset_test_split!r} to score; splits: {list(dataset)}")
    if args.max_pairs is not None:
        pairs = pairs.select(range(min(args.max_pairs, len(pairs))))
    if args.dataset_format == "chat":
        pairs = to_conversational(pairs)
    reward = ImplicitReward.from_pretrained(args.adapter, beta=args.beta, batch_size=args.batch_size)
    accuracy = reward.accuracy(pairs)
    print(f"Held-out reward accuracy ({len(pairs)} pairs): {accuracy:.3f}")
    return 0


def run_plot(args: PlotArguments) -> int:
    from .metrics import MetricsHistoryCallback, plot_metrics

    path = Path(args.metrics)
    if path.is_dir():
        path = path / "metrics_history.json"
    if not path.is_file():
        raise ValueError(f"--metrics {path}: no such file (a training run writes metrics_history.json at its end).")
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--metrics {path}: not a metrics history (JSON): {error}") from error
    keys = tuple(args.keys or MetricsHistoryCallback.PLOTTED)
    available = sorted({key for row in history for key, value in row.items() if isinstance(value, (int, float))})
    missing = [key for key in keys if key not in available]
    if missing:
        raise ValueError(f"{path} has no metric {missing[0]!r}; it has {available}")
    out = Path(args.out) if args.out else path.with_name("metrics_plot.png")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it, or --out to write elsewhere.")
    out = plot_metrics(history, out, keys)
    print(f"Plot of {', '.join(keys)} saved to {out}")
    return 0


def env_info() -> dict[str, str]:
    """The versions a bug report needs, and whether CUDA is visible to torch."""
    import torch

    info = {"trl_dpo_ext": version("trl_dpo_ext")}
    for package in ("torch", "trl", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        info[package] = version(package)
    info["CUDA visible"] = f"yes ({torch.cuda.device_count()} device(s))" if torch.cuda.is_available() else "no"
    info["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    info["torch CUDA build"] = torch.version.cuda or "none (CPU build)"
    if torch.cuda.is_available():
        info["GPUs"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        info["bf16 supported"] = "yes" if torch.cuda.is_bf16_supported() else "no"
    return info


def run_env() -> int:
    print("\n".join(f"- {name}: {value}" for name, value in env_info().items()))
    return 0


CONFIG_HELP = "--config FILE reads these settings from a YAML file; flags override it."


@dataclass
class Command:
    help: str
    arguments: type | None
    run: Callable


COMMANDS = {
    "dpo": Command("Train with DPO: LoRA on a 4-bit base (the QLoRA recipe; --config FILE for YAML).", None, run_dpo),
    "iterative": Command(
        "Iterative DPO: rounds of sampling from the policy, scoring, and DPO on one 4-bit base.", None, run_iterative
    ),
    "pairs": Command("Build preference pairs: k samples per prompt, best and worst.", PairsArguments, run_pairs),
    "merge": Command("Merge an adapter into its dequantized base: a plain model.", MergeArguments, run_merge),
    "score": Command("Held-out preference accuracy of an adapter's implicit reward.", ScoreArguments, run_score),
    "plot": Command("Plot a metrics_history.json to PNG.", PlotArguments, run_plot),
    "env": Command("Print versions and CUDA visibility, for bug reports.", None, run_env),
}


HELP_CACHE = Path(__file__).parent / "data" / "cli_help.json"
HELP_WIDTH = 100
# The help texts are those of the parsers of these packages' versions; with others installed it is rendered live.
HELP_PACKAGES = ("trl", "transformers")


def command_parser(name: str):
    """The `TrlParser` that `trl-dpo-ext NAME` parses its arguments with (imports TRL)."""
    from trl import TrlParser

    from . import recipe

    command = COMMANDS[name]
    prog = f"trl-dpo-ext {name}"
    if name == "dpo":
        return recipe.make_parser(prog=prog)
    if name == "iterative":
        from . import train_iterative

        return train_iterative.make_parser(prog=prog)
    if command.arguments is None:
        return TrlParser((), prog=prog, description=command.help)
    return TrlParser(command.arguments, prog=prog, description=command.help, epilog=CONFIG_HELP)


@contextlib.contextmanager
def _columns(width: int) -> Iterator[None]:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps help to $COLUMNS
    try:
        yield
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def render_help(name: str) -> str:
    """`trl-dpo-ext NAME --help` as its parser prints it, wrapped at `HELP_WIDTH` columns."""
    with _columns(HELP_WIDTH):
        return command_parser(name).format_help()


def write_help_cache() -> Path:
    """Regenerate `HELP_CACHE` from the parsers: `python -c "from trl_dpo_ext import cli; cli.write_help_cache()"`."""
    from .atomic import atomic_write

    cache = {"versions": _help_versions(), "help": {name: render_help(name) for name in COMMANDS}}
    with atomic_write(HELP_CACHE, encoding="utf-8") as handle:
        json.dump(cache, handle, indent=1, ensure_ascii=False)
        handle.write("\n")
    return HELP_CACHE


def _help_versions() -> dict[str, str]:
    return {package: version(package) for package in HELP_PACKAGES}


def stored_help(name: str) -> str | None:
    """The stored `--help` of command `name`, or None when the installed TRL/transformers are not the ones it shows."""
    try:
        cache = json.loads(HELP_CACHE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if cache.get("versions") != _help_versions():
        return None
    return cache["help"].get(name)


def main(argv: list[str] | None = None) -> int:
    """
    Run `trl-dpo-ext [--debug] COMMAND [ARGS]`; returns the exit status. User errors (see `trl_dpo_ext.errors`) are
    printed as `error: MESSAGE` with status 2; `--debug` (before the command) re-raises them with the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before the command only: after it, `--debug` is transformers' TrainingArguments.debug.
    debug = argv[:1] == ["--debug"]
    silence_known_noise()
    return exit_status_of(_main, argv[debug:], debug=debug)


def _main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="trl-dpo-ext",
        description="DPO with QLoRA on one GPU, as a TRL plugin.",
        formatter_class=RawDescriptionHelpFormatter,
        epilog="Run `trl-dpo-ext COMMAND --help` for the settings of a command. `trl-dpo-ext --debug COMMAND ...` "
        f"(or {DEBUG_ENV}=1) shows the traceback of an error.",
    )
    parser.add_argument("--debug", action="store_true", help="Show the traceback of an error (before COMMAND).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        commands.add_parser(name, help=command.help, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r} (choose from {', '.join(COMMANDS)})")
    if "-h" in rest or "--help" in rest:
        # The stored text when it matches the installed TRL/transformers (no import of them), else the parser's.
        print(stored_help(name) or command_parser(name).format_help(), end="")
        return 0
    if name in ("dpo", "iterative"):
        return COMMANDS[name].run(rest)
    parsed = command_parser(name).parse_args_and_config(rest)
    return COMMANDS[name].run(*parsed)


def run_recipe(argv: list[str] | None) -> int:
    """`recipes/dpo_qlora.py`'s entry point: the recipe, errors reported as `main` does."""
    silence_known_noise()

    def run() -> None:
        from . import recipe

        recipe.main(*recipe.parse(argv))

    return exit_status_of(run)


if __name__ == "__main__":
    raise SystemExit(main())
