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

[`with_reference_cache`] is what [`trl_dpo_ext.DPOTrainer`] calls under `ref_cache=True`: the key of a dataset in the
trainer's layout, the file read or the values computed and written, and the dataset with the values as columns.
"""

import hashlib
import json
import logging
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pyarrow.compute as pc
import safetensors
import safetensors.torch
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .atomic import atomic_path
from .errors import DiskFullError
from .logps import AnswerLogps, AnswerLogpsBuffer
from .models import base_model
from .paths import cache_dir


logger = logging.getLogger(__name__)

FORMAT_VERSION = "3"  # 2: a sequence's first token is never an answer token; 3: LM head on answer positions only
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
CACHE_COLUMNS = ("ref_chosen_token_logps", "ref_rejected_token_logps")
# Columns of rows that hold images, raw (TRL's vision datasets) or processed.
IMAGE_COLUMNS = ("image", "images", "pixel_values", "image_grid_thw")


def reference_cache_usable(ld_alpha: float | None) -> bool:
    """
    Whether a run with these settings can read its reference from the cache; said once, not silently, when not.
    """
    # The cache holds plain per-token sums; ld_alpha weights the reference's tokens inside TRL's loss, which the cache
    # cannot reproduce, so that run keeps TRL's reference forward.
    if ld_alpha is not None:
        logger.warning("ref_cache is not used: ld_alpha weights the reference tokens inside TRL's loss.")
        return False
    return True


def with_reference_cache(trainer, dataset: Dataset, name: str) -> Dataset:
    """
    `dataset` plus the per-token reference log-probs of its answers as the columns `CACHE_COLUMNS`: read from the
    cache, or computed by [`reference_answer_logps`] and stored. The main process computes and writes; the others then
    read the same file.

    Args:
        trainer ([`trl_dpo_ext.DPOTrainer`]): supplies the reference, the layout (its collator), the lengths and the
            cache directory (`args.ref_cache_dir`).
        dataset (`datasets.Dataset`): tokenized preference rows, as the trainer prepares them.
        name (`str`): the dataset's name in messages (`"train"`, `"eval"`, ...).

    Raises:
        `ValueError`: the rows hold images (an `IMAGE_COLUMNS` column), or `dataset` is not map-style.
    """
    images = sorted(set(getattr(dataset, "column_names", None) or ()) & set(IMAGE_COLUMNS))
    if images:
        # The key covers token ids, not pixels: two rows with the same text and different images would share
        # reference values. TRL refuses its precompute for images the same way.
        raise ValueError(
            f"ref_cache cannot hold the reference of rows with images (the {name} dataset has the column(s) "
            f"{images}): its key covers the token ids, not the pixels. Set ref_cache=False; the reference then runs "
            "each step (adapters off on the same base)."
        )
    if not isinstance(dataset, Dataset):
        raise ValueError(f"ref_cache needs a map-style datasets.Dataset; the {name} dataset is {type(dataset)}.")
    args = trainer.args
    weights, adapter = trainer.reference.weights(trainer.model)
    key = cache_key(
        weights_fingerprint(weights, adapter),
        dataset,
        reference=trainer.reference.label,
        max_length=args.max_length,
        truncation_mode=args.truncation_mode,
        share_prompt=trainer.share_prompt,
        packing=trainer.packing,
        attention=base_model(weights).config._attn_implementation,
    )
    path = cache_path(args.ref_cache_dir or cache_dir() / "ref_logps", key)
    with trainer.accelerator.main_process_first():
        cached = load_reference_cache(path, key)
        if cached is None:
            cached = reference_answer_logps(trainer, dataset, name)
            if trainer.accelerator.is_main_process:
                save_reference_cache(path, key, *cached)
                logger.info("Reference cache for the %s dataset written to %s", name, path)
        else:
            logger.info("Reference cache hit for the %s dataset: %s", name, path)
    chosen, rejected = cached
    # Arrow columns over the tensors' memory: no Python float per token (the collator reads a batch's rows only).
    return dataset.add_column(CACHE_COLUMNS[0], chosen.arrow()).add_column(CACHE_COLUMNS[1], rejected.arrow())


@torch.no_grad()
def reference_answer_logps(trainer, dataset: Dataset, name: str) -> tuple[AnswerLogps, AnswerLogps]:
    """
    The per-token reference log-probs of every chosen and every rejected answer of `dataset`, in row order: batches of
    `precompute_ref_batch_size` (else `per_device_train_batch_size`) rows collated by the trainer's collator, so the
    values are those of the layout the trainer runs.
    """
    args = trainer.args
    loader = DataLoader(
        dataset,
        batch_size=args.precompute_ref_batch_size or args.per_device_train_batch_size,
        collate_fn=trainer.data_collator,
        shuffle=False,
    )
    # Truncation only shortens answers: their tokenized lengths bound what the layout scores.
    chosen, rejected = (AnswerLogpsBuffer(len(dataset), tokens(dataset, column)) for column in TOKEN_COLUMNS[1:])
    description = f"Reference log-probs of the {name} dataset (computed once, then cached)"
    for batch in tqdm(loader, desc=description, disable=args.disable_tqdm):
        with trainer.accelerator.autocast():
            answers = trainer._reference_token_logps(trainer._prepare_inputs(batch)).answer_values()
        chosen.append(answers[: len(answers) // 2])
        rejected.append(answers[len(answers) // 2 :])
    return chosen.answers(), rejected.answers()


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
    # Arrow batches, not Python lists: no Python int per token (~10⁸ of them for a real preference set).
    for batch in dataset.select_columns(list(TOKEN_COLUMNS)).with_format("arrow").iter(batch_size=4096):
        for column in TOKEN_COLUMNS:
            ids = batch[column]  # the row lengths and the ids, together: each row's list
            digest.update(pc.list_value_length(ids).cast("int64").to_numpy(zero_copy_only=False).tobytes())
            digest.update(pc.list_flatten(ids).cast("int64").to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def tokens(dataset: Dataset, column: str) -> int:
    """The number of token ids in a column of token-id lists over the rows `dataset` selects, read in Arrow batches."""
    batches = dataset.select_columns([column]).with_format("arrow").iter(batch_size=4096)
    return sum(pc.sum(pc.list_value_length(batch[column])).as_py() or 0 for batch in batches)


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


def save_reference_cache(path: Path, key: dict, chosen: AnswerLogps, rejected: AnswerLogps) -> None:
    """Write per-token reference log-probs atomically, with the key and a checksum in the safetensors header."""
    tensors = {}
    for name, answers in (("chosen", chosen), ("rejected", rejected)):
        tensors[name], tensors[f"{name}_offsets"] = answers.values, answers.offsets
    metadata = {"key": json.dumps(key, sort_keys=True), "checksum": _checksum(tensors)}
    try:
        with atomic_path(path) as tmp:
            # Why `save_file`: it writes from the tensors' memory (safetensors 0.8); `save` builds the file as bytes.
            safetensors.torch.save_file(tensors, tmp, metadata=metadata)
    except DiskFullError as error:
        # Why: the cache is not under output_dir (by default it is in the user's cache directory): say where it goes.
        raise DiskFullError(
            path,
            "the reference cache was not written (no partial file is left). Free space there, or set ref_cache_dir "
            "to a directory on another disk.",
        ) from error


def load_reference_cache(path: Path, key: dict) -> tuple[AnswerLogps, AnswerLogps] | None:
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
            offsets = tensors[f"{name}_offsets"]
            if offsets.numel() != key["num_rows"] + 1 or offsets[0] != 0 or offsets[-1] != tensors[name].numel():
                raise ValueError("its offsets do not match the dataset")
            if (offsets.diff() < 0).any():
                raise ValueError("its offsets are not in order")
            answers.append(AnswerLogps(tensors[name], offsets))
    except Exception as error:  # a truncated or corrupt file surfaces as any of several errors
        warnings.warn(f"Reference cache {path} refused ({error}); recomputing it.", stacklevel=2)
        return None
    return answers[0], answers[1]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy())  # the buffer itself: no bytes copy
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
