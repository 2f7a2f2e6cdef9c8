"""Local stand-ins for the Hub models and datasets that TRL's `tests/test_dpo_trainer.py` names.

TRL's tests load `trl-internal-testing/*` checkpoints and datasets from the Hub. Offline, this module builds tiny
models of the same architectures (random weights, from a config) into a Hugging Face cache directory laid out as the
Hub client lays it out, so `from_pretrained("trl-internal-testing/tiny-Qwen2ForCausalLM-2.5")` resolves with
`HF_HUB_OFFLINE=1` and no code of the test changes; and it replaces `datasets.load_dataset` for the dataset ids by
small datasets with the same configs, splits and columns (every other call goes to the real `load_dataset`).

What differs from the Hub copies, and why it does not matter to a trainer test:
- one byte-level BPE tokenizer (trained here) with a Qwen-style chat template that renders system prompts, tools,
  tool calls, tool responses and `thinking` serves every model; the Hub copies carry each model's own tokenizer;
- weights are random (so are the Hub's tiny models) and sizes are smaller;
- the datasets hold a few rows of the same shape and formats as `trl-internal-testing/zen`, `toolcall`, `harmony`.
The vision-language models and the image datasets (`zen-image`, `zen-multi-image`) are in `vlm_standins.py`.
"""

import json
import os
from pathlib import Path


ORG = "trl-internal-testing"
COMMIT = "0" * 40  # the snapshot every stand-in is filed under (refs/main points to it)

# Hub id → (model_type, config overrides). Sizes are tiny; MoE models keep several experts so routing runs.
TEXT_MODELS = {
    "tiny-Qwen2ForCausalLM-2.5": ("qwen2", {}),
    "tiny-Cohere2ForCausalLM": ("cohere2", {}),
    "tiny-Olmo3ForCausalLM": ("olmo3", {}),
    "tiny-Lfm2ForCausalLM": ("lfm2", {}),
    "tiny-Lfm2ForCausalLM-2.5": ("lfm2", {}),
    "tiny-Glm4MoeForCausalLM": (
        "glm4_moe",
        dict(
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            rope_scaling=None,
        ),
    ),
    "tiny-GptOssForCausalLM": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2)),
    "tiny-Qwen3MoeForCausalLM": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
    "tiny-NemotronHForCausalLM-nano": (
        "nemotron_h",
        dict(
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            mamba_num_heads=4,
            mamba_head_dim=8,
            ssm_state_size=16,
            n_groups=1,
        ),
    ),
}
REMOTE_MODEL = "tiny-RemoteForCausalLM"
COMMON_CONFIG = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
    max_position_embeddings=1024,
)

# A Qwen-style template: the tests' own `chat_template_kwargs` case replaces it with Qwen's; tools, tool calls,
# tool responses (the `toolcall` set) and `thinking` (the `harmony` set) render too. Written as one expression
# per piece so that Jinja's trim_blocks/lstrip_blocks, which transformers turns on, change nothing.
CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' -%}{%- set system = messages[0].content -%}"
    "{%- else -%}{%- set system = 'You are a helpful assistant.' -%}{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system -}}"
    "{%- if tools -%}{{- '\\n# Tools\\n' -}}{%- for tool in tools -%}{{- tool | tojson + '\\n' -}}{%- endfor -%}"
    "{%- endif -%}{{- '<|im_end|>\\n' -}}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' and loop.first -%}"
    "{%- elif message.role == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- elif message.role == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if message.thinking -%}{{- '<think>' + message.thinking + '</think>\\n' -}}{%- endif -%}"
    "{%- if message.content -%}{{- message.content -}}{%- endif -%}"
    "{%- for call in message.tool_calls or [] -%}"
    "{{- '<tool_call>' + (call.function | tojson) + '</tool_call>' -}}{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# (prompt, chosen, rejected) of a zen-like set: short, plain facts.
_ZEN = [
    ("The sky is", " blue.", " green."),
    ("The sun is", " bright.", " dark."),
    ("Water is", " wet.", " dry."),
    ("Fire is", " hot.", " cold."),
    ("Ice is", " cold.", " warm."),
    ("Grass is", " green.", " purple."),
    ("Snow is", " white.", " black."),
    ("The night is", " dark.", " bright."),
    ("Sugar is", " sweet.", " salty."),
    ("Lemons are", " sour.", " sweet."),
    ("Stones are", " hard.", " soft."),
    ("Feathers are", " light.", " heavy."),
    ("Deserts are", " dry.", " wet."),
    ("The ocean is", " deep.", " shallow."),
    ("Cheetahs are", " fast.", " slow."),
    ("Snails are", " slow.", " fast."),
    ("Mountains are", " tall.", " flat."),
    ("Silence is", " quiet.", " loud."),
    ("Thunder is", " loud.", " quiet."),
    ("Honey is", " sticky.", " dry."),
]
_ZEN_TRAIN, _ZEN_TEST = _ZEN[:17], _ZEN[17:]

_TOOLS = json.dumps(
    [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current temperature of a city in degrees Celsius.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
)
_CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Seoul"]


def _zen_rows(config: str, rows: list[tuple[str, str, str]]) -> list[dict]:
    def user(text):
        return [{"role": "user", "content": f"Complete: {text}"}]

    def assistant(text):
        return [{"role": "assistant", "content": text.strip()}]

    if config == "standard_preference":
        return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows]
    if config == "conversational_preference":
        return [{"prompt": user(p), "chosen": assistant(c), "rejected": assistant(r)} for p, c, r in rows]
    if config == "standard_implicit_prompt_preference":
        return [{"chosen": p + c, "rejected": p + r} for p, c, r in rows]
    if config == "conversational_implicit_prompt_preference":
        return [{"chosen": user(p) + assistant(c), "rejected": user(p) + assistant(r)} for p, c, r in rows]
    if config == "standard_unpaired_preference":
        return [
            row
            for p, c, r in rows
            for row in ({"prompt": p, "completion": c, "label": True}, {"prompt": p, "completion": r, "label": False})
        ]
    raise ValueError(f"no stand-in for {ORG}/zen config {config!r}")


