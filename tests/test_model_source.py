"""One default model for every command, and one reading of `--model_name_or_path`."""

import pytest

from trl_dpo_ext import cli, model_source
from trl_dpo_ext.smollm2 import SMOLLM2_NAME
from trl_dpo_ext.tiny_model import TINY_NAME


def test_names_resolve_to_local_models_and_none_to_the_default(monkeypatch, tmp_path):
    monkeypatch.setitem(model_source.LOCAL_MODELS, SMOLLM2_NAME, lambda: tmp_path / "smollm2")
    monkeypatch.setitem(model_source.LOCAL_MODELS, TINY_NAME, lambda: tmp_path / "tiny")
    assert model_source.DEFAULT_MODEL == SMOLLM2_NAME
    assert model_source.resolve_model_path("SmolLM2-135M-Instruct") == str(tmp_path / "smollm2")
    assert model_source.resolve_model_path(None) == str(tmp_path / "smollm2")
    assert model_source.resolve_model_path(TINY_NAME) == str(tmp_path / "tiny")
    assert model_source.resolve_model_path("some/other-model") == "some/other-model"


class Resolved(Exception):
    """Raised where a command resolves the default model: proof it got there, before any model is loaded."""


@pytest.mark.parametrize(
    "argv",
    [
        ["dpo", "--config", "{config}", "--output_dir", "{out}"],  # a YAML that names no model
        ["iterative", "--output_dir", "{out}"],
        ["pairs", "--reward_fn", "concise", "--output", "{out}/pairs.jsonl"],
    ],
    ids=["dpo", "iterative", "pairs"],
)
def test_every_command_starts_from_the_same_default_model(argv, monkeypatch, tmp_path):
    def default():
        raise Resolved

    monkeypatch.setitem(model_source.LOCAL_MODELS, model_source.DEFAULT_MODEL, default)
    config = tmp_path / "mine.yaml"
    config.write_text("beta: 0.2\n")
    with pytest.raises(Resolved):
        cli.main([arg.format(config=config, out=tmp_path / "run") for arg in argv])


def test_the_model_flag_help_names_the_default():
    for name in ("dpo", "iterative", "pairs"):
        text = " ".join(cli.render_help(name).split())
        assert f"'{SMOLLM2_NAME}' (the default" in text, name
