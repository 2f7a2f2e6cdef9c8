"""Start-up noise that a user cannot act on, filtered out by the command line and the recipe (not on import).

Each filter matches one known message, with the reason it is harmless; every other warning and log record passes.
"""

import logging
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def silence_known_noise() -> None:
    """Install the filters; call before bitsandbytes, transformers or TRL are imported. Calling twice is harmless."""
    bnb_cpu = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessages) for f in bnb_cpu.filters):
        # On CPUs with AVX512-BF16, bitsandbytes tries the optional `kernels` package for a faster CPU 4-bit matmul
        # and logs a warning when it is not installed; it then uses its own CPU kernel, which is what this package is
        # tested with. Nothing fails and nothing in our settings changes it.
        bnb_cpu.addFilter(_DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community"))
    # TRL 1.16's DPOConfig declares `gradient_checkpointing` (a deprecated alias in transformers 5) and TRL, peft and
    # transformers read `is_gradient_checkpointing` themselves: the warnings fire whatever the user sets, and the
    # flag still works (it mirrors `activation_checkpointing`).
    warnings.filterwarnings("ignore", r"`gradient_checkpointing` is deprecated", FutureWarning)
    warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning)
