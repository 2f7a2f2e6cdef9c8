"""Hostile inputs (issue #6): property-based tests on the validation, the JSONL loader and the collator layouts.

The contract: a bad row fails with our `ValueError` naming the dataset, the column and the row; everything else goes
through tokenization and every layout of the collator with consistent tensors, and the same finite log-probs as each
sequence scored on its own. Nothing crashes deep in torch or pyarrow.

Decisions pinned here (see `trl_dpo_ext/preference_data.py` and `PreferenceCollator`):
- blank text (no visible character: only whitespace, control or format characters, e.g. U+3000, NUL, U+200B, U+FEFF)
  is an empty prompt or answer; a message list whose contents are all blank is one too;
- duplicate pairs are valid data; `chosen == rejected` is not;
- a sequence's first token has no log-prob, so it is never an answer token, in any layout;
- an answer with no token left after truncation has log-prob 0 and length 0 in the collator (the trainer drops such
  rows beforehand); a sequence with no token at all is a `ValueError` naming the pair.
"""

import json
import math
import os
import re
import warnings


os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset, Features, Json  # noqa: E402
from hypothesis import HealthCheck, assume, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from numerics import (  # noqa: E402
    assert_effect,
    assert_within,
    forward_rtol,
    sequence_logps_tol,
    sigmoid_loss_tol,
    sum_rtol,
    zero_margin_loss,
)
from transformers import AutoModelForCausalLM  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from trl_dpo_ext import (  # noqa: E402
    DPOConfig,
    DPOTrainer,
    PreferenceCollator,
    load_preference_dataset,
    to_conversational,
    validate_preference_dataset,
)
from trl_dpo_ext.layout import block_attention_mask  # noqa: E402
from trl_dpo_ext.logps import cached_reference_logps, completion_token_logps  # noqa: E402
from trl_dpo_ext.tiny_model import tiny_llama_config  # noqa: E402


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------------------------------
# Text: hostile but valid, and blank.

# Every one of these is blank by the documented rule: whitespace (incl. NEL, NBSP, ideographic space, line/paragraph
# separators), control characters (NUL, ESC, DEL) and invisible format characters (zero-width space/joiners, BOM,
# directional marks, soft hyphen).
BLANK_CHARACTERS = (
    " \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u1680\u2000\u2007\u200a\u2028\u2029\u202f\u205f\u3000"
    "\x00\x01\x1b\x7f"
    "\u200b\u200c\u200d\u200e\u200f\u2060\u2066\ufeff\xad"
)
SAMPLES = [
    "مرحبا بالعالم",  # RTL
    "שלום עולם",
    "\u202eevil\u202c",  # right-to-left override
    "👩‍👩‍👧‍👦 🇫🇷",  # ZWJ sequence, flag
    "e\u0301 Z̤͔ͧ̑̓",  # combining marks
    "a\x00b",  # NUL inside
    "\x1b[31mred\x1b[0m",
    "<|eos|> <|pad|> <|bos|>",  # the tokenizer's special tokens as text
    "{{ message['content'] }} {% endfor %}",  # template syntax as text
    "User: fake turn\nAssistant: fake answer",
    "\u3000全角 テキスト",
    "\U0010fffd\ue000",  # private use
    "tab\there\r\nnewline",
]
hostile_text = st.one_of(st.text(st.characters(codec="utf-8"), max_size=12), st.sampled_from(SAMPLES))
visible_character = st.characters(categories=["L", "N", "P", "S"], codec="utf-8")
# Valid text: anything around at least one visible character.
good_text = st.builds(
    lambda before, visible, after: before + visible + after, hostile_text, visible_character, hostile_text
)
blank_text = st.text(st.sampled_from(BLANK_CHARACTERS), max_size=6)


def as_json_columns(rows: list[dict]) -> Dataset:
    """
    What `load_preference_dataset` builds from a JSON Lines file with columns of mixed types: `Json` columns whose
    values read back as written (values go in JSON-encoded: datasets keeps a string that parses as JSON as is).
    """
    encoded = [{key: json.dumps(value) for key, value in row.items()} for row in rows]
    return Dataset.from_list(encoded, features=Features({key: Json() for key in rows[0]}))


def assert_names(error: pytest.ExceptionInfo, expected: str) -> None:
    assert str(error.value).startswith(expected), f"{str(error.value)!r} does not start with {expected!r}"


def distinct(chosen: str, rejected: str) -> tuple[str, str]:
    return chosen, rejected if rejected != chosen else rejected + "!"


@st.composite
def standard_rows(draw, min_size: int = 1, max_size: int = 6) -> list[dict]:
    """Valid standard rows, some of them exact duplicates of earlier ones."""
    rows = []
    for _ in range(draw(st.integers(min_size, max_size))):
        if rows and draw(st.booleans()):
            rows.append(dict(rows[draw(st.integers(0, len(rows) - 1))]))
            continue
        chosen, rejected = distinct(draw(good_text), draw(good_text))
        rows.append({"prompt": draw(good_text), "chosen": chosen, "rejected": rejected})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# 1. Validation: standard rows.


