"""Safe loading: no model code from the Hub unless asked, and nothing the package reads back can run code."""

import ast
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

import trl_dpo_ext
from trl_dpo_ext import models, recipe
from trl_dpo_ext.preference_data import load_preference_dataset


PACKAGE = Path(trl_dpo_ext.__file__).parent
# Calls that can execute code while deserializing.
UNSAFE_CALLS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("np", "load"), ("numpy", "load")}
UNSAFE_MODULES = {"pickle", "dill", "joblib", "cloudpickle", "marshal", "shelve"}


def test_trust_remote_code_is_off_unless_asked():
    assert recipe.parse([])[1].trust_remote_code is False
    assert recipe.parse(["--trust_remote_code", "true"])[1].trust_remote_code is True


@pytest.mark.parametrize("asked", [False, True])
def test_the_base_model_is_loaded_with_trust_remote_code_as_asked(tiny_dir, monkeypatch, asked):
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy)
    kwargs = {"trust_remote_code": True} if asked else {}
    models.load_qlora_model(tiny_dir, LoraConfig(r=2, target_modules="all-linear"), **kwargs)
    assert seen["trust_remote_code"] is asked


def test_the_package_never_unpickles():
    """Caches are safetensors, pair sets Arrow/JSON/parquet, configs JSON/YAML: no reader that can run code."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & UNSAFE_MODULES, f"{path}:{node.lineno}"
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in UNSAFE_MODULES, f"{path}:{node.lineno}"
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                name = (owner.id if isinstance(owner, ast.Name) else None, node.func.attr)
                assert name not in UNSAFE_CALLS, f"{path}:{node.lineno} calls {'.'.join(map(str, name))}"
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec"), f"{path}:{node.lineno}"


@pytest.mark.parametrize("suffix", [".pt", ".pkl", ".npy"])
def test_data_files_that_could_hold_pickles_are_refused(tmp_path, suffix):
    path = tmp_path / f"pairs{suffix}"
    torch.save({"prompt": ["x"]}, path)
    with pytest.raises(ValueError, match=rf"Unsupported data file {path}: expected one of"):
        load_preference_dataset(str(path))
