"""The docs stay true: the config reference is regenerated and compared, imports and commands they show work."""

import importlib.util
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from trl import TrlParser

from trl_dpo_ext import cli, recipe


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
            recipe.parse(args)
        elif name == "iterative":
            recipe.parse_iterative(args)
        elif cli.COMMANDS[name].arguments is not None:
            TrlParser(cli.COMMANDS[name].arguments).parse_args_and_config(args)
        else:
            assert args == [], (name, args)


# Shell commands. Every command in a shell block is run by `test_shell_commands_run_as_written` unless a marker says
# why not: it needs what a test machine lacks, or a test (or `.ci/run`) runs it, at CI's size, or it is a measurement
# (minutes to an hour of a benchmark) whose committed output is named (`Measured: benchmarks/results/FILE`). On a
# comment-only line a marker covers the commands after it, up to the next blank line; in a command's own comment, that
# command.
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh"}
SHELL_MARKER = re.compile(
    r"Needs (?:the Hub|a GPU|a checkout of huggingface/trl)|[Rr]un by (?P<where>[\w./-]+(?:::\w+)?)"
    r"|Measured: (?P<output>benchmarks/results/[\w./-]*\w)"
)
# What an unmarked command may run: the package's CLI (in-process) and shell builtins that write small files. Anything
# else (a recipe, a benchmark) costs CI minutes: mark it with the test that runs it at CI's size (a measurement: with
# the result it wrote).
QUICK_PROGRAMS = {"trl-dpo-ext", "printf", "echo", "mkdir", "cat"}
# The one change to a command as written, its size: training stops after 2 steps (each logged; the recipe runs 80),
# scores 8 held-out pairs before and after (not 80) and runs the reference each step instead of caching it for all 320
# training pairs first (tests/test_refcache.py and tests/test_recipe.py cover the cache); pairs are sampled for 8
# prompts (not 320).
SIZE_CAPS = {
    "dpo": [
        "--max_steps",
        "2",
        "--logging_steps",
        "1",
        "--heldout_pairs",
        "8",
        "--ref_cache",
        "false",
        "--heldout_generations",
        "2",
        "--generation_max_new_tokens",
        "4",
    ],  # fmt: skip
    "pairs": ["--max_prompts", "8"],
}
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&"}


@dataclass(frozen=True)
class ShellCommand:
    doc: Path
    line: int  # of the command's first line in the doc
    text: str  # continuation lines joined, comment removed
    marker: str | None  # the marker that covers it (the whole match), if any
    where: str | None  # for "Run by WHERE": the test or script named
    output: str | None = None  # for "Measured: OUTPUT": the committed result it wrote

    def __str__(self) -> str:
        return f"{self.doc.name}:{self.line}: {self.text}"


