"""The guard for Lightning's ``BitsandbytesPrecision`` plugin: the adapter's own linear layers stay unquantized."""

from __future__ import annotations

from typing import Any

from torch import nn


def keep_adapter_unquantized(model: nn.Module, plugin: Any) -> list[str]:
    """Lightning's ``BitsandbytesPrecision`` replaces every ``nn.Linear`` when the strategy sets up, after the
    adapter is attached: exclude the linear layers that hold trainable parameters (bottleneck adapters, prefix
    projections, ``modules_to_save`` heads, BitFit's layers) through its ``ignore_modules``, so that only frozen
    base layers are quantized and the adapter trains in full precision. Returns the names excluded."""
    if type(plugin).__name__ != "BitsandbytesPrecision":
        return []
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    plugin.ignore_modules = set(plugin.ignore_modules) | set(names)
    return names
