"""Trainer registry: names → (trainer class, config class), DPO beside TRL's SFT and PPO.

The built-in table below is explicit. Other packages add trainers through the entry-point group
`trl_dpo_ext.trainers`; each entry point names a zero-argument callable that returns a [`TrainerSpec`]:

```toml
[project.entry-points."trl_dpo_ext.trainers"]
kto = "my_package.registry:kto_spec"
```
"""

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points


ENTRY_POINT_GROUP = "trl_dpo_ext.trainers"


@dataclass(frozen=True)
class TrainerSpec:
    """A trainer and the config dataclass it takes (the pair a `TrlParser` script needs)."""

    name: str
    trainer_cls: type
    config_cls: type
    description: str = ""


class TrainerUnavailableError(LookupError):
    """A registered trainer that the installed packages cannot provide."""


def _sft() -> TrainerSpec:
    from trl import SFTConfig, SFTTrainer

    return TrainerSpec("sft", SFTTrainer, SFTConfig, "TRL's supervised fine-tuning trainer.")


def _dpo() -> TrainerSpec:
    from .config import DPOConfig
    from .trainer import DPOTrainer

    return TrainerSpec("dpo", DPOTrainer, DPOConfig, "trl_dpo_ext's DPO trainer (shared 4-bit base).")


def _iterative_dpo() -> TrainerSpec:
    from .iterative import IterativeDPOConfig, IterativeDPOTrainer

    return TrainerSpec(
        "iterative_dpo", IterativeDPOTrainer, IterativeDPOConfig, "On-policy DPO rounds, shared 4-bit base."
    )


def _ppo() -> TrainerSpec:
    import trl

    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError as error:
        raise TrainerUnavailableError(
            f"'ppo' is not available: PPO was removed from TRL in 1.13 and the installed trl is {trl.__version__}. "
            "Train with DPO instead: get_trainer('dpo'), or keep an existing PPO script and change its import to "
            "`from trl_dpo_ext.ppo_api import PPOConfig, PPOTrainer`, which runs DPO on pairs ranked by your "
            "reward model."
        ) from error
    return TrainerSpec("ppo", PPOTrainer, PPOConfig, "TRL's PPO trainer (trl.experimental.ppo, TRL <= 1.12).")


# The built-in trainers. Loaders are called on lookup, so importing the registry imports no trainer.
BUILTIN: dict[str, Callable[[], TrainerSpec]] = {
    "sft": _sft,
    "dpo": _dpo,
    "iterative_dpo": _iterative_dpo,
    "ppo": _ppo,
}


def _plugins() -> dict[str, Callable[[], TrainerSpec]]:
    return {ep.name: ep.load for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_trainers() -> list[str]:
    """Names of the built-in and plugin trainers (a listed name may still be unavailable, like 'ppo' on TRL ≥ 1.13)."""
    return sorted({**_plugins(), **BUILTIN})


def get_trainer(name: str) -> TrainerSpec:
    """
    Look up a trainer by name. Built-in names win over plugins of the same name.

    Raises:
        KeyError: `name` is unknown; the message lists the known names.
        TrainerUnavailableError: `name` is known but the installed packages cannot provide it.
    """
    loaders = {**_plugins(), **BUILTIN}
    if name not in loaders:
        raise KeyError(f"Unknown trainer {name!r}. Known trainers: {', '.join(sorted(loaders))}.")
    spec = loaders[name]()
    if callable(spec) and not isinstance(spec, TrainerSpec):  # an entry point naming a function
        spec = spec()
    if not isinstance(spec, TrainerSpec):
        raise TypeError(f"Trainer {name!r} must resolve to a TrainerSpec, got {type(spec).__name__}.")
    return spec
