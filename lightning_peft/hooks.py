"""Lightning glue shared by :class:`~lightning_peft.PEFTCallback` and :class:`~lightning_peft.PEFTMixin`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_peft.distributed import check_not_sharded
from lightning_peft.methods import PEFTMethod
from lightning_peft.model import ParameterCount, apply_peft, attached_methods


def same_methods(a: Sequence[PEFTMethod], b: Sequence[PEFTMethod]) -> bool:
    return [m.to_dict() for m in a] == [m.to_dict() for m in b]


def attach(
    module: nn.Module, methods: list[PEFTMethod], trainer: pl.Trainer | None = None
) -> ParameterCount | None:
    """Attach ``methods`` to ``module`` once; later calls with the same configuration do nothing.

    Returns the parameter count when this call attached, ``None`` when the adapter was already there.
    """
    current = attached_methods(module)
    if current is not None:
        if not same_methods(current, methods):
            raise ValueError(
                f"{type(module).__name__} already has {[type(m).__name__ for m in current]} attached with a "
                f"different configuration than {methods!r}; attaching twice is not allowed"
            )
        if isinstance(module, pl.LightningModule):
            module.strict_loading = False  # attached by the user (e.g. in configure_model): same rule
        return None
    check_not_sharded(module)
    counts = apply_peft(module, methods)
    if isinstance(module, pl.LightningModule):
        # the checkpoints we write omit the frozen weights; the module's own hook checks the adapter's
        module.strict_loading = False
    report(methods, counts, trainer)
    return counts


def report(methods: Sequence[PEFTMethod], counts: ParameterCount, trainer: pl.Trainer | None) -> None:
    names = " + ".join(type(m).__name__ for m in methods)
    rank_zero_info(f"lightning-peft: {names} attached; {counts}")
    if trainer is None:
        return
    hparams: dict[str, Any] = {
        "peft/method": names,
        "peft/trainable_params": counts.trainable,
        "peft/total_params": counts.total,
        "peft/trainable_percent": round(counts.percent, 4),
    }
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)
