"""Sampling from a policy: its settings, the prompts, the reward that scores the samples, and the one generate loop.

Every command that samples goes through here — `trl-dpo-ext pairs`, iterative DPO's rounds, the PPO-shaped API and the
recipe's held-out replies — so they agree on what a setting means and what it defaults to:

- [`SamplingConfig`]: k, the token budget, temperature, batch size, the EOS penalty, the seed (the faces keep their
  own flag names — TRL's PPO `response_length`, iterative DPO's `num_samples` — and build one of these);
- [`load_prompts`]: prompts from a file or dataset, deduplicated; [`prompt_ids`]: as token ids, chat messages rendered
  by the tokenizer's chat template with the generation prompt, as TRL does;
- [`load_reward`]: a reward spec (`concise`, `longer`, `module:function`, `path/to/file.py:function`, or a reward
  model directory) as a function or a model;
- [`generate`]: batched `generate` over left-padded prompts, every token after a reply's first stop token masked;
  [`replies`] reads the result as texts; [`generation_model`] picks what generates (on a CPU, a dense copy).
"""

import contextlib
import importlib
import importlib.util
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from .length_rule import CONCISE_EOS_PENALTY, Reply, concise_reward, longer_reward
from .models import base_model, mask_pad_id, safe_pad_id
from .preference_data import DEFAULT_PROMPTS, load_preference_dataset


RewardFn = Callable[[list[str], list[str]], Sequence[float]]


@dataclass
class SamplingConfig:
    """
    How replies are sampled from a policy. The defaults are this package's, for every command that samples (TRL's
    PPO-shaped `PPOConfig` keeps TRL 1.12's own defaults).

    Args:
        num_samples: replies per prompt (k); the best and the worst of them make a preference pair.
        max_new_tokens: token budget of a reply.
        temperature: sampling temperature (pure temperature sampling: `top_k=0`, `top_p=1.0` unless set).
        batch_size: prompts per batched `generate` call.
        missing_eos_penalty: subtracted from the score of a reply that does not end within the budget (PPO's rule).
        seed: seeds the sampling without touching the caller's RNG state; `None` samples from the global RNG.
        do_sample: `False` for greedy replies (the recipe's held-out answers).
        top_p, top_k: nucleus and top-k filtering; `top_k=None` leaves it to the model's generation config.
    """

    num_samples: int = 4
    max_new_tokens: int = 64
    temperature: float = 0.7
    batch_size: int = 16
    missing_eos_penalty: float | None = None
    seed: int | None = 0
    do_sample: bool = True
    top_p: float = 1.0
    top_k: int | None = 0

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"`num_samples` must be >= 1, got {self.num_samples}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {self.max_new_tokens}.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"`temperature` must be a finite number > 0, got {self.temperature}.")
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {self.batch_size}.")

    @classmethod
    def from_flags(cls, names: Mapping[str, str], **values) -> "SamplingConfig":
        """Build from a face's settings; an error names the face's flag (`names` maps our field to it)."""
        try:
            return cls(**values)
        except ValueError as error:
            message = str(error)
            for name, flag in names.items():
                message = message.replace(f"`{name}`", f"`{flag}`")
            raise ValueError(message) from None


DEFAULTS = SamplingConfig()


def check_pair_samples(value: int, name: str) -> None:
    """A pair is the best and the worst of `value` samples: at least 2 are needed."""
    if value < 2:
        raise ValueError(f"`{name}` must be at least 2 to form a pair (best and worst), got {value}.")


# ---- prompts ----------------------------------------------------------------------------------------------------


def load_prompts(source: str | None = None, split: str = "train", max_prompts: int | None = None) -> list:
    """
    The distinct prompts of `source`, in order of first appearance (rows of one prompt share it): a `.txt` file (one
    prompt per line, blank lines skipped), or a preference/prompt dataset with a `prompt` column (a local file, a
    saved dataset, a bundled set's name or a Hub id; see [`trl_dpo_ext.load_preference_dataset`]) — its `split`, or
    its only split. Strings stay strings and message lists stay message lists ([`prompt_ids`] renders them).
    `None`: the default model's bundled prompts.
    """
    if source is not None and source.endswith(".txt"):
        prompts = [line for line in Path(source).read_text().splitlines() if line.strip()]
    else:
        data = load_preference_dataset(source or DEFAULT_PROMPTS)
        if split in data:
            rows = data[split]
        elif len(data) == 1:
            rows = next(iter(data.values()))
        else:
            raise ValueError(f"--prompts {source}: no split {split!r}; its splits are {list(data)}.")
        if "prompt" not in rows.column_names:
            raise ValueError(f"--prompts {source}: no 'prompt' column; columns are {rows.column_names}.")
        prompts = rows["prompt"]
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"`max_prompts` must be >= 1, got {max_prompts}.")
    prompts = distinct(prompts, max_prompts)
    if not prompts:
        raise ValueError(f"--prompts {source}: no prompts.")
    return prompts


