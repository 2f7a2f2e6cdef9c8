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
import json
import os
import sys
from argparse import ArgumentParser, RawDescriptionHelpFormatter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DEBUG_ENV, exit_status_of
from .quiet import silence_known_noise


if TYPE_CHECKING:
    from . import command_args


def run_dpo(argv: list[str]) -> int:
    from . import recipe

    recipe.main(*recipe.parse(argv, prog="trl-dpo-ext dpo"))
    return 0


def run_iterative(argv: list[str]) -> int:
    from . import recipe

    recipe.iterative_main(*recipe.parse_iterative(argv, prog="trl-dpo-ext iterative"))
    return 0


def run_pairs(args: "command_args.PairsArguments") -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .atomic import atomic_write
    from .model_source import resolve_model_path
    from .pairs import build_preference_pairs
    from .sampling import Reward, load_prompts, load_reward

    output = Path(args.output)
    if output.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"--output must end in .jsonl or .parquet, got {output}")
    if (args.reward_model is None) == (args.reward_fn is None):
        raise ValueError("pass exactly one of --reward_model and --reward_fn")
    # The data and the reward first: a bad file or spec fails before any model loads.
    prompts = load_prompts(args.prompts, args.prompts_split, args.max_prompts)
    # --reward_model names a model (a directory or a Hub id); --reward_fn any reward spec.
    reward = load_reward(args.reward_fn, "--reward_fn") if args.reward_fn else Reward(model_path=args.reward_model)
    sampling = args.sampling(reward.missing_eos_penalty)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy_path = resolve_model_path(args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype="auto", device_map={"": device})
    pairs = build_preference_pairs(
        policy,
        tokenizer,
        prompts,
        reward_fn=reward.function,
        reward_model=reward.load_model(device),
        sampling=sampling,
    )
    with atomic_write(output, "wb") as handle:
        (pairs.to_json if output.suffix == ".jsonl" else pairs.to_parquet)(handle)
    print(f"Wrote {len(pairs)} preference pairs from {len(prompts)} prompts to {output}")
    return 0


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


def run_merge(args: "command_args.MergeArguments") -> int:
    from .export import merge_adapter

    check_adapter_dir(args.adapter)
    out = merge_adapter(args.adapter, args.out, args.dtype, args.overwrite, args.base_model, args.device)
    print(f"Merged model ({args.dtype}) saved to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it")
    return 0


def run_score(args: "command_args.ScoreArguments") -> int:
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


def run_plot(args: "command_args.PlotArguments") -> int:
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
    # The name of its settings dataclass in `command_args` (imported when the command parses: it imports TRL), or
    # None for a command that parses its own (`dpo`, `iterative`) or takes none.
    arguments_name: str | None
    run: Callable

    @property
    def arguments(self) -> type | None:
        from . import command_args

        return getattr(command_args, self.arguments_name) if self.arguments_name else None


COMMANDS = {
    "dpo": Command("Train with DPO: LoRA on a 4-bit base (the QLoRA recipe; --config FILE for YAML).", None, run_dpo),
    "iterative": Command(
        "Iterative DPO: rounds of sampling from the policy, scoring, and DPO on one 4-bit base.", None, run_iterative
    ),
    "pairs": Command("Build preference pairs: k samples per prompt, best and worst.", "PairsArguments", run_pairs),
    "merge": Command("Merge an adapter into its dequantized base: a plain model.", "MergeArguments", run_merge),
    "score": Command("Held-out preference accuracy of an adapter's implicit reward.", "ScoreArguments", run_score),
    "plot": Command("Plot a metrics_history.json to PNG.", "PlotArguments", run_plot),
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
        return recipe.make_iterative_parser(prog=prog)
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