def split_comment(line: str) -> tuple[str, str]:
    """`line` as (command, comment): the comment starts at the first `#` outside quotes that begins a word."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
            elif char == "\\" and quote == '"':
                continue
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:]
    return line.rstrip(), ""


def shell_commands() -> list[ShellCommand]:
    commands = []
    for doc in DOCS:
        text = doc.read_text()
        for block in CODE_BLOCK.finditer(text):
            if block.group(1) not in SHELL_LANGUAGES:
                continue
            first_line = text[: block.start(2)].count("\n") + 1
            lines, covering, i = block.group(2).splitlines(), None, 0
            while i < len(lines):
                start, logical = i, lines[i]
                while logical.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    logical = logical[:-1] + " " + lines[i].strip()
                i += 1
                command, comment = split_comment(logical.strip())
                marker = SHELL_MARKER.search(comment)
                if not command:
                    covering = marker if comment else None  # a blank line ends a marker's paragraph
                    continue
                marker = marker or covering
                where, output = (marker.group("where"), marker.group("output")) if marker else (None, None)
                commands.append(
                    ShellCommand(doc, first_line + start, command, marker and marker.group(0), where, output)
                )
    return commands


def test_every_shell_command_is_run_or_marked():
    """A documented command either runs here (test_shell_commands_run_as_written) or says why not, truthfully."""
    commands = shell_commands()
    assert len(commands) > 20  # the parser found the docs' blocks
    problems = []
    for command in commands:
        if command.output and not (ROOT / command.output).is_file():
            problems.append(f"{command}: marker names the result {command.output}, which does not exist")
        elif command.where:
            path, _, name = command.where.partition("::")
            if not (ROOT / path).is_file():
                problems.append(f"{command}: marker names {path}, which does not exist")
            elif name and not re.search(rf"^\s*def {name}\(", (ROOT / path).read_text(), re.MULTILINE):
                problems.append(f"{command}: marker names {command.where}, but {path} has no {name}")
        elif command.marker is None:
            program = shlex.split(command.text)[0]
            if program not in QUICK_PROGRAMS:
                problems.append(
                    f"{command}: neither run by test_shell_commands_run_as_written ({program} is not among "
                    f"{sorted(QUICK_PROGRAMS)}) nor marked (# Needs the Hub, # Needs a GPU, # Run by tests/..., "
                    "# Measured: benchmarks/results/...)"
                )
    assert not problems, "\n".join(problems)


def run_shell_command(command: ShellCommand, cwd: Path) -> None:
    words = shlex.split(command.text)
    if words[0] == "trl-dpo-ext" and not SHELL_OPERATORS & set(words):
        # In-process, as the console script runs it (`trl_dpo_ext.cli:main`), without a new interpreter's imports.
        argv = words[1:] + SIZE_CAPS.get(words[1], [])
        assert cli.main(argv) == 0, command
    else:
        result = subprocess.run(["bash", "-c", command.text], cwd=cwd, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs_cache")  # the embedded tiny model, built once for every doc


RUN_HERE = sorted({c.doc for c in shell_commands() if c.marker is None}, key=DOCS.index)


@pytest.mark.parametrize("doc", RUN_HERE, ids=lambda doc: doc.name)
def test_shell_commands_run_as_written(doc, tmp_path, shared_cache, monkeypatch, capsys):
    """Each doc's unmarked commands, in order, in one fresh directory, offline: as a reader pastes them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRL_DPO_EXT_CACHE", str(shared_cache))
    for command in [c for c in shell_commands() if c.doc == doc and c.marker is None]:
        run_shell_command(command, tmp_path)
    out = capsys.readouterr().out
    if doc.name == "usage.md":  # its "Command line" section
        assert "Held-out reward accuracy (8 pairs): 0.500 before ->" in out and "Plot of loss, kl saved to" in out
        assert "Wrote 8 preference pairs from 8 prompts to pairs.jsonl" in out


def test_benchmarks_are_run_as_modules():
    """`benchmarks` is a package: its scripts are shown as `python -m benchmarks.NAME`, never by their file path."""
    as_files = [
        f"{doc.relative_to(ROOT)}:{text[: match.start()].count(chr(10)) + 1}: {match.group(0)}"
        for doc in DOCS
        for text in [doc.read_text()]
        for match in re.finditer(r"python3? benchmarks/\w+\.py", text)
    ]
    assert not as_files, "\n".join(as_files)


# Links between the docs. A file another engineer is writing in parallel may be linked before it lands; once it exists
# its links and anchors are checked like any other.
PENDING = {"docs/architecture.md"}
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than `-` and `_` dropped, spaces to hyphens."""
    text = CODE_BLOCK.sub("", path.read_text())
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)
    }


def test_links_between_docs_resolve():
    """Every relative link in README.md and docs/*.md names a file that exists and, with `#anchor`, a heading in it."""
    problems = []
    for doc in DOCS:
        for target in LINK.findall(CODE_BLOCK.sub("", doc.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # https://, mailto:
            path, _, anchor = target.partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            if not resolved.exists():
                if str(resolved.relative_to(ROOT)) not in PENDING:
                    problems.append(f"{doc.name}: {target}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{doc.name}: {target}: no heading with that anchor")
    assert not problems, "\n".join(problems)
