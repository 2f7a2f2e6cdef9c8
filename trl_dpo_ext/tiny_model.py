"""The embedded default: a tiny Llama-style model and a byte-level BPE tokenizer, both built here, never downloaded.

`default_model_path()` builds them once under the cache dir and returns the directory, which `from_pretrained` (and so
4-bit loading) reads like any Hub checkpoint. The tokenizer is trained on the bundled preference set; being byte-level
it still encodes any text.
"""

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .atomic import atomic_dir
from .paths import cache_dir
from .preference_data import BUNDLED_DATASET


TINY_NAME = "tiny-llama"  # the name `--model_name_or_path` accepts for it (see `model_source`)
# Its cache directory: bump the suffix when `default_model_path` builds something else.
TINY_MODEL_NAME = f"{TINY_NAME}-v1"
SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}
# A small chat template so conversational preference rows can run on the default model.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}<|eos|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (seconds on a CPU) with pad/bos/eos tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """A ~0.2M-parameter Llama: big enough to learn the toy preference, small enough for a 2-core CPU."""
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**kwargs, **overrides})


def default_model_path(root: Path | None = None) -> Path:
    """Build (once) and return the directory of the default tiny model and its tokenizer."""

    def build(staging: Path) -> None:
        rows = [json.loads(line) for line in BUNDLED_DATASET.read_text().splitlines()]
        tokenizer = build_tokenizer([row[key] for row in rows for key in ("prompt", "chosen", "rejected")])
        tokenizer.save_pretrained(staging)
        config = tiny_llama_config(
            len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        with torch.random.fork_rng():
            torch.manual_seed(0)
            LlamaForCausalLM(config).save_pretrained(staging)

    return _build_once((root or cache_dir()) / TINY_MODEL_NAME, build)


def default_reward_model_path(root: Path | None = None) -> Path:
    """Build (once) a tiny `LlamaForSequenceClassification` reward model (num_labels=1, random weights) sharing the
    default policy's tokenizer: enough to run a PPO-shaped pipeline offline, not a meaningful reward."""
    from transformers import LlamaForSequenceClassification

    policy = default_model_path(root)

    def build(staging: Path) -> None:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(policy)
        tokenizer.save_pretrained(staging)
        config = tiny_llama_config(len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            LlamaForSequenceClassification(config).save_pretrained(staging)

    return _build_once(policy.parent / f"{TINY_MODEL_NAME}-reward", build)


def _build_once(target: Path, build) -> Path:
    # Build in a temp dir and rename: a crash or a concurrent process never sees half a model.
    if (target / "config.json").exists():
        return target
    try:
        with atomic_dir(target, replace=False) as staging:
            build(staging)
    except OSError:
        if not (target / "config.json").exists():
            raise
        # Another process won the race; its copy is identical.
    return target