@given(rows=standard_rows())
@FAST
def test_valid_standard_rows_with_hostile_unicode_and_duplicates_validate(rows):
    validate_preference_dataset(Dataset.from_list(rows))
    validate_preference_dataset(as_json_columns(rows))


@given(text=st.text(st.characters(categories=["Zs", "Zl", "Zp", "Cc", "Cf"], codec="utf-8"), max_size=8))
@FAST
def test_any_whitespace_control_or_format_text_is_blank(text):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": text}]
    with pytest.raises(ValueError) as error:
        validate_preference_dataset(Dataset.from_list(rows))
    assert_names(error, "train dataset: column 'rejected', row 1: empty or whitespace-only string")


# Non-string values a JSON file can hold, and the type name the error reports.
WRONG_TYPES = [(None, "NoneType"), (3, "int"), (1.5, "float"), (True, "bool"), ({"text": "a"}, "dict")]
WRONG_LISTS = [["a", "b"], [["nested"]], [], [{"role": "assistant", "content": "a"}]]


@given(
    rows=standard_rows(min_size=1, max_size=5),
    data=st.data(),
    column=st.sampled_from(["prompt", "chosen", "rejected"]),
    kind=st.sampled_from(["blank", "wrong_type", "list", "same_answers"]),
)
@FAST
def test_one_bad_standard_value_is_named_by_column_and_row(rows, data, column, kind):
    row = data.draw(st.integers(0, len(rows)), label="row")
    good = {"prompt": data.draw(good_text), "chosen": "x", "rejected": "y"}
    rows = rows[:row] + [good] + rows[row:]  # the planted row, at a random place among valid rows
    prefix = f"train dataset: column {column!r}, row {row}: "
    if kind == "blank":
        rows[row][column] = data.draw(blank_text)
        expected = prefix + "empty or whitespace-only string"
    elif kind == "wrong_type":
        rows[row][column], type_name = data.draw(st.sampled_from(WRONG_TYPES))
        expected = prefix + f"expected a string like the first row, got {type_name}"
    elif kind == "list":
        rows[row][column] = data.draw(st.sampled_from(WRONG_LISTS))
        expected = prefix + "expected a string like the first row, got list"
        if (row, column) == (0, "chosen"):  # the first `chosen` sets the format: now the strings are the odd ones
            expected = "train dataset: column 'prompt', row 0: expected a list of messages like the first row, got str"
    else:
        rows[row]["rejected"] = rows[row]["chosen"]
        expected = f"train dataset: row {row}: 'chosen' equals 'rejected', so the pair has no preference."
    dataset = Dataset.from_list(rows) if kind in ("blank", "same_answers") else as_json_columns(rows)
    with pytest.raises(ValueError) as error:
        validate_preference_dataset(dataset)
    assert_names(error, expected)


def test_a_missing_key_is_a_none_value_named_by_column_and_row():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3 + [{"prompt": "p", "rejected": "b"}]
    with pytest.raises(
        ValueError, match="^eval dataset: column 'chosen', row 3: expected a string like the first row"
    ):
        validate_preference_dataset(Dataset.from_list(rows), "eval")


def test_the_first_bad_row_is_named_whichever_column_holds_it():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 4
    rows[1] = {**rows[1], "rejected": " "}
    rows[3] = {**rows[3], "prompt": "\u3000"}
    with pytest.raises(ValueError, match="^train dataset: column 'rejected', row 1: "):
        validate_preference_dataset(Dataset.from_list(rows))


# ---------------------------------------------------------------------------------------------------------------------
# 1b. Validation: conversational rows (explicit and implicit prompt).


def message(role: str, content) -> dict:
    return {"role": role, "content": content}


@st.composite
def conversational_rows(draw, implicit: bool, min_size: int = 1, max_size: int = 5) -> list[dict]:
    rows = []
    for _ in range(draw(st.integers(min_size, max_size))):
        if rows and draw(st.booleans()):
            rows.append(json.loads(json.dumps(rows[draw(st.integers(0, len(rows) - 1))])))  # a duplicate pair
            continue
        prompt = [message("system", draw(st.one_of(blank_text, good_text)))] if draw(st.booleans()) else []
        prompt.append(message("user", draw(good_text)))
        chosen, rejected = distinct(draw(good_text), draw(good_text))
        answers = {"chosen": [message("assistant", chosen)], "rejected": [message("assistant", rejected)]}
        if implicit:
            rows.append({column: prompt + answer for column, answer in answers.items()})
        else:
            rows.append({"prompt": prompt, **answers})
    return rows


