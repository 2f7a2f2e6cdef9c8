"""Preference data: loading (local files or the Hub) and validation with errors that name the column and the row.

Accepted rows are TRL's preference formats:
- standard, explicit prompt: `prompt`, `chosen`, `rejected` non-blank strings;
- standard, implicit prompt: `chosen` and `rejected` strings that start with the same prompt text;
- conversational, explicit prompt: `prompt`, `chosen`, `rejected` lists of `{"role": str, "content": str}` messages
  (an assistant turn that makes tool calls may have no `content`: it says what it says in `tool_calls`);
- conversational, implicit prompt: `chosen` and `rejected` full conversations sharing the prompt turns;
and any of them with TRL's optional `tools` and `chat_template_kwargs` columns.

Blank text (see [`is_blank`]) is text without a visible character: only whitespace (`str.isspace`, so also U+3000 or
U+00A0), control characters (NUL, ...) and invisible format characters (Unicode category Cf: U+200B zero-width space,
U+FEFF, U+200E, ...). A blank string, or a message list whose contents are all blank, is no prompt or answer at all.

Conversational rows are rendered by the tokenizer's chat template when TRL tokenizes them. `to_conversational` turns
standard rows whose prompt is a `"User: ...\nAssistant:"` transcript (the bundled set's shape) into explicit-prompt
conversational rows.
"""

import json
import re
import unicodedata
from pathlib import Path

from datasets import Dataset, DatasetDict, Json, load_dataset
from trl.data_utils import extract_prompt


_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
BUNDLED_DATASET = Path(__file__).parent / "data" / "toy_preferences.jsonl"
# Preference sets shipped with the package, by the name `--dataset_name` accepts. Each row has a `split` column.
BUNDLED = {
    "toy": BUNDLED_DATASET,  # the tiny default's template pairs
    # SmolLM2-135M-Instruct's own replies labelled by a rule (recipes/make_smollm2_preferences.py).
    "smollm2-concise": Path(__file__).parent / "data" / "smollm2_concise.jsonl",
}
# The prompts sampled when a command names none: the default model's own set (its `prompt` column).
DEFAULT_PROMPTS = "smollm2-concise"
VALIDATION_BATCH = 1024  # rows the validation holds as Python objects at once


def load_preference_dataset(name_or_path: str | None, config: str | None = None) -> DatasetDict:
    """
    Load a preference dataset: the bundled toy set when `name_or_path` is None, a local JSONL/JSON/parquet/CSV file
    (or a directory saved by `datasets`), a bundled set by its name (`BUNDLED`: `toy`, `smollm2-concise`), else a
    Hub dataset. A single local file becomes one `train` split.

    A local file that cannot be read raises a `ValueError` naming the file and, where there is one, the line: an
    empty file, a line that is not UTF-8 (checked before parsing: pyarrow would keep the bytes and fail, without a
    line, when the row is read) or, in JSON Lines, a line that is not one JSON object.
    """
    if name_or_path is None:
        return bundled_preference_dataset()
    if name_or_path in BUNDLED:
        return bundled_preference_dataset(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        builder = _LOCAL_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"Unsupported data file {path}: expected one of {sorted(_LOCAL_BUILDERS)}")
        problem = _file_problem(path)
        if problem is not None:
            raise ValueError(f"{path}: {problem}")
        try:
            data = load_dataset(builder, data_files={"train": str(path)})
        except Exception as error:
            # pyarrow's parse errors reach the user wrapped in a `DatasetGenerationError` that names no line.
            problem = _jsonl_problem(path) if path.suffix == ".jsonl" else None
            if problem is None:
                raise ValueError(f"{path}: cannot be read as {builder.upper()}: {_root_cause(error)}") from error
            raise ValueError(f"{path}: {problem}") from error
        if path.suffix == ".jsonl":
            data["train"] = _json_columns_as_written(data["train"], path)
        return data
    if path.is_dir() and (path / "dataset_dict.json").exists():
        from datasets import load_from_disk

        return load_from_disk(str(path))
    if path.suffix in _LOCAL_BUILDERS and not path.exists():
        # A name ending in .jsonl/.csv/... is a file, not a Hub id: say so rather than report a failed Hub lookup.
        raise ValueError(f"{path}: no such data file.")
    return load_dataset(name_or_path, name=config)


def _file_problem(path: Path) -> str | None:
    """Why `path` cannot hold preference rows before any parser reads it (no bytes, a line not UTF-8), or None."""
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes)."
    if path.suffix == ".parquet":  # binary: its strings are checked by pyarrow
        return None
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return (
                    f"line {number}: not UTF-8 text (byte {raw[error.start]:#04x} at byte {error.start + 1} of the "
                    "line); save the file as UTF-8."
                )
    return None


