"""conftest.py of the work directory `run_trl_dpo_tests.py` builds around TRL's own DPO tests.

It runs before TRL's test module is imported, so the module's `from trl import DPOConfig, DPOTrainer` and
`from datasets import load_dataset` pick up what is set here: with `TRL_DPO_TESTS_IMPL=ours`, this package's trainer
and config under TRL's names; in both runs, the local dataset stand-ins (`standins.py`).
"""

import importlib
import os
import re
from pathlib import Path

import standins
import trl


standins.patch_load_dataset()

# TRL's testing_utils (from a checkout that may be newer than the installed trl) imports availability checks for
# optional packages; one the installed trl lacks is a package it cannot use either, so it reads "not available".
_import_utils = importlib.import_module("trl.import_utils")
_utils = (Path(__file__).parent / "tests" / "testing_utils.py").read_text()
for _name in set(re.findall(r"\b(is_\w+_available)\b", _utils)):
    if not hasattr(_import_utils, _name):
        setattr(_import_utils, _name, lambda: False)

if os.environ.get("TRL_DPO_TESTS_IMPL") == "ours":
    import trl_dpo_ext

    trl.DPOTrainer = trl_dpo_ext.DPOTrainer
    trl.DPOConfig = trl_dpo_ext.DPOConfig