@given(rows=conversational_rows(implicit=False) | conversational_rows(implicit=True))
@FAST
def test_valid_conversational_rows_validate(rows):
    validate_preference_dataset(as_json_columns(rows))


# A bad message planted in a message list, and the problem it must be reported as (`{i}`: its position).
BAD_MESSAGES = [
    ({"content": "hi"}, "message {i} has no string 'role'"),
    ({"role": "user"}, "message {i} has no string 'content'"),
    ({"role": 1, "content": "hi"}, "message {i} has no string 'role'"),
    ({"role": "user", "content": None}, "message {i} has no string 'content'"),
    ({"role": "user", "content": ["hi"]}, "message {i} has no string 'content'"),
    ({"role": "user", "content": {"text": "hi"}}, "message {i} has no string 'content'"),
    ("hi", "message {i} is a str, expected a dict with 'role' and 'content'"),
    (None, "message {i} is a NoneType, expected a dict with 'role' and 'content'"),
    (["nested"], "message {i} is a list, expected a dict with 'role' and 'content'"),
    (7, "message {i} is a int, expected a dict with 'role' and 'content'"),
]
# A bad value in place of a whole message list.
BAD_VALUES = [
    ("a string", "expected a list of messages like the first row, got str"),
    ({"role": "user", "content": "a dict, not a list"}, "expected a list of messages like the first row, got dict"),
    (None, "expected a list of messages like the first row, got NoneType"),
    (5, "expected a list of messages like the first row, got int"),
    ([], "empty message list"),
    ([message("assistant", " \u3000"), message("assistant", "\u200b\ufeff")], "every message has empty or"),
]


@given(
    implicit=st.booleans(),
    data=st.data(),
    kind=st.sampled_from(["message", "value", "same_answers"]),
)
@FAST
def test_one_bad_conversational_value_is_named_by_column_and_row(implicit, data, kind):
    rows = data.draw(conversational_rows(implicit=implicit, min_size=1, max_size=4), label="rows")
    row = data.draw(st.integers(0, len(rows) - 1), label="row")
    column = data.draw(st.sampled_from(list(rows[row])), label="column")
    prefix = f"train dataset: column {column!r}, row {row}: "
    if kind == "message":
        bad, problem = data.draw(st.sampled_from(BAD_MESSAGES))
        position = data.draw(st.integers(0, len(rows[row][column])))
        rows[row][column].insert(position, bad)
        expected = prefix + problem.format(i=position)
    elif kind == "value":
        rows[row][column], problem = data.draw(st.sampled_from(BAD_VALUES))
        expected = prefix + problem
        if (row, column) == (0, "chosen") and not isinstance(rows[0]["chosen"], list):  # the format flips
            # Standard rows from here on: without a prompt column the first mismatch is this row's own.
            value = rows[0]["chosen"]
            expected = "train dataset: column 'prompt', row 0: expected a string like the first row, got list"
            if implicit and isinstance(value, str):
                expected = "train dataset: column 'rejected', row 0: expected a string like the first row, got list"
            elif implicit:
                got = type(value).__name__
                expected = f"train dataset: column 'chosen', row 0: expected a string like the first row, got {got}"
    else:
        rows[row]["rejected"] = json.loads(json.dumps(rows[row]["chosen"]))
        expected = f"train dataset: row {row}: 'chosen' equals 'rejected'"
    with pytest.raises(ValueError) as error:
        validate_preference_dataset(as_json_columns(rows))
    assert_names(error, expected)


@given(rows=standard_rows(min_size=2, max_size=4), conversational=conversational_rows(implicit=False), data=st.data())
@FAST
def test_mixed_standard_and_conversational_rows_name_the_first_odd_row(rows, conversational, data):
    at = data.draw(st.integers(1, len(rows)), label="at")
    mixed = rows[:at] + conversational[:1] + rows[at:]
    with pytest.raises(ValueError) as error:
        validate_preference_dataset(as_json_columns(mixed))
    assert_names(error, f"train dataset: column 'prompt', row {at}: expected a string like the first row, got list")


@pytest.mark.parametrize(
    "chosen, rejected, error",
    [
        (
            [message("user", "Hi"), message("assistant", "\u3000 ")],
            [message("user", "Hi"), message("assistant", "Hello")],
            "column 'chosen', row 1: the answer after the shared prompt messages has only empty",
        ),
        (
            [message("user", "Hi"), message("assistant", "Hello")],
            [message("user", "Hi"), message("assistant", "\u200b")],
            "column 'rejected', row 1: the answer after the shared prompt messages has only empty",
        ),
        (
            [message("user", "Hi"), message("assistant", "Hello")],
            [message("user", "Hey"), message("assistant", "Hello")],
            "row 1: 'chosen' and 'rejected' differ from their first message",
        ),
    ],
)
def test_implicit_prompt_answers_must_not_be_blank(chosen, rejected, error):
    good = {"chosen": [message("user", "Q"), message("assistant", "A")], "rejected": [message("user", "Q")]}
    good["rejected"].append(message("assistant", "B"))
    with pytest.raises(ValueError, match=f"^train dataset: {error}"):
        validate_preference_dataset(Dataset.from_list([good, {"chosen": chosen, "rejected": rejected}]))


