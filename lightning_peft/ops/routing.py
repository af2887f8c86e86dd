"""Per-sample adapter routing: ``model(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])``
pick an adapter (or none) for each sample; the mixed batch itself runs in :mod:`lightning_peft.ops.mixed_batch`."""

from __future__ import annotations

from torch import nn

from lightning_peft.core.record import ensure_record
from lightning_peft.ops.mixed_batch import BASE_NAME, routing_hooks

__all__ = ["BASE_NAME", "install_routing"]


def install_routing(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])`` choose an adapter per
    sample (``"__base__"``: none; see :mod:`lightning_peft.ops.mixed_batch`). The handles live in the record, so
    removing the adapters removes them."""
    record = ensure_record(model)
    if record.handles:
        return
    record.handles = routing_hooks(model)
