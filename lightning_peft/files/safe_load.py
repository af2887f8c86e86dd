"""Reading ``.ckpt`` files without unpickling: the allowlist and the refusal that every checkpoint reader uses
(:mod:`lightning_peft.files.reader`, ``PEFTMixin.load_from_checkpoint``, the CLI's ``--ckpt_path``).

``torch.load(weights_only=True)`` rebuilds only tensors, primitive containers and numbers, and the classes on
an allowlist; anything else in the file (a pickled function call, an arbitrary class) is refused *before* it
is built, so nothing named in the file is imported or run. A Lightning checkpoint written by lightning-peft
holds only such values: tensors, the optimizer's state, loop counters, callback state, the
``hyper_parameters`` the module saved (strings, numbers, lists) and the method configurations, which are
plain dictionaries rebuilt through the method registry (:func:`lightning_peft.methods.method_from_dict`).

The allowlist is :data:`SAFE_GLOBALS`: the registered method classes (a module that saves ``LoRA(...)`` as a
hyperparameter) and a few standard-library value types that Lightning or users commonly put in
``hyper_parameters``. Building any of them runs no code beyond setting fields (dataclass ``__post_init__``
validation for the methods). A checkpoint holding anything else is refused with :class:`UnsafeFileError`,
which names the object; load such a file only if you trust where it came from, yourself, with
``torch.load(..., weights_only=False)``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import pickle
from collections.abc import Iterator
from typing import Any

import torch

#: standard-library value types allowed in a checkpoint besides what ``weights_only=True`` allows anyway
SAFE_STDLIB_GLOBALS: list[Any] = [pathlib.PosixPath, pathlib.PurePosixPath]


class UnsafeFileError(ValueError):
    """A file was refused because reading it would unpickle an object that is not on the allowlist."""


def safe_globals() -> list[Any]:
    """The allowlist: registered method classes plus :data:`SAFE_STDLIB_GLOBALS`."""
    from lightning_peft.methods.registry import _REGISTRY

    return [*_REGISTRY.values(), *SAFE_STDLIB_GLOBALS]


def allowing_safe_globals() -> Any:
    """A context allowing :func:`safe_globals`. torch's context manager *removes* its globals on exit, so it
    is given only those not registered already (the method classes are, globally, by ``register_method``)."""
    present = torch.serialization.get_safe_globals()
    return torch.serialization.safe_globals([g for g in safe_globals() if g not in present])


def unsafe_error(path: str | os.PathLike | None, error: BaseException) -> UnsafeFileError:
    """The refusal message for a file that ``weights_only=True`` would not read."""
    detail = str(error).split("\n")
    culprit = next((line.strip() for line in detail if "Unsupported" in line or "GLOBAL" in line), detail[0])
    where = f"{os.fspath(path)}: " if path is not None else ""
    return UnsafeFileError(
        f"{where}refused: the file holds a pickled object that lightning-peft will not build ({culprit}). "
        "lightning-peft reads checkpoints with torch.load(weights_only=True) only, so a file cannot run code "
        "on load; load it with weights_only=False yourself only if you trust its origin (docs/security.md)"
    )


@contextlib.contextmanager
def refusing_pickles(path: Any) -> Iterator[None]:
    """Around a ``torch.load(weights_only=True)`` done by someone else (Lightning's ``load_from_checkpoint``):
    allow :func:`safe_globals` and turn a refusal into :class:`UnsafeFileError`."""
    try:
        with allowing_safe_globals():
            yield
    except pickle.UnpicklingError as error:
        raise unsafe_error(path if isinstance(path, (str, os.PathLike)) else None, error) from None
