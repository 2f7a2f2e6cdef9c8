"""Every private TRL / transformers name the package touches (`trl_dpo_ext/private_api.py`) still exists as used.

An upgrade that breaks one fails here, in a test named after it, rather than deep in a training run.
"""

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch
import transformers
import trl
from numerics import assert_within, forward_rtol
from transformers import AutoModelForCausalLM

import trl_dpo_ext
from trl_dpo_ext import private_api


@pytest.mark.parametrize("hook", sorted(private_api.TRL_HOOKS))
def test_trl_hook_exists_with_the_expected_parameters(hook):
    assert hasattr(trl.DPOTrainer, hook), f"trl {trl.__version__} has no DPOTrainer.{hook}: update trl_dpo_ext"
    params = tuple(inspect.signature(getattr(trl.DPOTrainer, hook)).parameters)
    assert params == private_api.TRL_HOOKS[hook], f"trl {trl.__version__} changed DPOTrainer.{hook}{params}"


def test_compute_loss_still_routes_through_the_hook():
    assert "self._compute_loss(" in inspect.getsource(trl.DPOTrainer.compute_loss)


@pytest.mark.parametrize("name", private_api.TRL_ATTRIBUTES)
def test_trl_attribute_is_still_set_by_the_trainer(name):
    assert f"self.{name} =" in inspect.getsource(trl.DPOTrainer.__init__), name


def test_stock_loss_reads_the_reference_from_the_batch_under_precompute_ref_logps():
    source = inspect.getsource(trl.DPOTrainer._compute_loss)
    assert "if self.precompute_ref_logps:" in source and 'inputs["ref_chosen_logps"]' in source


@pytest.mark.parametrize("module, name", [(m, n) for m, names in private_api.TRL_HELPERS.items() for n in names])
def test_trl_helper_is_importable(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name}"


def test_collator_hook_we_extend():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    assert "torch_call" in vars(DataCollatorForPreference)


def test_fused_lm_head_returns_the_fields_we_read(tiny_dir):
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    add_fused_lm_head(model, outputs=private_api.FUSED_HEAD_OUTPUTS)
    input_ids = torch.tensor([[1, 5, 7, 9]])
    labels = input_ids.masked_fill(torch.tensor([[True, True, False, False]]), -100)
    outputs = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    for field in private_api.FUSED_HEAD_OUTPUTS:
        assert getattr(outputs, field) is not None, field
    assert outputs.log_probs.shape == (1, 3)  # aligned with input_ids[:, 1:]


@pytest.mark.numerics
def test_fused_lm_head_scores_the_backbone_output_it_is_given(tiny_dir):
    """`logps._answer_positions_only` relies on TRL's fused forward projecting the `last_hidden_state` of the model's
    `base_model` (the backbone), and on `shift_labels` being scored as given: one label per kept position."""
    from trl.trainer.utils import add_fused_lm_head

    from trl_dpo_ext.logps import _answer_positions_only

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    add_fused_lm_head(model, outputs=private_api.FUSED_HEAD_OUTPUTS)
    input_ids = torch.tensor([[1, 5, 7, 9, 4], [2, 6, 8, 3, 5]])
    answers = torch.tensor([[False, True, True, False], [False, False, False, True]])  # aligned with input_ids[:, 1:]
    full = model(input_ids=input_ids, labels=input_ids, fused_lm_head=True)
    with _answer_positions_only(model, answers):
        kept = model(input_ids=input_ids, shift_labels=input_ids[:, 1:][answers][None], fused_lm_head=True)
    assert kept.log_probs.shape == (1, 3)  # only the kept positions reached the head
    rtol = forward_rtol(model.config, input_ids.size(1))  # same backbone; the head's GEMM has another height
    for field in ("log_probs", "entropy"):
        want = getattr(full, field)[answers]
        assert_within(getattr(kept, field)[0], want, rtol * want.abs(), field)
    assert torch.equal(kept.is_top1[0], full.is_top1[answers])


def test_trl_names_the_frozen_adapter_copy_as_listed():
    source = inspect.getsource(trl.DPOTrainer.__init__)
    assert f'model.add_adapter("{private_api.TRL_REFERENCE_ADAPTER}", default_config)' in source


@pytest.mark.parametrize("name", sorted(private_api.TRANSFORMERS_TRAINER_METHODS))
def test_transformers_trainer_method(name):
    params = tuple(inspect.signature(getattr(transformers.Trainer, name)).parameters)
    assert (
        params[: len(private_api.TRANSFORMERS_TRAINER_METHODS[name])] == private_api.TRANSFORMERS_TRAINER_METHODS[name]
    )


@pytest.mark.parametrize("name", private_api.TRANSFORMERS_TRAINER_ATTRIBUTES)
def test_transformers_trainer_attribute(name):
    assert f"self.{name} =" in inspect.getsource(transformers.Trainer.__init__), name


@pytest.mark.parametrize("name", private_api.TRANSFORMERS_CONFIG_ATTRIBUTES)
def test_transformers_config_attribute(tiny_dir, name):
    config = transformers.AutoConfig.from_pretrained(tiny_dir)
    assert hasattr(config, name), name


def test_argparse_internals_used_to_group_help():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--flag")
    group = parser._action_groups[-1]
    assert [a.dest for a in parser._actions] == ["help", "flag"] and "flag" in [a.dest for a in group._group_actions]


def test_every_private_name_the_package_uses_is_listed():
    """Scan the package: an underscore attribute or `getattr` name it does not define itself must be listed."""
    package = Path(trl_dpo_ext.__file__).parent
    trees = {path.name: ast.parse(path.read_text()) for path in package.glob("*.py")}
    defined, used = set(), {}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif isinstance(node, ast.arg):
                defined.add(node.arg)
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                used.setdefault(node.attr, f"{name}:{node.lineno}")
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
                if (
                    len(node.args) > 1
                    and isinstance(node.args[1], ast.Constant)
                    and isinstance(node.args[1].value, str)
                ):
                    used.setdefault(node.args[1].value, f"{name}:{node.lineno}")
    private = {n: where for n, where in used.items() if n.startswith("_") and not n.startswith("__")}
    unlisted = {n: where for n, where in private.items() if n not in defined and n not in private_api.PRIVATE_NAMES}
    assert unlisted == {}
    # Names we override are "defined" by us too: they must still be listed.
    overridden = {"_compute_loss", "_prepare_dataset", "_set_signature_columns_if_needed", "_load_from_checkpoint"}
    assert overridden <= private_api.PRIVATE_NAMES


@pytest.mark.parametrize("name", private_api.BITSANDBYTES_ATTRIBUTES)
def test_bitsandbytes_switch_is_still_read_by_the_4bit_forward(name):
    import bitsandbytes as bnb

    assert hasattr(bnb.nn.Linear4bit(8, 8), name)
    assert f"self.{name}" in inspect.getsource(bnb.nn.Linear4bit.forward)