def distinct(prompts: Sequence, limit: int | None = None) -> list:
    """The first `limit` (default: all) distinct prompts, in order of first appearance."""
    seen, kept = set(), []
    for prompt in prompts:
        if limit is not None and len(kept) == limit:
            break
        if repr(prompt) not in seen:
            seen.add(repr(prompt))
            kept.append(prompt)
    return kept


def _one_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False).input_ids
    if prompt and isinstance(prompt[0], dict):  # chat messages: rendered with the generation prompt, as TRL does
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    return list(prompt)


def prompt_ids(prompts, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """
    Prompts as token ids from a list of strings, chat message lists or id lists, or a `Dataset` with `input_ids` or
    `prompt`.
    """
    if isinstance(prompts, Dataset):
        if "input_ids" in prompts.column_names:
            prompts = prompts["input_ids"]
        elif "prompt" in prompts.column_names:
            prompts = prompts["prompt"]
        else:
            raise ValueError(
                f"prompt dataset needs an 'input_ids' (tokenized, as in TRL's PPO scripts) or a 'prompt' column; "
                f"got columns {prompts.column_names}"
            )
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts: the prompt set is empty")
    ids = [_one_prompt_ids(tokenizer, p) for p in prompts]
    for row, prompt in enumerate(ids):
        if not prompt:
            raise ValueError(f"prompt row {row} is empty")
    return ids


# ---- rewards ----------------------------------------------------------------------------------------------------

# Reward functions known by name.
NAMED_REWARDS: dict[str, RewardFn] = {"concise": concise_reward, "longer": longer_reward}
# The EOS penalty a named reward needs to mean what it says (the concise rule ranks a cut-off reply last).
NAMED_EOS_PENALTY = {"concise": CONCISE_EOS_PENALTY}


@dataclass(frozen=True)
class Reward:
    """A parsed reward spec: a function on texts, or a reward model's directory; and the EOS penalty it implies."""

    function: RewardFn | None = None
    model_path: str | None = None
    missing_eos_penalty: float | None = None

    def load_model(self, device: str | torch.device = "cpu") -> PreTrainedModel | None:
        """The reward model (`*ForSequenceClassification`, num_labels=1), or `None` for a reward function."""
        if self.model_path is None:
            return None
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            self.model_path, dtype="auto", device_map={"": device}
        )


def load_reward(spec: str, flag: str = "--reward") -> Reward:
    """
    A reward from its spec, the same forms for every command: a name of `NAMED_REWARDS` (`concise`, `longer`),
    `module:function` or `path/to/file.py:function` (called as `function(prompts, completions) -> scores`), or the
    directory of a reward model (a `*ForSequenceClassification` with `num_labels=1`). Errors name `flag`.

    Example:
    ```python
    >>> load_reward("os.path:join").function("a", "b")
    'a/b'
    ```
    """
    if spec in NAMED_REWARDS:
        return Reward(function=NAMED_REWARDS[spec], missing_eos_penalty=NAMED_EOS_PENALTY.get(spec))
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise ValueError(f"{flag} {spec!r}: a directory without config.json is no reward model.")
        return Reward(model_path=spec)
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise ValueError(
            f"{flag} must look like 'module:function' or 'file.py:function', got {spec!r} (or name a reward: "
            f"{', '.join(NAMED_REWARDS)}; or a reward model directory)"
        )
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"{flag} {spec!r}: no file {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"{flag} {spec!r}: cannot import {module_name}: {error}") from error
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{flag} {spec!r}: {module_name} has no function {name!r}")
    return Reward(function=function)


