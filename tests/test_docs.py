"""The docs stay true: the config reference is regenerated and compared, imports and commands they show work."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from trl import TrlParser

from trl_dpo_ext import cli, train


ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)


def code_blocks(language: str) -> list[tuple[Path, str]]:
    return [(doc, body) for doc in DOCS for lang, body in CODE_BLOCK.findall(doc.read_text()) if lang == language]


def test_config_reference_is_generated_from_the_dataclasses():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "docs" / "gen_config_reference.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    text = generator.render()
    assert "| `dataset_format` | `str` | `'as_is'` |" in text and "| `beta` | `float \\| None` | `None` |" in text
    assert generator.DOC.read_text() == text, (
        "docs/config_reference.md is out of date: run `python docs/gen_config_reference.py`"
    )


@pytest.mark.parametrize("language", ["python", "diff"])
def test_documented_imports_work(language):
    imports = [
        line.lstrip("+").split("#")[0].strip()
        for _, body in code_blocks(language)
        for line in body.splitlines()
        if line.lstrip("+").startswith("from trl_dpo_ext")
    ]
    assert imports
    for statement in imports:
        exec(statement, {})


NEEDS = re.compile(r"# Needs (the Hub|a GPU|the run above)")  # a block's first line, saying why it is not run here


@pytest.mark.parametrize("doc", [doc for doc in DOCS if "```python" in doc.read_text()], ids=lambda doc: doc.name)
def test_python_snippets_run_as_written(doc, tmp_path, monkeypatch):
    """Each doc's Python blocks, in order, each in a fresh namespace, in one directory: as a reader pastes them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRL_DPO_EXT_CACHE", str(tmp_path / "cache"))
    blocks = [body for lang, body in CODE_BLOCK.findall(doc.read_text()) if lang == "python"]
    ran = 0
    for body in blocks:
        if NEEDS.match(body):
            continue
        exec(compile(body, f"{doc.name} snippet", "exec"), {"__name__": "__snippet__"})
        ran += 1
    assert ran or all(NEEDS.match(body) for body in blocks)


def test_documented_commands_parse():
    commands = []
    for _, body in code_blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["trl-dpo-ext"]:
                commands.append(words[1:])
    assert {words[0] for words in commands} == set(cli.COMMANDS)  # every command is shown at least once
    for name, *args in commands:
        if name == "dpo":
            train.parse(args)
        elif cli.COMMANDS[name].arguments is not None:
            TrlParser(cli.COMMANDS[name].arguments).parse_args_and_config(args)
        else:
            assert args == [], (name, args)
