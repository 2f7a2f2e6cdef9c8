"""The trainer registry: built-ins, the PPO gap on current TRL, unknown names, and entry-point plugins."""

import importlib.util

import pytest
import trl

import trl_dpo_ext
from trl_dpo_ext import registry


def test_builtins():
    sft = registry.get_trainer("sft")
    assert (sft.trainer_cls, sft.config_cls) == (trl.SFTTrainer, trl.SFTConfig)
    dpo = registry.get_trainer("dpo")
    assert (dpo.trainer_cls, dpo.config_cls) == (trl_dpo_ext.DPOTrainer, trl_dpo_ext.DPOConfig)
    assert issubclass(dpo.trainer_cls, trl.DPOTrainer) and issubclass(dpo.config_cls, trl.DPOConfig)


@pytest.mark.skipif(importlib.util.find_spec("trl.experimental.ppo") is not None, reason="this TRL still has PPO")
def test_ppo_on_trl_without_ppo_says_so_and_points_to_dpo():
    with pytest.raises(registry.TrainerUnavailableError) as info:
        registry.get_trainer("ppo")
    message = str(info.value)
    assert "removed from TRL in 1.13" in message and trl.__version__ in message
    assert "get_trainer('dpo')" in message and "trl_dpo_ext.ppo_api" in message


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="Unknown trainer 'rlhf'. Known trainers: dpo, iterative_dpo, ppo, sft"):
        registry.get_trainer("rlhf")


class FakeEntryPoint:
    def __init__(self, name, target):
        self.name, self._target = name, target

    def load(self):
        return self._target


def test_entry_point_plugins(monkeypatch):
    spec = registry.TrainerSpec("kto", trl.KTOTrainer, trl.KTOConfig, "plugin")
    plugins = [
        FakeEntryPoint("kto", lambda: spec),
        FakeEntryPoint("sft", lambda: "shadowed"),
        FakeEntryPoint("bad", 3),
    ]
    monkeypatch.setattr(registry, "entry_points", lambda group: plugins if group == registry.ENTRY_POINT_GROUP else [])
    assert registry.available_trainers() == ["bad", "dpo", "iterative_dpo", "kto", "ppo", "sft"]
    assert registry.get_trainer("kto") is spec
    assert registry.get_trainer("sft").trainer_cls is trl.SFTTrainer  # built-ins win
    with pytest.raises(TypeError, match="Trainer 'bad' must resolve to a TrainerSpec, got int"):
        registry.get_trainer("bad")