# ---- generation -------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    settings: SamplingConfig = DEFAULTS,
    stop_token_id: int | None = None,
    desc: str = "Sampling completions",
) -> list[tuple[torch.Tensor, int]]:
    """
    `settings.num_samples` replies per prompt (token ids) with batched `generate`, `settings.batch_size` prompts at a
    time, left-padded so that every prompt ends where its replies start; seeded by `settings.seed` without touching
    the caller's RNG state.

    Returns:
        One `(query_responses, context_length)` per batch: `query_responses` of shape `(b·k, context + new)` holds the
        left-padded prompt then the reply, every token after the reply's first stop token (default: EOS) replaced by
        the tokenizer's pad id — the layout `trl.experimental.utils.get_reward` scores.
    """
    stop = tokenizer.eos_token_id if stop_token_id is None else stop_token_id
    gen_pad, mask_pad = safe_pad_id(tokenizer, model), mask_pad_id(tokenizer, model)
    device = next(model.parameters()).device
    k = settings.num_samples
    if settings.do_sample:
        sampling = dict(do_sample=True, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    else:
        sampling = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    batches = []
    was_training = model.training
    model.eval()
    seeded = settings.do_sample and settings.seed is not None
    try:
        with torch.random.fork_rng(enabled=seeded):
            if seeded:
                torch.manual_seed(settings.seed)
            for start in tqdm(range(0, len(prompts), settings.batch_size), desc=desc, unit="batch"):
                chunk = prompts[start : start + settings.batch_size]
                width = max(map(len, chunk))
                input_ids = torch.tensor([[gen_pad] * (width - len(p)) + p for p in chunk], device=device)
                attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                out = model.generate(
                    input_ids=input_ids.repeat_interleave(k, dim=0),
                    attention_mask=attention.repeat_interleave(k, dim=0),
                    max_new_tokens=settings.max_new_tokens,
                    eos_token_id=stop,
                    pad_token_id=gen_pad,
                    **sampling,
                )
                response = out[:, width:]
                after_stop = (response == stop).long().cumsum(dim=1) - (response == stop).long() > 0
                response = response.masked_fill(after_stop, mask_pad)
                query = input_ids.masked_fill(attention == 0, mask_pad).repeat_interleave(k, dim=0)
                batches.append((torch.cat([query, response], dim=1), width))
    finally:
        model.train(was_training)
    return batches


def replies(
    batches: list[tuple[torch.Tensor, int]], tokenizer: PreTrainedTokenizerBase, stop_token_id: int | None = None
) -> list[Reply]:
    """The replies of [`generate`]'s batches, in order: the text before the first stop token (special tokens dropped,
    stripped) and whether the reply stopped within the budget."""
    stop = tokenizer.eos_token_id if stop_token_id is None else stop_token_id
    out = []
    for query_responses, context in batches:
        for ids in query_responses[:, context:]:
            ended = (ids == stop).nonzero()
            end = int(ended[0]) if len(ended) else len(ids)
            text = tokenizer.decode(ids[:end], skip_special_tokens=True).strip()
            out.append(Reply(text=text, finished=bool(len(ended))))
    return out


@torch.no_grad()
def dense_copy(model: torch.nn.Module) -> PreTrainedModel:
    """
    An fp32 model without quantization or adapter layers that computes what `model` computes: every 4-bit weight
    dequantized, the active LoRA adapter's `B·A·scale` added (none while adapters are disabled or absent).
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    source = base_model(model)
    config = source.config.__class__.from_dict(source.config.to_dict())
    config.__dict__.pop("quantization_config", None)
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, module in dense.named_modules():
        if not isinstance(module, torch.nn.Linear) and not isinstance(module, torch.nn.Embedding):
            continue
        held = source.get_submodule(name)
        layer = held.get_base_layer() if isinstance(held, LoraLayer) else held
        if isinstance(layer, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        else:
            weight = layer.weight.detach().float()
        if isinstance(held, LoraLayer) and not held.disable_adapters and not held.merged:
            for adapter in held.active_adapters:
                if adapter in held.lora_A:
                    weight = weight + held.get_delta_weight(adapter).float()
        module.weight.copy_(weight)
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(layer.bias.detach().float())
    for name, param in dense.named_parameters():  # norms and anything else that is not a linear/embedding weight
        owner = name.rsplit(".", 1)[0]
        if not isinstance(dense.get_submodule(owner), (torch.nn.Linear, torch.nn.Embedding)):
            param.copy_(source.get_parameter(name).detach().float())
    if config.tie_word_embeddings:
        dense.tie_weights()
    dense.generation_config = source.generation_config
    return dense.eval()


@contextlib.contextmanager
def generation_model(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """
    The model to generate with for `model` (a QLoRA policy) as it is now, in eval mode: on a CPU its dense copy
    ([`dense_copy`]: the same function up to rounding — SmolLM2's logits within 5e-5 of 31 — while bitsandbytes' CPU
    4-bit layers would dequantize every weight again for each new token), elsewhere the model itself: a dense fp32
    copy of a GPU-sized base would not fit beside it.
    """
    if next(model.parameters()).device.type == "cpu":
        dense = dense_copy(model)
        try:
            yield dense
        finally:
            del dense
        return
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def answer(model, tokenizer, prompts: Sequence, max_new_tokens: int, desc: str) -> list[Reply]:
    """Greedy replies of `model` (a QLoRA policy, as it is now) to `prompts`: the recipe's held-out answers."""
    if not prompts:
        return []
    greedy = SamplingConfig(num_samples=1, max_new_tokens=max_new_tokens, do_sample=False)
    with generation_model(model) as generator:
        return replies(
            generate(generator, tokenizer, prompt_ids(list(prompts), tokenizer), greedy, desc=desc), tokenizer
        )