def _root_cause(error: BaseException) -> str:
    """The message of the innermost exception `error` was raised from: the parser's, not the wrapper's."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return str(error) or type(error).__name__


def bundled_preference_dataset(name: str = "toy") -> DatasetDict:
    """A set shipped with the package (`BUNDLED`), split into `train` and `test` by its `split` column."""
    rows = load_dataset("json", data_files=str(BUNDLED[name]), split="train")
    return DatasetDict(
        {
            split: rows.filter(lambda row, s=split: row["split"] == s).remove_columns("split")
            for split in ("train", "test")
        }
    )


def _json_columns_as_written(dataset: Dataset, path: Path) -> Dataset:
    """
    `dataset` with its columns that hold `Json` values (mixed JSON types, at any depth) read again from the JSON Lines
    file. datasets keeps a string that is itself JSON text (`"0"`, `"null"`, `"[1]"`) as that JSON when it stores a
    `Json` value, so it reads back `0`, `None`, `[1]` and the validator would blame the wrong row. Encoded here, every
    value reads back as written.
    """

    def holds_json(feature) -> bool:
        if isinstance(feature, dict):
            return any(holds_json(inner) for inner in feature.values())
        return isinstance(feature, Json) or (hasattr(feature, "feature") and holds_json(feature.feature))

    mixed = [name for name, feature in dataset.features.items() if holds_json(feature)]
    if not mixed:
        return dataset
    order = dataset.column_names
    with path.open(encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    if len(rows) != len(dataset):  # not one row per non-blank line: keep what datasets read
        return dataset
    for name in mixed:
        column = [json.dumps(row.get(name) if isinstance(row, dict) else None) for row in rows]
        dataset = dataset.remove_columns(name).add_column(name, column, feature=Json())
    return dataset.select_columns(order)


def _jsonl_problem(path: Path) -> str | None:
    """The first line of a JSON Lines file that pyarrow cannot read as a row, described; None if none is found."""

    def unique_keys(pairs: list) -> dict:
        keys = [key for key, _ in pairs]
        repeated = next((key for key in keys if keys.count(key) > 1), None)
        if repeated is not None:
            raise ValueError(f"key {repeated!r} appears twice")
        return dict(pairs)

    def bad_value(value, where: str) -> str | None:
        if isinstance(value, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in value):
            return f"{where} holds a lone UTF-16 surrogate escape"
        if isinstance(value, int) and not -(2**63) <= value < 2**64:
            return f"{where} holds an integer beyond 64 bits"
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
        for key, child in children:
            problem = bad_value(child, f"{where}[{key!r}]")
            if problem:
                return problem
        return None

    rows = 0
    with path.open(encoding="utf-8") as lines:  # UTF-8 already checked by `_file_problem`
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line, object_pairs_hook=unique_keys)
            except json.JSONDecodeError as error:
                # Some of json's messages end in "at", expecting the position after them ("... starting at").
                truncated = (
                    " (the last line has no newline: is the file truncated?)" if not line.endswith("\n") else ""
                )
                return (
                    f"line {number}: invalid JSON at character {error.colno}: {error.msg.removesuffix(' at')}"
                    f"{truncated}"
                )
            except ValueError as error:
                return f"line {number}: {error}"
            if not isinstance(row, dict):
                return f"line {number}: expected a JSON object (one row), got {type(row).__name__}"
            problem = next(filter(None, (bad_value(value, f"column {key!r}") for key, value in row.items())), None)
            if problem:
                return f"line {number}: {problem}"
    if rows == 0:
        return "no rows: every line is blank."
    return None


def validate_preference_dataset(dataset: Dataset, name: str = "train") -> None:
    """
    Raise a `ValueError` naming the column and the first bad row if `dataset` is not a usable preference set.

    Checks: the columns exist; values are non-blank strings (see the module docstring for blank), or message lists
    whose messages have string `role` and `content`, not all blank; all rows share the format of the first `chosen`;
    `chosen` differs from `rejected`; with an implicit prompt, the two share a non-blank prompt (leading messages, or
    leading text) and each answer (what follows it, as TRL extracts it) is not all blank. Duplicate pairs are allowed.
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
    conversational = _is_messages(dataset.select_columns(["chosen"])[0]["chosen"])
    # Batches of rows as Python lists (a whole column at once would be gigabytes of strings for a real preference
    # set), checked row by row, so that the error names the first bad row whichever column holds it.
    row = 0
    for batch in dataset.select_columns(present).iter(batch_size=VALIDATION_BATCH):
        for values in zip(*(batch[column] for column in present)):
            for column, value in zip(present, values):
                problem = _check_value(value, conversational)
                if problem:
                    raise ValueError(f"{name} dataset: column {column!r}, row {row}: {problem}")
            chosen, rejected = values[-2:]
            if chosen == rejected:
                raise ValueError(
                    f"{name} dataset: row {row}: 'chosen' equals 'rejected', so the pair has no preference."
                )
            if "prompt" not in columns:
                _check_implicit_prompt(chosen, rejected, conversational, name, row)
            row += 1


