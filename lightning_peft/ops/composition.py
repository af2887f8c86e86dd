"""Composition blocks over named adapters, beside per-sample routing (``model(..., adapter_names=[...])``):

* ``Stack("a", "b")``: in every output block the adapters run one after the other, each reading the previous
  one's output as the sub-layer output: ``x_0 = h``, ``x_i = A_i(z_i) + ρ_i`` with ``(z_i, ρ_i)`` adapter ``i``'s
  input and residual computed from ``x_{i-1}`` (e.g. ``z_i = LN(x_{i-1} + r)``, ``ρ_i = x_{i-1}`` for Pfeiffer's
  layout), then ``LN(x_n + r)`` (AdapterHub's Stack). Activated with :func:`set_composition`; for block-layout bottleneck adapters (``Adapter`` with
  ``original_ln_before``, ``scaling``, ... : lightning_peft/methods/adapter_block.py), in the order they were added.
* ``Parallel("a", "b")``: several adapters on one batch, one output each: :func:`parallel_forward` repeats the
  batch once per adapter and routes each copy through its adapter, returning the outputs concatenated along the
  batch (copy ``i`` = adapter ``i``), as AdapterHub's Parallel does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_peft.methods.adapter import Adapter
from lightning_peft.methods.adapter_block import BlockAdapterLayer
from lightning_peft.ops.named_adapters import _check_names, _record
from lightning_peft.ops.parameters import peft_layers, refresh_requires_grad


class Stack:
    """Adapters applied one after the other in each layer: ``Stack("a", "b")`` (b reads a's output)."""

    def __init__(self, *names: str) -> None:
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"Stack needs at least two different adapter names, got {names!r}")
        self.names = list(names)

    def __repr__(self) -> str:
        return f"Stack({', '.join(map(repr, self.names))})"


class Parallel:
    """Several adapters on one batch, one output each: ``Parallel("a", "b")`` with :func:`parallel_forward`."""

    def __init__(self, *names: str) -> None:
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"Parallel needs at least two different adapter names, got {names!r}")
        self.names = list(names)

    def __repr__(self) -> str:
        return f"Parallel({', '.join(map(repr, self.names))})"


def set_composition(model: nn.Module, block: Stack) -> None:
    """Make the adapters of ``block`` active together, composed as it says (see the module docstring)."""
    if not isinstance(block, Stack):
        raise TypeError(
            f"set_composition takes a Stack (Parallel runs through parallel_forward), got {block!r}"
        )
    record = _record(model)
    _check_names(record, block.names, "Stack")
    for name in block.names:
        methods = record.adapters[name].methods
        if not all(isinstance(m, Adapter) and m.layout is not None for m in methods):
            raise ValueError(
                f"{block!r}: adapter {name!r} ({[type(m).__name__ for m in methods]}) is not a block-layout bottleneck "
                "Adapter (e.g. Adapter(original_ln_before=True), AdapterHub's seq_bn); only those can be stacked"
            )
    order = [n for n in record.adapters if n in block.names]
    if order != block.names:
        raise ValueError(
            f"{block!r}: the adapters run in the order they were added, {order}; use Stack{tuple(order)}"
        )
    for _, layer in peft_layers(model):
        layer.active = layer.adapter_name in block.names
        if layer.active and not isinstance(layer, BlockAdapterLayer):
            raise ValueError(f"{block!r}: {type(layer).__name__} of {layer.adapter_name!r} cannot be stacked")
    record.active = list(block.names)
    refresh_requires_grad(model)


def parallel_forward(model: nn.Module, block: Parallel, **inputs: Any) -> Any:
    """``model(**inputs)`` once per adapter of ``block`` in one batch: tensors are repeated along the batch
    (B -> N·B) and copy ``i`` runs through adapter ``block.names[i]`` only."""
    record = _record(model)
    _check_names(record, block.names, "Parallel")
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    if not tensors:
        raise ValueError("parallel_forward needs the batch as tensor keyword arguments (input_ids=...)")
    batch = tensors[0].shape[0]
    repeated = {k: v.repeat(len(block.names), *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) else v
                for k, v in inputs.items()}  # fmt: skip
    routing = [name for name in block.names for _ in range(batch)]  # (N·B,)
    return model(**repeated, adapter_names=routing)
