"""Every YAML config under trl_dpo_ext/configs parses into the recipe's dataclasses; config validation errors."""

import importlib.util
from dataclasses import fields
from pathlib import Path

import pytest
import trl
import yaml

from trl_dpo_ext import DPOConfig, QLoRAModelConfig, cli
from trl_dpo_ext.config import extension_setting


ROOT = Path(__file__).parents[1]
# How TRL/transformers normalise a YAML value in __post_init__.
NORMALISED = {"loss_type": lambda v: [v] if isinstance(v, str) else v, "report_to": lambda v: [] if v == "none" else v}
CONFIGS = sorted((ROOT / "trl_dpo_ext" / "configs").glob("*.yaml"))


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_yaml_parses_into_the_dataclasses(path, tmp_path):
    recipe = load_recipe("dpo_qlora")  # every config here is one of this recipe's
    script_args, training_args, model_args, recipe_args = recipe.parse(
        ["--config", str(path), "--output_dir", str(tmp_path)]
    )
    values = yaml.safe_load(path.read_text())
    parsed = {**vars(script_args), **vars(model_args), **vars(recipe_args)}
    for key, value in values.items():
        if key == "output_dir":
            continue
        got = getattr(training_args, key) if hasattr(training_args, key) else parsed[key]
        got = getattr(got, "value", got)  # enums such as lr_scheduler_type
        assert got == NORMALISED.get(key, lambda v: v)(value), key
    assert isinstance(training_args, DPOConfig) and isinstance(model_args, QLoRAModelConfig)


def test_default_config_is_used_without_arguments_and_flags_override_it(tmp_path):
    recipe = load_recipe("dpo_qlora")
    _, training_args, model_args, _ = recipe.parse(["--beta", "0.25", "--output_dir", str(tmp_path)])
    assert training_args.beta == 0.25
    assert model_args.lora_r == 16  # from the YAML
    assert not training_args.bf16 and not training_args.gradient_checkpointing  # CPU machine defaults


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="`displacement_margin` must be >= 0, got -1"):
        DPOConfig(output_dir="x", displacement_margin=-1)
    with pytest.raises(ValueError, match="`padding_side` must be 'right' or 'left'"):
        DPOConfig(output_dir="x", padding_side="up")
    with pytest.raises(ValueError, match="needs `load_in_4bit=True` and `use_peft=True`"):
        QLoRAModelConfig(load_in_4bit=False)
    with pytest.raises(ValueError, match="`bnb_4bit_quant_type` must be 'nf4'"):
        QLoRAModelConfig(bnb_4bit_quant_type="fp4")
    with pytest.raises(ValueError, match="`bnb_4bit_compute_dtype` must be one of"):
        QLoRAModelConfig(bnb_4bit_compute_dtype="int8")
    with pytest.raises(ValueError, match="`bnb_4bit_quant_storage` must be one of"):
        QLoRAModelConfig(bnb_4bit_quant_storage="int8")


def test_dpo_help_says_what_padding_free_does_here():
    """TRL 1.16's help says padding_free is unavailable and falls back to padding; here it turns on packing."""
    (action,) = [a for a in cli.command_parser("dpo")._actions if "--padding_free" in a.option_strings]
    assert "packing" in action.help and "temporarily unavailable" not in action.help.lower()
    stock = next(f for f in fields(trl.DPOConfig) if f.name == "padding_free")
    assert "temporarily unavailable" in stock.metadata["help"].lower()  # what this test guards against


def test_retold_trl_fields_keep_trls_defaults(tmp_path):
    ours, stock = DPOConfig(output_dir=str(tmp_path), bf16=False), trl.DPOConfig(output_dir=str(tmp_path), bf16=False)
    retold = set(DPOConfig.__annotations__) & {f.name for f in fields(trl.DPOConfig)}
    assert {"padding_free", "max_length", "precompute_ref_log_probs", "ld_alpha"} <= retold
    for name in retold:
        assert getattr(ours, name) == getattr(stock, name), name


def test_extension_settings_default_to_our_config_fields(tmp_path):
    stock = trl.DPOConfig(output_dir=str(tmp_path), bf16=False)
    default = DPOConfig(output_dir=str(tmp_path), bf16=False)
    own = [f for f in fields(DPOConfig) if not hasattr(stock, f.name)]
    assert {"share_prompt", "adapter_dtype", "max_consecutive_nonfinite"} <= {f.name for f in own}
    for f in own:  # a plain TRL config reads our field's default, and ours its value
        assert extension_setting(stock, f.name) == f.default == extension_setting(default, f.name)
    ours = DPOConfig(output_dir=str(tmp_path), bf16=False, max_consecutive_nonfinite=7)
    assert extension_setting(ours, "max_consecutive_nonfinite") == 7
    with pytest.raises(KeyError):
        extension_setting(ours, "beta")  # TRL's field: read it directly
