"""The on-disk reference log-prob cache and its key.

With the reference fixed (the 4-bit base with adapters off, or a frozen SFT adapter), π_ref(y|x) of a dataset never
changes, so it is computed once and stored: one safetensors file per key, holding the per-token log-probs of every
chosen and rejected answer (per token, not summed, so the `kl` metric still works). A second run, a β sweep or a
loss-type sweep on the same data then runs no reference forward at all.

The key holds what determines those numbers and nothing else:
- the reference weights: a hash of every non-LoRA tensor (and of the frozen reference adapter, if that is the
  reference) plus the quantization config — never the trained adapter, so a new LoRA initialisation or learning rate
  reuses the cache (transformers 5 no longer records a Hub commit on the config, so the weights themselves are hashed);
- the token ids of every prompt, chosen and rejected answer (which covers the tokenizer, its chat template and the
  dataset contents and order), max length and truncation mode;
- the layout (prompt sharing, packing), the attention kernel, the compute dtype and the torch/bitsandbytes versions.

Files are written atomically (temp file + rename) with a checksum; a truncated or corrupt file, or one whose recorded
key differs, is refused with a warning and recomputed — never trusted. Nothing is unpickled.
"""

import hashlib
import json
import logging
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
from datasets import Dataset

from .atomic import atomic_write
from .models import base_model


logger = logging.getLogger(__name__)

FORMAT_VERSION = "3"  # 2: a sequence's first token is never an answer token; 3: LM head on answer positions only
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
CACHE_COLUMNS = ("ref_chosen_token_logps", "ref_rejected_token_logps")


def weights_fingerprint(model: torch.nn.Module, reference_adapter: str | None = None) -> dict:
    """
    What identifies the reference weights: the quantization config and a hash of every tensor that is not a LoRA
    weight (plus the weights of `reference_adapter`, when that adapter is the reference).
    """
    base = base_model(model)
    config = base.config
    quantization = getattr(config, "quantization_config", None)
    quantization = None if quantization is None else json.loads(quantization.to_json_string(use_diff=False))
    fingerprint = {"quantization": quantization, "dtype": str(base.get_input_embeddings().weight.dtype)}
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name and (reference_adapter is None or f".{reference_adapter}." not in name):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return {**fingerprint, "weights_blake2b": digest.hexdigest()}


def tokens_fingerprint(dataset: Dataset) -> str:
    """Hash of the token ids of every row, in order: tokenizer, chat template, contents and order of the data."""
    digest = hashlib.blake2b(digest_size=16)
    for batch in dataset.select_columns(list(TOKEN_COLUMNS)).iter(batch_size=4096):
        for column in TOKEN_COLUMNS:
            for ids in batch[column]:
                digest.update(np.asarray(ids, dtype=np.int64).tobytes())
                digest.update(b"|")
    return digest.hexdigest()


def cache_key(weights: dict, dataset: Dataset, **settings) -> dict:
    """The full key: `weights_fingerprint(...)`, the dataset's tokens, and the layout/length `settings` given."""
    return {
        "format": FORMAT_VERSION,
        "weights": weights,
        "tokens": tokens_fingerprint(dataset),
        "num_rows": len(dataset),
        "versions": {name: _version(name) for name in ("torch", "bitsandbytes", "transformers")},
        **settings,
    }


def cache_path(root: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return Path(root) / f"ref_logps-{digest}.safetensors"


def save_reference_cache(path: Path, key: dict, chosen: list[list[float]], rejected: list[list[float]]) -> None:
    """Write per-token reference log-probs atomically, with the key and a checksum in the safetensors header."""
    tensors = {}
    for name, values in (("chosen", chosen), ("rejected", rejected)):
        tensors[name] = torch.tensor([v for answer in values for v in answer], dtype=torch.float32)
        tensors[f"{name}_offsets"] = torch.tensor(np.cumsum([0] + [len(a) for a in values]), dtype=torch.int64)
    metadata = {"key": json.dumps(key, sort_keys=True), "checksum": _checksum(tensors)}
    with atomic_write(path, "wb") as handle:
        handle.write(safetensors.torch.save(tensors, metadata=metadata))


def load_reference_cache(path: Path, key: dict) -> tuple[list[list[float]], list[list[float]]] | None:
    """The cached (chosen, rejected) per-token log-probs, or None — with a warning if a file exists but is refused."""
    if not path.exists():
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        if metadata.get("key") != json.dumps(key, sort_keys=True):
            raise ValueError("its recorded key does not match this run")
        if metadata.get("checksum") != _checksum(tensors):
            raise ValueError("checksum mismatch")
        answers = []
        for name in ("chosen", "rejected"):
            offsets = tensors[f"{name}_offsets"].tolist()
            if len(offsets) != key["num_rows"] + 1 or offsets[-1] != tensors[name].numel():
                raise ValueError("its offsets do not match the dataset")
            flat = tensors[name].tolist()
            answers.append([flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])])
    except Exception as error:  # a truncated or corrupt file surfaces as any of several errors
        warnings.warn(f"Reference cache {path} refused ({error}); recomputing it.", stacklevel=2)
        return None
    return answers[0], answers[1]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
