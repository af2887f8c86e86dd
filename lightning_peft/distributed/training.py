"""What ``on_fit_start`` prepares once the strategy wrapped the model. Not a collective."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from lightning_peft.core.record import ensure_record
from lightning_peft.distributed.activation_checkpointing import enable_input_grads
from lightning_peft.distributed.ddp import _check_ddp_reentrant_sharing, _check_ddp_registration
from lightning_peft.distributed.strategies import _strategy_kind
from lightning_peft.ops.participation import start_training

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl


def prepare_training(module: nn.Module, trainer: pl.Trainer | None) -> None:
    """Called at ``on_fit_start``, after the strategy wrapped the model and the optimizers exist."""
    enable_input_grads(module)
    kind = _strategy_kind(trainer)
    if kind == "ddp":
        _check_ddp_registration(module, trainer)  # type: ignore[arg-type]
        _check_ddp_reentrant_sharing(module, trainer)  # type: ignore[arg-type]
    # FSDP1 leaves .grad None on ranks that hold no shard of a tensor; other strategies: unknown semantics
    ensure_record(module).check_grads = kind in ("single", "ddp", "model_parallel")
    start_training(module)  # base-dependent initial values, then watch the first forward (participation.py)