def _toolcall_rows(cities: list[str]) -> list[dict]:
    rows = []
    for i, city in enumerate(cities):
        call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"How warm is it in {city}?"}],
                "chosen": [
                    {"role": "assistant", "tool_calls": [call]},
                    {"role": "tool", "name": "get_weather", "content": str(10 + i)},
                    {"role": "assistant", "content": f"It is {10 + i} degrees in {city}."},
                ],
                "rejected": [{"role": "assistant", "content": "I cannot know that."}],
                "tools": _TOOLS,
            }
        )
    return rows


def _harmony_rows(rows: list[tuple[str, str, str]]) -> list[dict]:
    return [
        {
            "prompt": [{"role": "system", "content": "Reasoning: low"}, {"role": "user", "content": f"Complete: {p}"}],
            "chosen": [{"role": "assistant", "thinking": "Say what is true.", "content": c.strip()}],
            "rejected": [{"role": "assistant", "thinking": "Say anything.", "content": r.strip()}],
        }
        for p, c, r in rows
    ]


def dataset_rows(path: str, name: str | None) -> dict[str, list[dict]] | None:
    """The rows of each split of a stand-in dataset, or None when `path` is not a dataset with a stand-in."""
    if path == f"{ORG}/zen":
        return {"train": _zen_rows(name, _ZEN_TRAIN), "test": _zen_rows(name, _ZEN_TEST)}
    if path == f"{ORG}/toolcall" and name == "preference":
        return {"train": _toolcall_rows(_CITIES[:6]), "test": _toolcall_rows(_CITIES[6:])}
    if path == f"{ORG}/harmony" and name == "preference":
        return {"train": _harmony_rows(_ZEN_TRAIN), "test": _harmony_rows(_ZEN_TEST)}
    if path in (f"{ORG}/zen-image", f"{ORG}/zen-multi-image"):
        # Imported here: vlm_standins builds on this module (its tokenizer and rows).
        if __package__:
            from .vlm_standins import image_dataset_rows
        else:
            from vlm_standins import image_dataset_rows

        rows = image_dataset_rows(path, name)
        if rows is None:
            raise ValueError(f"no stand-in for {path} config {name!r}")
        return rows
    return None


def patch_load_dataset() -> None:
    """Route `datasets.load_dataset` for the stand-in ids to the rows above (splits and `streaming=` as the Hub's)."""
    import datasets

    real = datasets.load_dataset

    def load_dataset(path, name=None, *args, split=None, streaming=False, **kwargs):
        splits = dataset_rows(path, name)
        if splits is None:
            return real(path, name, *args, split=split, streaming=streaming, **kwargs)
        built = {key: datasets.Dataset.from_list(rows) for key, rows in splits.items()}
        if streaming:
            built = {key: ds.to_iterable_dataset() for key, ds in built.items()}
            return built[split] if split else datasets.IterableDatasetDict(built)
        return built[split] if split else datasets.DatasetDict(built)

    datasets.load_dataset = load_dataset


def _corpus() -> list[str]:
    texts = [t for row in _ZEN for t in row] + ["Complete:", "It is", "degrees in", "How warm is it in"]
    texts += _CITIES + [CHAT_TEMPLATE, _TOOLS, "You are a helpful assistant.", "<tool_call>", "<think>"]
    texts += ["This is a very long prompt that fills up the whole max_length budget on its own", "Hi there bye"]
    return texts


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


_REMOTE_CODE = '''"""A custom architecture loaded with trust_remote_code (a Llama under another name)."""
from transformers import LlamaConfig, LlamaForCausalLM


class RemoteConfig(LlamaConfig):
    model_type = "remote"


class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig
'''


def build_hub_cache(cache: Path) -> Path:
    """Build every model stand-in once under `cache` (an `HF_HUB_CACHE`); returns `cache`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    tokenizer = None
    ids = dict(vocab_size=None, pad_token_id=None, eos_token_id=None, bos_token_id=None)
    for name in [*TEXT_MODELS, REMOTE_MODEL]:
        repo = cache / f"models--{ORG}--{name}"
        snapshot = repo / "snapshots" / COMMIT
        if (snapshot / "config.json").is_file():
            continue
        if tokenizer is None:
            tokenizer = build_tokenizer()
            ids = dict(
                vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=None,
            )
        staging = repo / "snapshots" / f".{COMMIT}.{os.getpid()}"
        torch.manual_seed(0)
        if name == REMOTE_MODEL:
            config = LlamaConfig(**COMMON_CONFIG, **ids, tie_word_embeddings=False)
            model = LlamaForCausalLM(config)
            model.save_pretrained(staging)
            (staging / "modeling_remote.py").write_text(_REMOTE_CODE)
            saved = json.loads((staging / "config.json").read_text())
            saved.update(
                model_type="remote",
                architectures=["RemoteForCausalLM"],
                auto_map={
                    "AutoConfig": "modeling_remote.RemoteConfig",
                    "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
                },
            )
            (staging / "config.json").write_text(json.dumps(saved, indent=2))
        else:
            model_type, overrides = TEXT_MODELS[name]
            config = AutoConfig.for_model(model_type, **{**COMMON_CONFIG, **ids, **overrides})
            AutoModelForCausalLM.from_config(config).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(snapshot)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
    if __package__:
        from .vlm_standins import build_vision_cache
    else:
        from vlm_standins import build_vision_cache

    return build_vision_cache(cache)