def test_blank_system_turns_and_tool_calls_are_not_blank_answers():
    tool_call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}
    rows = [
        {
            "prompt": [message("system", ""), message("user", "Call f")],
            "chosen": [tool_call],
            "rejected": [message("assistant", "No.")],
        }
    ]
    validate_preference_dataset(as_json_columns(rows))


def test_to_conversational_names_a_bad_row_instead_of_crashing():
    rows = [{"prompt": "User: Hi\nAssistant:", "chosen": " Sure!", "rejected": " No."}] * 3
    rows[2] = {**rows[2], "chosen": None}
    with pytest.raises(ValueError, match="^test dataset: column 'chosen', row 2: expected a string"):
        to_conversational(Dataset.from_list(rows), "test")
    # A prompt that is only a turn marker converts to a blank user message: the conversational check names it.
    rows[2] = {**rows[0], "prompt": "User:\u3000\nAssistant:"}
    with pytest.raises(ValueError, match="^train dataset: column 'prompt', row 2: every message has empty"):
        validate_preference_dataset(to_conversational(Dataset.from_list(rows)))


# ---------------------------------------------------------------------------------------------------------------------
# 1c. Loading JSON Lines: mixed types reach the validator; unreadable lines are named.

GOOD_LINE = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})


def jsonl_with_third_line(tmp_path, line: str):
    """A JSON Lines file of good rows whose third line (row 2) is `line`."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([GOOD_LINE, GOOD_LINE, line, GOOD_LINE]) + "\n")
    return path


@pytest.mark.parametrize(
    "line, expected",
    [
        (
            '{"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}',
            "column 'chosen', row",
        ),
        ('{"prompt": "p", "chosen": 7, "rejected": "b"}', "column 'chosen', row"),
        ('{"prompt": "p", "rejected": "b"}', "column 'chosen', row"),
        ("null", "column 'prompt', row"),
        ('{"prompt": "p", "chosen": "a", "rejected": "a"}', "row"),
    ],
)
def test_jsonl_rows_of_mixed_types_load_and_fail_validation_with_their_row(tmp_path, line, expected):
    with pytest.raises(ValueError, match=f"^train dataset: {expected} 2: "):
        validate_preference_dataset(load_preference_dataset(str(jsonl_with_third_line(tmp_path, line)))["train"])


def test_strings_that_look_like_json_read_back_as_written(tmp_path):
    # datasets stores a mixed-type column as `Json` and would read the string "0" back as the int 0, "null" as None.
    path = tmp_path / "pairs.jsonl"
    lines = [{"prompt": "p", "chosen": text, "rejected": "b"} for text in ("a", "0", "null", '"q"', "[1]")]
    lines.append({"prompt": [message("user", "0")], "chosen": ["x"], "rejected": "b"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset = load_preference_dataset(str(path))["train"]
    assert dataset.to_list() == lines and dataset.column_names == ["prompt", "chosen", "rejected"]
    with pytest.raises(ValueError, match="^train dataset: column 'prompt', row 5: expected a string like the first"):
        validate_preference_dataset(dataset)


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"prompt": "p", "chosen": ', "line 3: invalid JSON"),
        ("[1, 2]", "line 3: expected a JSON object (one row), got list"),
        ('"just a string"', "line 3: expected a JSON object (one row), got str"),
        ('{"prompt": "p", "chosen": "a", "chosen": "c", "rejected": "b"}', "line 3: key 'chosen' appears twice"),
        ('{"prompt": "p", "chosen": "\\ud800", "rejected": "b"}', "line 3: column 'chosen' holds a lone UTF-16"),
        ('{"prompt": "p", "chosen": 123456789012345678901234567890, "rejected": "b"}', "line 3: column 'chosen'"),
    ],
)
def test_unreadable_jsonl_lines_are_named(tmp_path, line, expected):
    path = jsonl_with_third_line(tmp_path, line)
    with pytest.raises(ValueError, match=f"^{re.escape(f'{path}: {expected}')}"):
        load_preference_dataset(str(path))


# ---------------------------------------------------------------------------------------------------------------------
# 2. Collator layouts on random token rows.

VOCAB = 64  # token ids 1..63; 0 pads
LAYOUTS = {
    "right": {},
    "left": {"padding_side": "left"},
    "shared": {"share_prompt": True},
    "packed": {"packing": True},
    "shared+packed": {"share_prompt": True, "packing": True},
}
tokens = st.lists(st.integers(1, VOCAB - 1), max_size=8)


@st.composite
def token_pairs(draw, max_pairs: int = 4, max_prompt: int = 20) -> list[dict]:
    """Tokenized pairs: empty prompts and answers, long prompts, duplicate pairs, chosen == rejected token-wise."""
    pairs = []
    for _ in range(draw(st.integers(1, max_pairs))):
        kind = draw(st.sampled_from(["random", "duplicate", "same_answers", "shared_start"]))
        if kind == "duplicate" and pairs:
            pairs.append(json.loads(json.dumps(pairs[-1])))
            continue
        prompt = draw(st.lists(st.integers(1, VOCAB - 1), max_size=max_prompt))
        chosen = draw(tokens)
        rejected = list(chosen) if kind == "same_answers" else draw(tokens)
        if kind == "shared_start":
            rejected = chosen[: len(chosen) // 2] + rejected
        pairs.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return pairs


collator_options = st.fixed_dictionaries(
    {
        "max_length": st.one_of(st.none(), st.integers(2, 24)),
        "truncation_mode": st.sampled_from(["keep_start", "keep_end"]),
        "pad_to_multiple_of": st.sampled_from([None, 8]),
    }
)


def expected_sequences(pairs: list[dict], max_length: int | None, mode: str) -> list[tuple[list, list[int]]]:
    """
    The oracle, written from TRL's per-sequence truncation of `prompt + answer`: for each of the 2B sequences (chosen
    answers first), its tokens after truncation and the positions of its scored answer tokens (never position 0).
    """
    sequences = []
    for answer in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            ids = pair["prompt_ids"] + pair[answer]
            is_answer = [False] * len(pair["prompt_ids"]) + [True] * len(pair[answer])
            if max_length is not None:
                cut = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
                ids, is_answer = ids[cut], is_answer[cut]
            sequences.append((ids, [k for k in range(1, len(ids)) if is_answer[k]]))
    return sequences


def empty_sequence(pairs: list[dict]) -> tuple[int, str] | None:
    for b, pair in enumerate(pairs):
        for answer in ("chosen", "rejected"):
            if not pair["prompt_ids"] and not pair[f"{answer}_ids"]:
                return b, answer
    return None


def answer_positions(batch: dict, sequence: int) -> list[tuple[int, int]]:
    """(row, column) of the answer tokens of one of the 2B sequences, in token order."""
    if "sequence_index" in batch:
        return [tuple(p) for p in (batch["sequence_index"] == sequence).nonzero().tolist()]
    return [(sequence, t) for t in batch["completion_mask"][sequence].nonzero().flatten().tolist()]


def attention(batch: dict) -> torch.Tensor:
    """The boolean `(rows, T, T)` mask the model applies: the layout's 4D mask, or causal ∧ padding for plain rows."""
    if "doc_ids" in batch:
        return block_attention_mask(batch["doc_ids"], batch["branch_ids"])[:, 0]
    causal = torch.ones(batch["input_ids"].size(1), batch["input_ids"].size(1), dtype=torch.bool).tril()
    return causal & batch["attention_mask"].bool()[:, None, :]


