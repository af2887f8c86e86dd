"""Strategy settings and guards: which strategy runs, its settings before it wraps the model, and
what cannot be attached or saved once a model is sharded. No function here is a collective."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_peft.core.quantized import quantization_of, quantized_modules

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl


def is_global_zero() -> bool:
    """Rank 0 of the default process group, or ``True`` outside ``torch.distributed``."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# -- strategies -----------------------------------------------------------------------------------------
def _strategy_kind(trainer: pl.Trainer | None) -> str:
    if trainer is None:
        return "none"
    from lightning.pytorch.strategies import (
        DDPStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

    strategy = trainer.strategy
    if isinstance(strategy, SingleDeviceStrategy):
        return "single"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp"
    if isinstance(strategy, ModelParallelStrategy):
        return "model_parallel"
    if isinstance(strategy, DDPStrategy):
        return "ddp"
    return "other"


def configure_strategy(trainer: pl.Trainer | None) -> None:
    """Adjust the strategy's settings before it wraps the model (call from ``setup``)."""
    kind = _strategy_kind(trainer)
    if kind == "model_parallel" and getattr(trainer.strategy, "_save_distributed_checkpoint", False):
        rank_zero_warn(
            "lightning-peft: ModelParallelStrategy(save_distributed_checkpoint=True) writes sharded checkpoints, "
            "which Lightning resumes only when they hold every tensor, so they keep the frozen weights too. "
            "Pass save_distributed_checkpoint=False for single-file, adapter-only checkpoints."
        )
    if kind != "fsdp":
        return
    kwargs: dict[str, Any] = trainer.strategy.kwargs  # type: ignore[union-attr]
    if kwargs.get("use_orig_params") is False:
        raise ValueError(
            "FSDPStrategy(use_orig_params=False) cannot train an adapter: FSDP1 then flattens frozen and "
            "trainable parameters of a unit into one FlatParameter, which must have a uniform requires_grad, "
            "and the optimizer would see flat parameters instead of the adapter's. Remove use_orig_params "
            "(Lightning's default is True) or pass use_orig_params=True."
        )
    kwargs["use_orig_params"] = True


def check_not_sharded(module: nn.Module) -> None:
    """Raise if ``module`` was already sharded (FSDP2 ``fully_shard``, tensor parallel or FSDP1)."""
    sharded = any(type(p).__name__ == "DTensor" for p in module.parameters())
    wrapped = any(type(m).__name__ == "FullyShardedDataParallel" for m in module.modules())
    if sharded or wrapped:
        raise RuntimeError(
            f"lightning-peft: cannot attach an adapter to this {type(module).__name__}: its parameters are "
            "already sharded. Adapter parameters created now would be per-rank tensors that FSDP does not "
            "manage, so ranks would silently train different adapters. Attach before sharding: build the "
            "layers in __init__ (PEFTCallback attaches in setup, before configure_model), or with PEFTMixin "
            "call self.apply_peft() in configure_model before fully_shard()."
        )


def check_quantized_sharding(module: nn.Module, trainer: pl.Trainer | None) -> None:
    """FSDP1/FSDP2 shard a bitsandbytes 4-bit base only when its packed weights are floating-point tensors."""
    if _strategy_kind(trainer) in ("fsdp", "model_parallel"):
        check_fsdp_quant_storage(module)


def check_saveable(module: nn.Module) -> None:
    """:func:`~lightning_peft.save_adapter` reads parameters directly; under FSDP1 they are flat shards."""
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in module.modules()):
        raise RuntimeError(
            "save_adapter cannot read an FSDPStrategy (FSDP1) model: each rank holds flat shards of the "
            "adapter. Save a checkpoint instead (trainer.save_checkpoint or ModelCheckpoint; it holds the full "
            "adapter tensors), then in one process: save_adapter(load_peft_checkpoint(MyModule, path), folder). "
            "Under ModelParallelStrategy (FSDP2), save_adapter works when every rank calls it."
        )


# -- FSDP and 4-bit bases ---------------------------------------------------------------------------------------------------
def check_fsdp_quant_storage(model: nn.Module) -> None:
    """FSDP shards a 4-bit base only when its packed weights are stored in a floating-point dtype
    (``bnb_4bit_quant_storage``): refuse integer storage and 8-bit layers before anything is sharded.

    Raises ``TypeError`` (not ``ValueError``, which PEFTCallback takes to mean "the layers are not built yet").
    """
    for name, module in quantized_modules(model):
        if quantization_of(module) == "8bit":
            raise TypeError(
                f"{name!r} is an 8-bit bitsandbytes layer ({type(module).__name__}), which FSDP cannot shard; "
                "load the base in 4-bit with a floating-point bnb_4bit_quant_storage instead"
            )
        storage = module.weight.dtype
        if not storage.is_floating_point:
            raise TypeError(
                f"FSDP cannot shard the 4-bit weight of {name!r}: it is stored as {storage}. Load the base with "
                "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage=torch.bfloat16) (the dtype of the "
                "model's other weights), so that FSDP shards and gathers the packed weights like any other "
                "floating-point parameter"
            )
