"""Where this package keeps what it builds between runs (converted models, the tiny model, reference caches)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$TRL_DPO_EXT_CACHE`, else `~/.cache/trl_dpo_ext`: where built artifacts are kept between runs."""
    return Path(os.environ.get("TRL_DPO_EXT_CACHE", Path.home() / ".cache" / "trl_dpo_ext"))
