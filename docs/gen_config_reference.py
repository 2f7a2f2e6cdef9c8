"""Generate `docs/config_reference.md` from the dataclass fields and their `help` strings.

    python docs/gen_config_reference.py

`tests/test_docs.py` regenerates the text and fails when the file differs, so a field added or changed without
rerunning this script is caught.
"""

import dataclasses
import inspect
import re
from pathlib import Path

from trl_dpo_ext.command_args import (
    IterativeArguments,
    MergeArguments,
    PairsArguments,
    PlotArguments,
    RecipeArguments,
    ScoreArguments,
)
from trl_dpo_ext.config import DPOConfig, QLoRAModelConfig
from trl_dpo_ext.iterative import IterativeDPOConfig
from trl_dpo_ext.ppo_api import PPOConfig


DOC = Path(__file__).parent / "config_reference.md"

# (dataclass, where its fields are flags, what the table leaves out)
SECTIONS = [
    (DPOConfig, "`trl-dpo-ext dpo`, `recipes/dpo_qlora.py`, YAML", "every field of `trl.DPOConfig`"),
    (QLoRAModelConfig, "`trl-dpo-ext dpo`, `recipes/dpo_qlora.py`, YAML", "the other fields of `trl.ModelConfig`"),
    (RecipeArguments, "`trl-dpo-ext dpo`, `recipes/dpo_qlora.py`, YAML", None),
    (PPOConfig, "`recipes/ppo_to_dpo.py`, YAML", "every field of `trl_dpo_ext.DPOConfig`"),
    (IterativeDPOConfig, "`trl-dpo-ext iterative`, YAML", "every field of `trl_dpo_ext.DPOConfig`"),
    (IterativeArguments, "`trl-dpo-ext iterative`, YAML", None),
    (PairsArguments, "`trl-dpo-ext pairs`", None),
    (MergeArguments, "`trl-dpo-ext merge`", None),
    (ScoreArguments, "`trl-dpo-ext score`", None),
    (PlotArguments, "`trl-dpo-ext plot`", None),
]

HEADER = """# Configuration reference

Generated from the dataclass `help` strings by `python docs/gen_config_reference.py`; do not edit by hand.
Every field is a command-line flag (`--name value`) and a key of a YAML file passed with `--config`. Only the fields
each class declares are listed: inherited TRL / transformers fields keep their meaning and are documented by TRL.
"""


def render() -> str:
    """The whole reference as Markdown."""
    parts = [HEADER]
    for cls, used_by, inherited in SECTIONS:
        parts.append(_section(cls, used_by, inherited))
    return "\n".join(parts)


def _section(cls, used_by: str, inherited: str | None) -> str:
    own = cls.__dict__.get("__annotations__", {})
    fields = [f for f in dataclasses.fields(cls) if f.name in own]
    summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    summary = re.sub(r"\[`~?([^`]+)`\]", r"`\1`", summary)  # doc-builder links -> code spans
    lines = [f"## `{cls.__module__}.{cls.__name__}`", "", summary, "", f"Used by: {used_by}."]
    if inherited:
        lines[-1] += f" Also takes {inherited}."
    lines += ["", "| field | type | default | help |", "|---|---|---|---|"]
    for f in fields:
        help_text = f.metadata.get("help", "").replace("|", "\\|").replace("\n", " ")
        if "choices" in f.metadata:
            help_text += " Choices: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
        # The annotation, not `f.type`: HfArgumentParser rewrites `f.type` in place (`str | None` -> `str`).
        lines.append(f"| `{f.name}` | `{_type(own[f.name])}` | {_default(f)} | {help_text} |")
    return "\n".join(lines) + "\n"


def _type(annotation) -> str:
    # A pipe inside a table cell must be escaped, code span or not (GitHub-flavoured Markdown).
    name = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
    return name.replace("|", "\\|")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    return f"`{value!r}`"


def main() -> None:
    DOC.write_text(render())
    print(f"Wrote {DOC}")


if __name__ == "__main__":
    main()
