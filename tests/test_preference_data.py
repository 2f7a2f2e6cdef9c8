"""The bundled toy set keeps its rule; local files load; conversational rows validate."""

import json

import pytest
from datasets import Dataset

from trl_dpo_ext import load_preference_dataset, preference_data, validate_preference_dataset
from trl_dpo_ext.preference_data import BUNDLED_DATASET


def test_bundled_set_follows_its_rule():
    data = load_preference_dataset(None)
    assert (len(data["train"]), len(data["test"])) == (320, 80)
    for split in data.values():
        validate_preference_dataset(split)
        for row in split:
            assert row["chosen"].startswith(" Sure!") and row["rejected"].startswith(" No.")
    item = lambda row: row["chosen"].split()[3]  # noqa: E731  " Sure! The <brand> <item> is ..."
    assert not {item(r) for r in data["train"]} & {item(r) for r in data["test"]}  # held-out items are unseen


def test_bundled_file_is_what_the_generator_writes(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "recipes" / "make_toy_preferences.py"
    spec = importlib.util.spec_from_file_location("make_toy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path / "toy.jsonl")
    assert (tmp_path / "toy.jsonl").read_text() == BUNDLED_DATASET.read_text()


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_local_files_load_as_a_train_split(tmp_path, suffix):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        path.write_text(json.dumps(rows[0]) + "\n")
    else:
        Dataset.from_list(rows).to_parquet(str(path))
    assert load_preference_dataset(str(path))["train"].to_list() == rows


def test_unsupported_local_file(tmp_path):
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(ValueError, match="Unsupported data file"):
        load_preference_dataset(str(tmp_path / "pairs.txt"))


def test_conversational_rows():
    good = [{"role": "user", "content": "hi"}]
    validate_preference_dataset(
        Dataset.from_list(
            [
                {
                    "chosen": good + [{"role": "assistant", "content": "hello"}],
                    "rejected": good + [{"role": "assistant", "content": "no"}],
                }
            ]
        )
    )  # implicit prompt is fine
    bad = Dataset.from_list(
        [
            {
                "prompt": good,
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            {"prompt": good, "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant"}]},
        ]
    )
    with pytest.raises(ValueError, match="column 'rejected', row 1: message 0 has no string 'content'"):
        validate_preference_dataset(bad)


def test_validation_reads_batches_and_names_the_row_across_them(monkeypatch):
    # A real preference set is read a batch at a time (never a whole column as Python strings); the row number still
    # counts from the start of the dataset, in the dataset's order (its indices mapping included).
    monkeypatch.setattr(preference_data, "VALIDATION_BATCH", 4)
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(11)]
    rows[9]["rejected"] = "a9"
    dataset = Dataset.from_list(rows)
    with pytest.raises(ValueError, match="^train dataset: row 9: 'chosen' equals 'rejected'"):
        validate_preference_dataset(dataset)
    with pytest.raises(ValueError, match="^eval dataset: row 2: 'chosen' equals 'rejected'"):
        validate_preference_dataset(dataset.select([0, 1, 9, 3]), "eval")
    validate_preference_dataset(dataset.select(range(9)))