def check_layout(batch: dict, pairs: list[dict], sequences: list, pad: int, multiple: int | None) -> None:
    """Every structural property of a collated batch, against the oracle."""
    num_sequences = 2 * len(pairs)
    shape = batch["input_ids"].shape
    for key in ("completion_mask", "position_ids", "attention_mask", "doc_ids", "branch_ids", "sequence_index"):
        if key in batch:
            assert batch[key].shape == shape, key
            assert batch[key].dtype == torch.long, key
    if multiple:
        assert shape[1] % multiple == 0
    assert batch["num_tokens"].item() == sum(len(ids) for ids, _ in sequences)  # TRL's count, whatever the layout
    if "doc_ids" in batch:
        padding = batch["doc_ids"] < 0
        assert (batch["input_ids"][padding] == pad).all() and (batch["sequence_index"][padding] == -1).all()
        assert torch.equal(batch["completion_mask"], (batch["sequence_index"] >= 0).long())
        counts = torch.bincount(batch["sequence_index"][batch["sequence_index"] >= 0], minlength=num_sequences)
        assert batch["answer_lengths"].tolist() == counts.tolist() == [len(scored) for _, scored in sequences]
        assert ((batch["sequence_index"] >= -1) & (batch["sequence_index"] < num_sequences)).all()
    else:
        assert shape[0] == num_sequences
        assert (batch["attention_mask"].sum(dim=1) > 0).all()  # no row without a real token
        assert (batch["completion_mask"] <= batch["attention_mask"]).all()
        assert (batch["input_ids"][batch["attention_mask"] == 0] == pad).all()
        for row, (ids, _) in enumerate(sequences):
            real = batch["attention_mask"][row].bool()
            assert batch["input_ids"][row][real].tolist() == ids
            assert batch["position_ids"][row][real].tolist() == list(range(len(ids)))
    mask = attention(batch)
    for sequence, (ids, scored) in enumerate(sequences):
        positions = answer_positions(batch, sequence)
        assert len(positions) == len(scored), f"sequence {sequence}"
        for (row, column), k in zip(positions, scored):
            # The answer token, at its position, predicted from exactly its own sequence's tokens before it.
            assert column > 0
            assert batch["input_ids"][row, column].item() == ids[k]
            assert batch["position_ids"][row, column].item() == k
            context = mask[row, column - 1].nonzero().flatten().tolist()
            assert batch["input_ids"][row, context].tolist() == ids[:k]
            assert batch["position_ids"][row, context].tolist() == list(range(k))


