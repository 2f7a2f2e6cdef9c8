"""Shared fixtures: everything offline, tiny, and built inside the test session."""

import os


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from cpu_settings import CPU_ARGS  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: E402

from trl_dpo_ext import DPOConfig  # noqa: E402
from trl_dpo_ext.models import nf4_config  # noqa: E402
from trl_dpo_ext.preference_data import bundled_preference_dataset  # noqa: E402
from trl_dpo_ext.tiny_model import build_tokenizer, tiny_llama_config  # noqa: E402


PAIRS = [
    {"prompt": "User: Is the Acme kettle good?\nAssistant:", "chosen": " Sure! It is great.", "rejected": " No."},
    {"prompt": "User: Help me?\nAssistant:", "chosen": " Sure! Happy to help you.", "rejected": " No. Go away."},
    {"prompt": "User: Recommend a lamp.\nAssistant:", "chosen": " The Nova lamp.", "rejected": " Any lamp is bad."},
    {"prompt": "User: Hi\nAssistant:", "chosen": " Hello! How can I help?", "rejected": " What?"},
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny Llama (random weights, seed 0) and a locally trained BPE tokenizer."""
    path = tmp_path_factory.mktemp("tiny")
    texts = [row[k] for row in bundled_preference_dataset()["train"] for k in ("prompt", "chosen", "rejected")]
    tokenizer = build_tokenizer(texts + [v for row in PAIRS for v in row.values()])
    tokenizer.save_pretrained(path)
    config = tiny_llama_config(
        len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the installed GGUF into this session's temp dir: once per session (the
    conversion itself is under test in test_smollm2.py), shared by every test that needs the real model."""
    from trl_dpo_ext import smollm2

    return smollm2.smollm2_path(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture
def pairs() -> Dataset:
    return Dataset.from_list(PAIRS)


@pytest.fixture
def toy():
    return bundled_preference_dataset()


@pytest.fixture
def load_4bit(tiny_dir):
    """A fresh, independent 4-bit copy of the tiny base (for comparisons only; the trainer never loads two)."""

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=nf4_config(torch.float32))

    return load


@pytest.fixture
def dpo_args(tmp_path):
    """CPU settings shared by stock TRL and ours: fp32, no checkpointing, no reporting, no checkpoints."""

    def make(**overrides) -> DPOConfig:
        kwargs = dict(output_dir=str(tmp_path / "out"), **CPU_ARGS)
        kwargs.update(overrides)
        return DPOConfig(**kwargs)

    return make


@pytest.fixture(scope="session")
def ddp_runs(tmp_path_factory):
    """The recipe as DDP on 2 CPU processes and as 1 process (`tests/launches.py`): launched once per session, for
    test_distributed.py and test_sharded.py, which compares FSDP2 and ZeRO-3 with the same DDP run."""
    from launches import ddp_runs

    return ddp_runs(tmp_path_factory)
