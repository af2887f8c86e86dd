"""DDP checks run at ``on_fit_start``, after DDP wrapped the model. No function here is a collective."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from lightning_peft.distributed.activation_checkpointing import _reentrant_checkpointing
from lightning_peft.ops.parameters import peft_layers

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl


def _ddp_handles_unused(trainer: pl.Trainer) -> bool:
    kwargs: dict[str, Any] = getattr(trainer.strategy, "_ddp_kwargs", {}) or {}
    return bool(kwargs.get("find_unused_parameters") or kwargs.get("static_graph"))


def _check_ddp_registration(module: nn.Module, trainer: pl.Trainer) -> None:
    from torch.nn.parallel import DistributedDataParallel

    ddp = trainer.strategy.model
    if not isinstance(ddp, DistributedDataParallel):
        return
    try:
        registered = int(ddp._get_ddp_logging_data()["num_parameter_tensors"])
    except (AttributeError, KeyError, RuntimeError, ValueError):  # pragma: no cover - private API moved
        return
    # DDP's reducer holds the parameters that required grad when DDP was built: if the adapter was attached
    # later, its gradients are never averaged and every rank trains a different adapter
    trainable = len({id(p) for p in module.parameters() if p.requires_grad})
    if registered != trainable:
        raise RuntimeError(
            f"lightning-peft: DDP registered {registered} parameter tensors but the adapter trains {trainable}: "
            "the model was wrapped before the adapter was attached, so the adapter's gradients would not be "
            "averaged across processes. Attach in setup or configure_model (PEFTCallback and PEFTMixin do "
            "this when the target layers exist by then)."
        )


def _check_ddp_reentrant_sharing(module: nn.Module, trainer: pl.Trainer) -> None:
    # Reentrant checkpointing back-propagates every checkpointed layer in a backward call of its own, so a
    # parameter that several layers use (prefix tuning's prefix) receives its gradient in pieces; DDP all-reduces
    # the first piece and the ranks drift apart, silently. DDP's static_graph copes with it.
    ddp = trainer.strategy.model
    if getattr(ddp, "static_graph", True) or not _reentrant_checkpointing(module):
        return
    shared = sorted({type(layer).__name__ for _, layer in peft_layers(module) if layer.shared_across_layers})
    if shared:
        raise RuntimeError(
            f"lightning-peft: {', '.join(shared)} under DDP with reentrant gradient checkpointing "
            "(use_reentrant=True): every checkpointed layer back-propagates into the shared prefix parameters "
            "separately, and DDP would average only part of their gradient, so the processes would train "
            "different prefixes. Use non-reentrant checkpointing, activation_checkpointing_enable("
            "activation_checkpointing_kwargs={'use_reentrant': False}) (transformers 5's default), or "
            "Trainer(strategy=DDPStrategy(static_graph=True))."
        )
