"""Lightning glue shared by :class:`~lightning_peft.PEFTCallback` and :class:`~lightning_peft.PEFTMixin`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_peft.distributed import check_not_sharded, check_quantized_sharding
from lightning_peft.methods import PEFTMethod
from lightning_peft.model import ParameterCount, apply_peft, attached_methods, remove_peft
from lightning_peft.quantized import keep_adapter_unquantized

#: set on a module whose adapter was created by ``setup`` of a validate/test/predict run (not trained)
_FRESH = "_lightning_peft_fresh"


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
        keep_adapter_unquantized(module, getattr(trainer, "precision_plugin", None))
        return None
    check_not_sharded(module)
    check_quantized_sharding(module, trainer)
    counts = apply_peft(module, methods)
    keep_adapter_unquantized(module, getattr(trainer, "precision_plugin", None))  # BitsandbytesPrecision
    mark_fresh(module, trainer)
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


# -- adapters that were never trained ---------------------------------------------------------------------
def mark_fresh(module: nn.Module, trainer: pl.Trainer | None) -> None:
    """A validate/test/predict run attached a new adapter: unless a checkpoint is loaded before its loop
    starts, the run evaluates the adapter's initial values."""
    stage = trainer.state.fn if trainer is not None else None
    if stage in ("validate", "test", "predict"):  # TrainerFn is a str enum
        module.__dict__[_FRESH] = str(stage.value)  # type: ignore[union-attr]


def mark_loaded(module: nn.Module) -> None:
    module.__dict__.pop(_FRESH, None)


def warn_if_fresh(module: nn.Module) -> None:
    """Called when a validate/test/predict loop starts."""
    stage = module.__dict__.pop(_FRESH, None)
    if stage is None:
        return
    rank_zero_warn(
        f"lightning-peft: this {stage} run uses an adapter that was attached in its own setup and neither "
        "trained nor loaded, so it has its initial values (LoRA's B = 0, for example, leaves the base model "
        "unchanged). To evaluate trained weights, pass ckpt_path ('best', 'last' or a file), or load the "
        "module with load_peft_checkpoint/load_adapter first. After trainer.fit with strategy='ddp_spawn', "
        "the module in the main process never received the adapter: use the checkpoint."
    )


# -- state dicts of a module with its adapter -----------------------------------------------------------
def attach_for_state_dict(
    module: nn.Module, methods: list[PEFTMethod], state_dict: Mapping[str, Any]
) -> bool:
    """Attach ``methods`` to a module without an adapter when ``state_dict`` has keys that only the module
    with its adapter has (the weights ``ddp_spawn`` hands back to the main process, for example), so that
    ``load_state_dict`` loads them instead of dropping them. Rolled back if attaching does not explain any
    of those keys. Returns whether the adapter is now attached."""
    if attached_methods(module) is not None:
        return False
    unexpected = set(state_dict) - set(module.state_dict(keep_vars=True))
    if not unexpected:
        return False
    strict = getattr(module, "strict_loading", None)
    try:
        attach(module, methods)
    except ValueError:
        return False
    if len(set(state_dict) - set(module.state_dict(keep_vars=True))) < len(unexpected):
        return True
    remove_peft(module)
    if strict is not None:
        module.strict_loading = strict  # type: ignore[assignment]
    return False
