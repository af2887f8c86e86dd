"""The first-backward check that every adapter tensor received a gradient. Not a collective: each
rank checks its own gradients."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_peft.core.record import get_record
from lightning_peft.distributed.ddp import _ddp_handles_unused
from lightning_peft.distributed.strategies import _strategy_kind
from lightning_peft.ops.parameters import trainable_parameter_names
from lightning_peft.ops.participation import check_method_gradients
from lightning_peft.ops.state_dict import state_dict_key

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl


def check_gradients(module: nn.Module, trainer: pl.Trainer | None) -> None:
    """Called at ``on_after_backward``; checks once per fit that every adapter parameter received a gradient."""
    record = get_record(module)
    if record is None or not record.check_grads:
        return
    record.check_grads = False
    params = dict(module.named_parameters())
    missing = [n for n in trainable_parameter_names(module) if n in params and params[n].grad is None]
    if not missing:
        return
    check_method_gradients(module, missing)  # a method without any gradient is an error, not a warning
    owners = sorted({state_dict_key(n).rsplit(".", 1)[0] for n in missing})
    listed = ", ".join(owners[:10]) + (f" and {len(owners) - 10} more" if len(owners) > 10 else "")
    fix = f"exclude them from the method (e.g. exclude_modules={owners[:3]!r}) or make the forward pass use them"
    if _strategy_kind(trainer) == "ddp" and not _ddp_handles_unused(trainer):  # type: ignore[arg-type]
        raise RuntimeError(
            f"lightning-peft: {len(missing)} adapter tensors received no gradient in the first training step "
            f"(modules: {listed}); they are not on the path from the inputs to the loss. DDP with "
            "find_unused_parameters=False would wait for their gradients forever and crash at the next step, "
            f"after averaging only part of this step's gradients. Either {fix}, or let DDP skip them with "
            "Trainer(strategy='ddp_find_unused_parameters_true') / DDPStrategy(find_unused_parameters=True)."
        )
    if trainer is None or trainer.lightning_module.automatic_optimization:
        rank_zero_warn(
            f"lightning-peft: {len(missing)} adapter tensors received no gradient in the first training step "
            f"(modules: {listed}), so they will not train; {fix}."
        )
