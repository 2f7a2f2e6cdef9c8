"""Preference data: loading (local files or the Hub) and validation with errors that name the column and the row.

Accepted rows are TRL's preference formats:
- standard: `prompt`, `chosen`, `rejected` non-empty strings;
- conversational, explicit prompt: `prompt`, `chosen`, `rejected` lists of `{"role": str, "content": str}` messages;
- conversational, implicit prompt: `chosen` and `rejected` full conversations sharing the prompt turns.

Conversational rows are rendered by the tokenizer's chat template when TRL tokenizes them. `to_conversational` turns
standard rows whose prompt is a `"User: ...\nAssistant:"` transcript (the bundled set's shape) into explicit-prompt
conversational rows.
"""

import re
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset


_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
BUNDLED_DATASET = Path(__file__).parent / "data" / "toy_preferences.jsonl"


def load_preference_dataset(name_or_path: str | None, config: str | None = None) -> DatasetDict:
    """
    Load a preference dataset: the bundled toy set when `name_or_path` is None, a local JSONL/JSON/parquet/CSV file
    (or a directory saved by `datasets`), else a Hub dataset. A single local file becomes one `train` split.
    """
    if name_or_path is None:
        return bundled_preference_dataset()
    path = Path(name_or_path)
    if path.is_file():
        builder = _LOCAL_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"Unsupported data file {path}: expected one of {sorted(_LOCAL_BUILDERS)}")
        return load_dataset(builder, data_files={"train": str(path)})
    if path.is_dir() and (path / "dataset_dict.json").exists():
        from datasets import load_from_disk

        return load_from_disk(str(path))
    return load_dataset(name_or_path, name=config)


def bundled_preference_dataset() -> DatasetDict:
    """The toy set shipped with the package, split into `train` and `test` by its `split` column."""
    rows = load_dataset("json", data_files=str(BUNDLED_DATASET), split="train")
    return DatasetDict(
        {
            split: rows.filter(lambda row, s=split: row["split"] == s).remove_columns("split")
            for split in ("train", "test")
        }
    )


def validate_preference_dataset(dataset: Dataset, name: str = "train") -> None:
    """
    Raise a `ValueError` naming the column and the first bad row if `dataset` is not a usable preference set.

    Checks: the columns exist; values are non-empty (not whitespace-only) strings, or message lists whose messages
    have string `role` and `content`; all rows of a column share one format; `chosen` differs from `rejected`.
    """
    if not isinstance(dataset, Dataset):  # streaming: rows are checked as TRL tokenizes them
        return
    columns = set(dataset.column_names)
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    if missing:
        raise ValueError(
            f"{name} dataset: missing column {missing[0]!r}; a preference set needs 'prompt', 'chosen' and "
            f"'rejected' (or conversational 'chosen'/'rejected' that share the prompt). Columns: {sorted(columns)}"
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} dataset is empty.")
    present = [c for c in ("prompt", "chosen", "rejected") if c in columns]
    values = {c: dataset[c] for c in present}
    conversational = _is_messages(values["chosen"][0])
    if "prompt" not in columns and not conversational:
        raise ValueError(
            f"{name} dataset: missing column 'prompt'; only conversational rows can leave the prompt implicit."
        )
    for column in present:
        for row, value in enumerate(values[column]):
            problem = _check_value(value, conversational)
            if problem:
                raise ValueError(f"{name} dataset: column {column!r}, row {row}: {problem}")
    for row, (chosen, rejected) in enumerate(zip(values["chosen"], values["rejected"])):
        if chosen == rejected:
            raise ValueError(f"{name} dataset: row {row}: 'chosen' equals 'rejected', so the pair has no preference.")
        if conversational and "prompt" not in columns and chosen[0] != rejected[0]:
            raise ValueError(
                f"{name} dataset: row {row}: 'chosen' and 'rejected' differ from their first message, so the implicit "
                "prompt (their shared leading messages) is empty; add a 'prompt' column or the shared user turn."
            )


def _is_messages(value) -> bool:
    return isinstance(value, list)


def _check_value(value, conversational: bool) -> str | None:
    if conversational:
        if not isinstance(value, list):
            return f"expected a list of messages like the first row, got {type(value).__name__}"
        if not value:
            return "empty message list"
        for i, message in enumerate(value):
            if not isinstance(message, dict):
                return f"message {i} is a {type(message).__name__}, expected a dict with 'role' and 'content'"
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    return f"message {i} has no string {key!r}"
        return None
    if not isinstance(value, str):
        return f"expected a string like the first row, got {type(value).__name__}"
    if not value.strip():
        return "empty or whitespace-only string"
    return None


# A transcript turn: "User: ...", "Assistant: ...", "System: ..." at the start of a line.
_TURN = re.compile(r"^(System|User|Assistant):", re.MULTILINE)


def transcript_messages(text: str) -> list[dict[str, str]]:
    """
    Messages of a `"User: ...\nAssistant:"` transcript. A final empty `Assistant:` turn is the cue for the answer (the
    chat template's generation prompt), so it is dropped; text that does not start with a turn is one user message.

    Example:
    ```python
    >>> transcript_messages("User: Any advice?\nAssistant:")
    [{'role': 'user', 'content': 'Any advice?'}]
    ```
    """
    turns = list(_TURN.finditer(text))
    if not turns or turns[0].start() != 0:
        return [{"role": "user", "content": text.strip()}]
    ends = [turn.start() for turn in turns[1:]] + [len(text)]
    messages = [
        {"role": turn.group(1).lower(), "content": text[turn.end() : end].strip()} for turn, end in zip(turns, ends)
    ]
    if messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()
    return messages


def to_conversational(dataset: Dataset) -> Dataset:
    """
    Standard preference rows as TRL's conversational format with an explicit prompt: the prompt becomes the messages
    of its transcript (see [`transcript_messages`]) and each answer one assistant message. Rows already
    conversational are returned unchanged.

    Example:
    ```python
    >>> row = {"prompt": "User: Any advice?\nAssistant:", "chosen": " Sure! Buy it.", "rejected": " No."}
    >>> to_conversational(Dataset.from_list([row]))[0]["chosen"]
    [{'role': 'assistant', 'content': 'Sure! Buy it.'}]
    ```
    """
    if _is_messages(dataset[0]["chosen"]):
        return dataset

    def convert(row: dict) -> dict:
        return {
            "prompt": transcript_messages(row["prompt"]),
            "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
        }

    return dataset.map(convert, desc="Converting to conversational rows")