@given(pairs=token_pairs(), options=collator_options, with_index=st.booleans())
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_layout_is_consistent_on_random_rows(pairs, options, with_index):
    if with_index:
        pairs = [{**pair, "example_index": 100 + b} for b, pair in enumerate(pairs)]
    empty = empty_sequence(pairs)
    sequences = expected_sequences(pairs, options["max_length"], options["truncation_mode"])
    if empty:
        event("a sequence without tokens")
    elif not all(scored for _, scored in sequences):
        event("an answer without a token left")
    for name, layout in LAYOUTS.items():
        collator = PreferenceCollator(pad_token_id=0, **options, **layout)
        if empty is not None:
            b, answer = empty
            row = f" (dataset row {100 + b})" if with_index else ""
            expected = f"pair {b} of the batch{row}: empty 'prompt_ids' and empty '{answer}_ids'"
            with pytest.raises(ValueError, match=f"^{re.escape(expected)}"):
                collator(pairs)
            continue
        batch = collator(pairs)
        check_layout(batch, pairs, sequences, pad=0, multiple=options["pad_to_multiple_of"])
        if with_index:
            assert batch["example_index"].tolist() == [100 + b for b in range(len(pairs))], name
        else:
            assert "example_index" not in batch


@given(pairs=token_pairs(), options=collator_options)
@FAST
def test_cached_reference_values_land_on_their_answer_tokens_in_every_layout(pairs, options):
    assume(empty_sequence(pairs) is None)
    sequences = expected_sequences(pairs, options["max_length"], options["truncation_mode"])
    # Distinct values per token: -(1000 s + j + 1) for token j of sequence s.
    values = [[-(1000.0 * s + j + 1) for j in range(len(scored))] for s, (_, scored) in enumerate(sequences)]
    rows = [
        {**pair, "ref_chosen_token_logps": values[b], "ref_rejected_token_logps": values[len(pairs) + b]}
        for b, pair in enumerate(pairs)
    ]
    for layout in LAYOUTS.values():
        batch = PreferenceCollator(pad_token_id=0, **options, **layout)(rows)
        assert cached_reference_logps(batch).answer_values().tolist() == values
        assert batch["ref_token_logps"].count_nonzero().item() == sum(map(len, values))


@pytest.mark.parametrize("max_length", [0, 1])
def test_max_length_below_two_is_refused(max_length):
    with pytest.raises(ValueError, match=f"max_length must be at least 2 \\(or None\\), got {max_length}"):
        PreferenceCollator(pad_token_id=0, max_length=max_length)


def test_an_empty_list_of_examples_is_refused():
    with pytest.raises(ValueError, match="empty list of examples"):
        PreferenceCollator(pad_token_id=0)([])


# ---------------------------------------------------------------------------------------------------------------------
# 2b. The same finite log-probs in every layout as each sequence scored on its own, on a tiny model.


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_model(request):
    torch.manual_seed(0)
    config = tiny_llama_config(VOCAB, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=request.param, dtype=torch.float32).eval()
    add_fused_lm_head(model)
    return model


def sequence_alone_logps(model, ids: list[int], scored: list[int]) -> float:
    """log p of the scored tokens with the model's ordinary forward on the sequence alone (full logits, no layout)."""
    if not scored:
        return 0.0
    logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(logits[k - 1, ids[k]].item() for k in scored)


@given(pairs=token_pairs(max_pairs=3, max_prompt=12), options=collator_options)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_layout_gives_finite_log_probs_equal_to_each_sequence_alone(tiny_model, pairs, options):
    assume(empty_sequence(pairs) is None)
    sequences = expected_sequences(pairs, options["max_length"], options["truncation_mode"])
    with torch.no_grad():
        want = torch.tensor([sequence_alone_logps(tiny_model, ids, scored) for ids, scored in sequences])
        for name, layout in LAYOUTS.items():
            batch = PreferenceCollator(pad_token_id=0, **options, **layout)(pairs)
            got = completion_token_logps(tiny_model, batch)
            assert torch.isfinite(got.logps).all(), name
            seq_len = max(batch["input_ids"].size(1), max(len(ids) for ids, _ in sequences))
            tol = sequence_logps_tol(want, got.lengths(), tiny_model.config, seq_len)
            assert_within(got.sequence_logps(), want, tol, name)  # fp32 rounding per answer (tests/numerics.py)
            assert got.lengths().tolist() == [float(len(scored)) for _, scored in sequences], name
    assert all(w < 0 for w, (_, scored) in zip(want.tolist(), sequences) if scored)  # real log-probs, not zeros


