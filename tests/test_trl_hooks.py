"""Fails loudly when the installed TRL no longer has a private hook this package overrides or calls."""

import inspect

import pytest
import trl

from trl_dpo_ext.trainer import TRL_HOOKS


@pytest.mark.parametrize("hook", sorted(TRL_HOOKS))
def test_hook_exists_with_the_expected_parameters(hook):
    assert hasattr(trl.DPOTrainer, hook), f"trl {trl.__version__} has no DPOTrainer.{hook}: update trl_dpo_ext.trainer"
    params = tuple(inspect.signature(getattr(trl.DPOTrainer, hook)).parameters)
    assert params == TRL_HOOKS[hook], f"trl {trl.__version__} changed DPOTrainer.{hook}{params}"


def test_compute_loss_still_routes_through_the_hook():
    assert "self._compute_loss(" in inspect.getsource(trl.DPOTrainer.compute_loss)


def test_helpers_we_call_exist():
    from trl.models.utils import disable_gradient_checkpointing  # noqa: F401
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head, use_adapter  # noqa: F401

    assert "torch_call" in vars(DataCollatorForPreference)
    for name in ("_metrics", "_total_train_tokens", "_tp_size", "_is_vision_dataset", "loss_types", "loss_weights"):
        assert f"self.{name} =" in inspect.getsource(trl.DPOTrainer.__init__), name
