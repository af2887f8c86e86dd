"""Keep the console for what a user acts on: silence known noise from the libraries underneath.

Used by the ``lightning-peft`` commands and the examples (never on ``import lightning_peft``, so a user's own
program keeps every message it had). What is silenced, and only that:

* transformers' weight-loading progress bar and its load report (``classifier.weight | MISSING``), while
  loading a base model whose new task head is expected to be missing (:func:`quiet_model_loading`);
* Lightning's "💡 Tip: ... litlogger" advertisement, printed at every ``Trainer`` creation;
* the ``FutureWarning`` that torch raises inside Lightning's own ``_pytree`` helper
  (``isinstance(treespec, LeafSpec)`` is deprecated): Lightning's code, nothing a user can act on;
* on a CPU with AVX512-BF16, offline: bitsandbytes' "Failed to load CPU gemm_4bit_forward from
  kernels-community" and the ``kernels`` package's "Skipping publisher trust check", printed when bitsandbytes
  is imported. That kernel only serves bitsandbytes' packed inference layout, which lightning-peft switches off
  while an adapter is attached (``docs/methods/qlora.md``).

Everything else stays: Lightning's progress bar, model summary and "GPU available" lines, lightning-peft's
trainable-parameter line, and every warning about the user's own configuration.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

#: the loggers through which Lightning's rank_zero_info may print (it rebinds one of them at import)
_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)
_PYTREE_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class _DropAdvertisement(logging.Filter):
    """Drops Lightning's litlogger tip; lets every other record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


_FILTER = _DropAdvertisement()


class _DropMessages(logging.Filter):
    """Drops records whose message contains one of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in str(record.msg) for f in self.fragments)


#: logger name -> the filter of its known noise
_LIBRARY_FILTERS = {
    "bitsandbytes.backends.cpu.ops": _DropMessages("Failed to load CPU gemm_4bit_forward"),
    "kernels._internals.hf_hub": _DropMessages("Skipping publisher trust check"),
}


def silence_known_noise() -> None:
    """Silence Lightning's litlogger tip, its internal ``_pytree`` deprecation warning and bitsandbytes' offline
    kernel messages (idempotent)."""
    filters = {**dict.fromkeys(_RANK_ZERO_LOGGERS, _FILTER), **_LIBRARY_FILTERS}
    for name, drop in filters.items():
        logger = logging.getLogger(name)
        if drop not in logger.filters:
            logger.addFilter(drop)
    warnings.filterwarnings("ignore", message=_PYTREE_WARNING, category=FutureWarning)


@contextlib.contextmanager
def quiet_model_loading() -> Iterator[None]:
    """Inside: transformers prints neither its "Loading weights" bar nor its load report (errors still show).

    For loading a base model with a new, deliberately untrained head (or one an adapter will bring)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