# ---------------------------------------------------------------------------------------------------------------------
# 1d. The tokenization path: valid hostile text always leaves every sequence at least one answer token.


MAX_TOKENS = 32


@pytest.fixture(scope="module")
def prepare(tiny_dir, tokenizer, tmp_path_factory):
    """`DPOTrainer._prepare_dataset` of one tiny trainer, with max_length=MAX_TOKENS and a chosen truncation mode."""
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("prepare")), report_to="none", bf16=False)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_dir),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}]),
        processing_class=tokenizer,
    )

    configs = {
        mode: DPOConfig(
            output_dir=args.output_dir, report_to="none", bf16=False, max_length=MAX_TOKENS, truncation_mode=mode
        )
        for mode in ("keep_start", "keep_end")
    }

    def run(dataset: Dataset, mode: str) -> Dataset:
        return trainer._prepare_dataset(dataset, tokenizer, configs[mode], "train")

    return run


@given(
    rows=standard_rows(max_size=4) | conversational_rows(implicit=False, max_size=3),
    mode=st.sampled_from(["keep_start", "keep_end"]),
    data=st.data(),
)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_valid_hostile_text_tokenizes_to_answers_with_tokens_left(prepare, tokenizer, rows, mode, data):
    for row in data.draw(st.sets(st.integers(0, len(rows) - 1)), label="long rows"):  # prompts past max_length
        if isinstance(rows[row]["prompt"], str):
            rows[row]["prompt"] *= 12
        else:
            rows[row]["prompt"][-1]["content"] *= 12
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            prepared = prepare(as_json_columns(rows), mode)
        except ValueError as error:
            assert mode == "keep_start" and "No rows are left" in str(error)
            event("every prompt fills max_length")
            return
    counts = [re.search(r"(\d+) of (\d+) rows dropped", str(w.message)) for w in caught]
    dropped = sum(int(match[1]) for match in counts if match)
    assert len(prepared) + dropped == len(rows) and (dropped == 0 or mode == "keep_start")
    event(f"{dropped} of {len(rows)} rows dropped")
    examples = [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in prepared]
    assert all(e["chosen_ids"] and e["rejected_ids"] for e in examples)
    sequences = expected_sequences(examples, MAX_TOKENS, mode)
    if any(scored and scored[0] == 1 and len(ids) == MAX_TOKENS for ids, scored in sequences):
        event("truncation left no prompt")
    assert all(scored for _, scored in sequences)  # at least one scored answer token in every sequence
    for layout in LAYOUTS.values():
        collator = PreferenceCollator(
            pad_token_id=tokenizer.pad_token_id, max_length=MAX_TOKENS, truncation_mode=mode, **layout
        )
        check_layout(collator(examples), examples, sequences, pad=tokenizer.pad_token_id, multiple=None)


# ---------------------------------------------------------------------------------------------------------------------
# 3. End to end: hostile datasets through the trainer, one training step each.

LONG = "Tell me everything about 👩‍👩‍👧‍👦, مرحبا and \u3000全角 " * 3
HOSTILE_ROWS = [
    {"prompt": "User: ok\x00\u3000?\nAssistant:", "chosen": " Sure! 😀 \u202eok مرحبا", "rejected": " No.\u3000"},
    {"prompt": "User: " + LONG + "\nAssistant:", "chosen": " Sure! <|pad|> here", "rejected": " No. {{ x }}"},
    {"prompt": "User: e\u0301\u200b\nAssistant:", "chosen": " Sure!\r\n\t", "rejected": " No. \x1b[31m"},
    {"prompt": "User: " + LONG + "\nAssistant:", "chosen": " Sure! " + LONG, "rejected": " No. " + LONG},
]
HOSTILE_ROWS.append(dict(HOSTILE_ROWS[0]))  # a duplicate pair


MAX_LENGTH = 16


def train_one_step_log(tiny_dir, tokenizer, dpo_args, dataset: Dataset, **overrides) -> dict:
    """What one training step on `dataset` logs (its loss, log-probs, ...)."""
    args = dpo_args(**{"max_steps": 1, "per_device_train_batch_size": 8, "max_length": MAX_LENGTH, **overrides})
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_dir),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    (row,) = [row for row in trainer.state.log_history if "loss" in row]
    return row


def train_one_step(tiny_dir, tokenizer, dpo_args, dataset: Dataset, **overrides) -> float:
    return train_one_step_log(tiny_dir, tokenizer, dpo_args, dataset, **overrides)["loss"]