def _check_implicit_prompt(chosen, rejected, conversational: bool, name: str, row: int) -> None:
    """The shared prompt TRL extracts (`trl.extract_prompt`) must be there, and each answer after it must be too."""
    extracted = extract_prompt({"chosen": chosen, "rejected": rejected})
    blank = _blank_messages if conversational else is_blank  # both hold for an empty prompt too
    if blank(extracted["prompt"]):
        shared = "first message" if conversational else "first character"
        raise ValueError(
            f"{name} dataset: row {row}: 'chosen' and 'rejected' differ from their {shared}, so the implicit prompt "
            "(what they share at the start) is empty; add a 'prompt' column or the shared prompt."
        )
    for column in ("chosen", "rejected"):
        if blank(extracted[column]):
            shared = "shared prompt messages" if conversational else "shared prompt"
            raise ValueError(
                f"{name} dataset: column {column!r}, row {row}: the answer after the {shared} has only empty or "
                "whitespace-only content."
            )


def _is_messages(value) -> bool:
    return isinstance(value, list)


def is_blank(text: str) -> bool:
    """
    Whether `text` has no visible character: only whitespace (`str.isspace`), control characters (Unicode category
    Cc, e.g. NUL) and invisible format characters (Cf, e.g. U+200B zero-width space, U+FEFF). Such a prompt or answer
    is empty to a reader, so the validator refuses it.

    Example:
    ```python
    >>> is_blank("\u3000\u200b\x00"), is_blank(" a ")
    (True, False)
    ```
    """
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


def _blank_messages(messages: list[dict]) -> bool:
    # A tool-call turn says what it says in `tool_calls`, so an empty `content` there is not blank.
    return all(is_blank(m.get("content") or "") and not m.get("tool_calls") for m in messages)


def _check_value(value, conversational: bool) -> str | None:
    if conversational:
        if not isinstance(value, list):
            return f"expected a list of messages like the first row, got {type(value).__name__}"
        if not value:
            return "empty message list"
        for i, message in enumerate(value):
            if not isinstance(message, dict):
                return f"message {i} is a {type(message).__name__}, expected a dict with 'role' and 'content'"
            if not isinstance(message.get("role"), str):
                return f"message {i} has no string 'role'"
            # A tool-call turn may leave `content` out (datasets then stores None): its calls are its content.
            if not isinstance(message.get("content"), str) and not (
                message.get("tool_calls") and message.get("content") is None
            ):
                return f"message {i} has no string 'content'"
        if _blank_messages(value):
            return "every message has empty or whitespace-only content"
        return None
    if not isinstance(value, str):
        return f"expected a string like the first row, got {type(value).__name__}"
    if is_blank(value):
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


def to_conversational(dataset: Dataset, name: str = "train") -> Dataset:
    """
    Standard preference rows as TRL's conversational format with an explicit prompt: the prompt becomes the messages
    of its transcript (see [`transcript_messages`]) and each answer one assistant message. Rows already
    conversational are returned unchanged. The rows are validated first (see [`validate_preference_dataset`]; `name`
    names the dataset in its errors), so a bad value fails with its column and row, not inside the conversion.

    Example:
    ```python
    >>> row = {"prompt": "User: Any advice?\nAssistant:", "chosen": " Sure! Buy it.", "rejected": " No."}
    >>> to_conversational(Dataset.from_list([row]))[0]["chosen"]
    [{'role': 'assistant', 'content': 'Sure! Buy it.'}]
    ```
    """
    validate_preference_dataset(dataset, name)
    if _is_messages(dataset[0]["chosen"]):
        return dataset

    def convert(row: dict) -> dict:
        return {
            "prompt": transcript_messages(row["prompt"]),
            "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
        }

    return dataset.map(convert, desc="Converting to conversational rows")
