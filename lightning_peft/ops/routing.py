"""Per-sample adapter routing: ``model(..., adapter_names=[...])`` picks an adapter (or none) for each sample."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_peft.core.record import (
    ensure_record,
    get_record,
)
from lightning_peft.methods.base import ADAPTER_ROUTING


def install_routing(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=[...])`` choose an adapter per sample (``"__base__"``: none). The hook
    handles live in the record, so removing the adapters removes them."""
    record = ensure_record(model)
    if record.handles:
        return
    record.handles = [
        model.register_forward_pre_hook(_RouteAdapters(model), with_kwargs=True),
        model.register_forward_hook(_EndRouting(), always_call=True),
    ]


class _RouteAdapters:
    """Pops ``adapter_names`` from the root's forward keywords; a picklable object, not a closure."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        names = kwargs.pop("adapter_names", None)
        if names is not None:
            record = get_record(self.model)
            known = list(record.adapters) if record is not None else []
            unknown = sorted({n for n in names if n != BASE_NAME and n not in known})
            if unknown:
                raise ValueError(
                    f"adapter_names names unknown adapters {unknown}; loaded adapters are {known}, and "
                    f"{BASE_NAME!r} means the base model"
                )
            ADAPTER_ROUTING.set(list(names))
        return args, kwargs


class _EndRouting:
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        ADAPTER_ROUTING.set(None)


#: the name that selects no adapter in ``adapter_names``
BASE_NAME = "__base__"