@pytest.mark.numerics
@pytest.mark.parametrize(
    "overrides",
    [
        {"truncation_mode": "keep_end", "padding_side": "left", "share_prompt": False},
        {"truncation_mode": "keep_end", "share_prompt": True, "packing": True},
        {"truncation_mode": "keep_end", "ref_cache": True},
    ],
    ids=["left-padding", "shared+packed", "ref-cache"],
)
def test_hostile_rows_train_with_prompts_past_max_length(tiny_dir, tokenizer, dpo_args, tmp_path, overrides):
    if overrides.get("ref_cache"):
        overrides = {**overrides, "ref_cache_dir": str(tmp_path / "ref")}
    row = train_one_step_log(tiny_dir, tokenizer, dpo_args, Dataset.from_list(HOSTILE_ROWS), **overrides)
    loss = row["loss"]
    assert math.isfinite(loss)
    # Step 1, before any update: π = π_ref (TRL's reference model is a copy of the policy's weights).
    if not overrides.get("ref_cache"):
        # The policy and reference passes run the same kernels on the same batch: exactly log 2 in fp32.
        assert loss == zero_margin_loss(len(HOSTILE_ROWS))
        return
    # The reference comes from the cache, computed in another pass (rows unshuffled, in other batch positions): log 2
    # up to the fp32 rounding of each answer's Σ_t log p in two passes (forward + summation, tests/numerics.py); every
    # answer has ≤ MAX_LENGTH tokens, and a shared-prompt row holds ≤ 2·MAX_LENGTH.
    config = tiny_llama_config(len(tokenizer))
    rtol = forward_rtol(config, 2 * MAX_LENGTH) + sum_rtol(MAX_LENGTH)
    chosen, rejected = (torch.tensor([rtol * abs(row[f"logps/{answer}"])]) for answer in ("chosen", "rejected"))
    tol = sigmoid_loss_tol(0.1, chosen, rejected)  # |π − π_ref| ≤ one two-pass tolerance per answer of the margin
    assert_within(loss, zero_margin_loss(len(HOSTILE_ROWS)), tol, "step-1 loss vs log 2")
    # A cache misaligned by one answer (chosen ↔ rejected) would move the loss by about β·|log π_c − log π_r|.
    assert_effect(0.1 * abs(row["logps/chosen"] - row["logps/rejected"]), tol, what="chosen vs rejected log-probs")


def test_hostile_rows_whose_prompts_fill_max_length_are_dropped_with_a_warning(tiny_dir, tokenizer, dpo_args):
    with pytest.warns(UserWarning, match=r"train dataset: 2 of 5 rows dropped because their prompt alone"):
        loss = train_one_step(tiny_dir, tokenizer, dpo_args, Dataset.from_list(HOSTILE_ROWS))
    assert math.isfinite(loss)


def test_hostile_conversational_rows_train(tiny_dir, tokenizer, dpo_args):
    rows = to_conversational(Dataset.from_list(HOSTILE_ROWS))
    loss = train_one_step(tiny_dir, tokenizer, dpo_args, rows, truncation_mode="keep_end", max_length=24)
    assert math.isfinite(loss)


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"chosen": "\u3000\u200b\ufeff"}, "column 'chosen', row 3: empty or whitespace-only string"),
        ({"prompt": "\x00"}, "column 'prompt', row 3: empty or whitespace-only string"),
        ({"rejected": HOSTILE_ROWS[0]["chosen"]}, "row 3: 'chosen' equals 'rejected'"),
    ],
)
def test_bad_hostile_rows_fail_before_training_with_column_and_row(tiny_dir, tokenizer, dpo_args, row, expected):
    rows = [dict(r) for r in HOSTILE_ROWS]
    rows[3] = {**HOSTILE_ROWS[0], **row}
    with pytest.raises(ValueError, match=f"^train dataset: {expected}"):
        train_one_step(tiny_dir, tokenizer, dpo_args, Dataset.from_list(rows))


def test_a_mixed_format_jsonl_file_fails_before_training_with_its_row(tiny_dir, tokenizer, dpo_args, tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [dict(r) for r in HOSTILE_ROWS]
    rows[2] = {**rows[2], "chosen": [message("assistant", "Sure!")], "rejected": [message("assistant", "No.")]}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="^train dataset: column 'chosen', row 2: expected a string like the first"):
        train_one_step(tiny_dir, tokenizer, dpo_args, load_preference_dataset(str(path))["train"])


def test_a_message_without_role_fails_before_training_with_its_row(tiny_dir, tokenizer, dpo_args):
    rows = to_conversational(Dataset.from_list(HOSTILE_ROWS)).to_list()
    rows[4]["prompt"] = [{"content": "Hi"}]
    with pytest.raises(ValueError, match="^train dataset: column 'prompt', row 4: message 0 has no string 'role'"):
        train_one_step(tiny_dir, tokenizer, dpo_args, Dataset.from_list(rows))
