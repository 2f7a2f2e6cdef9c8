"""The settings of the commands, beyond the trainer's (`config.py`): dataclasses whose fields are `TrlParser` flags and
YAML keys, validated in `__post_init__` where a value can be wrong on its own.
"""

from dataclasses import dataclass, field

from .model_source import MODEL_HELP
from .preference_data import DEFAULT_PROMPTS
from .sampling import DEFAULTS as SAMPLING_DEFAULTS
from .sampling import SamplingConfig


@dataclass
class RecipeArguments:
    """Recipe-only settings (not trainer settings)."""

    heldout_pairs: int = field(
        default=200,
        metadata={
            "help": "Pairs of the test split whose implicit-reward accuracy is measured before and after training; "
            "0 skips the measurement."
        },
    )
    heldout_generations: int = field(
        default=0,
        metadata={
            "help": "Distinct prompts of the test split the model answers greedily before and after training; the "
            "replies are scored by the rule of trl_dpo_ext.length_rule (ended on their own, shorter) and a few are "
            "printed. 0 skips it."
        },
    )
    generation_max_new_tokens: int = field(
        default=64,
        metadata={"help": "Token budget of those replies: one that has not ended by then counts as cut off."},
    )
    dataset_format: str = field(
        default="as_is",
        metadata={
            "help": "'as_is' trains on the rows as they come (TRL's standard or conversational formats); 'chat' turns "
            "standard rows whose prompt is a 'User: ...\\nAssistant:' transcript (like the bundled set) into "
            "conversational rows rendered by the tokenizer's chat template.",
            "choices": ["as_is", "chat"],
        },
    )

    def __post_init__(self):
        if self.heldout_pairs < 0:
            raise ValueError(f"`heldout_pairs` must be >= 0 (0 skips the measurement), got {self.heldout_pairs}.")
        if self.heldout_generations < 0:
            raise ValueError(f"`heldout_generations` must be >= 0 (0 skips it), got {self.heldout_generations}.")
        if self.generation_max_new_tokens < 1:
            raise ValueError(f"`generation_max_new_tokens` must be >= 1, got {self.generation_max_new_tokens}.")


@dataclass
class IterativeArguments:
    """What the rounds of `trl-dpo-ext iterative` sample from and how replies are scored."""

    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: a .txt file (one per line) or a preference/prompt dataset (file, saved dataset, bundled "
            f"name or Hub id; its 'prompt' column). Default: the bundled {DEFAULT_PROMPTS} prompts."
        },
    )
    prompts_split: str = field(default="train", metadata={"help": "Split of --prompts to read."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N distinct prompts."})
    reward: str = field(
        default="concise",
        metadata={
            "help": "'concise' (ended within max_new_tokens, then fewer words: trl_dpo_ext.length_rule), 'longer', "
            "'module:function' or 'path/to/file.py:function' called as function(prompts, completions) -> one score "
            "each, or a reward model directory."
        },
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "A reward model (num_labels=1) instead of --reward."}
    )


@dataclass
class PairsArguments:
    """Settings of `trl-dpo-ext pairs` (the sampling defaults are `trl_dpo_ext.sampling.SamplingConfig`'s)."""

    output: str = field(metadata={"help": "Where to write the pairs: a .jsonl or .parquet file."})
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: a .txt file (one per line), a .jsonl/.json/.parquet/.csv file or dataset with a "
            "'prompt' column (strings, or message lists rendered by the chat template); repeated prompts are "
            f"sampled once. Default: the bundled {DEFAULT_PROMPTS} prompts."
        },
    )
    prompts_split: str = field(default="train", metadata={"help": "Split to read when `prompts` has several."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N distinct prompts."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": f"Policy to sample from (the DPO run's reference). {MODEL_HELP}"}
    )
    reward_model: str | None = field(
        default=None,
        metadata={"help": "Reward model (a *ForSequenceClassification with num_labels=1): a directory or Hub id."},
    )
    reward_fn: str | None = field(
        default=None,
        metadata={
            "help": "Reward: 'concise', 'longer', 'module:function' or 'path/to/file.py:function' (called as "
            "function(prompts, completions) -> scores on texts), or a reward model directory; as `iterative "
            "--reward`. Exclusive with `reward_model`."
        },
    )
    k: int = field(
        default=SAMPLING_DEFAULTS.num_samples,
        metadata={"help": "Completions per prompt; the best and the worst form the pair."},
    )
    max_new_tokens: int = field(
        default=SAMPLING_DEFAULTS.max_new_tokens, metadata={"help": "Maximum new tokens per completion."}
    )
    temperature: float = field(default=SAMPLING_DEFAULTS.temperature, metadata={"help": "Sampling temperature."})
    batch_size: int = field(default=SAMPLING_DEFAULTS.batch_size, metadata={"help": "Prompts per generate call."})
    missing_eos_penalty: float | None = field(
        default=SAMPLING_DEFAULTS.missing_eos_penalty,
        metadata={
            "help": "Subtracted from the score of a completion that never emits EOS (default: the one the reward "
            "names, e.g. 'concise', else none)."
        },
    )
    seed: int = field(default=SAMPLING_DEFAULTS.seed, metadata={"help": "Sampling seed."})

    def sampling(self, reward_eos_penalty: float | None = None) -> SamplingConfig:
        """These settings as the sampler reads them; the reward's EOS penalty where none is set here."""
        penalty = self.missing_eos_penalty if self.missing_eos_penalty is not None else reward_eos_penalty
        return SamplingConfig.from_flags(
            {"num_samples": "k"}, num_samples=self.k, max_new_tokens=self.max_new_tokens,
            temperature=self.temperature, batch_size=self.batch_size, missing_eos_penalty=penalty, seed=self.seed,
        )  # fmt: skip


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
