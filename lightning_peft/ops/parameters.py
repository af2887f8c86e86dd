"""Which parameters an adapted model trains: the PEFT layers, the adapter's parameter names, ``requires_grad``,
and parameter counts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from lightning_peft.core.quantized import parameter_numel
from lightning_peft.core.record import (
    marked_parameter_names,
)
from lightning_peft.methods.base import PEFTLayer
from lightning_peft.ops.resolve import relative_names


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def peft_layers(model: nn.Module) -> Iterator[tuple[str, PEFTLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, PEFTLayer):
            yield name, module


@relative_names  # issue 20: also given a module inside the one PEFT was attached to
def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters the active adapter(s) own: what trains and what checkpoints hold, in
    ``model.named_parameters()`` order."""
    wanted = marked_parameter_names(model)
    for name, layer in peft_layers(model):
        if not layer.active:
            continue
        prefix = f"{name}." if name else ""
        wanted.update(prefix + local for local in layer.peft_parameter_names())
    return [n for n, _ in model.named_parameters(remove_duplicate=False) if n in wanted]


def count_parameters(model: nn.Module) -> ParameterCount:
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = parameter_numel(p)  # a packed 4-bit weight counts its values, not its bytes
        total += n
        if p.requires_grad:
            trainable += n
    return ParameterCount(trainable, total)


def refresh_requires_grad(model: nn.Module) -> None:
    """requires_grad=True for the adapter's parameters and False for every other one."""
    trainable = set(trainable_parameter_names(model))
    for name, param in model.named_parameters(remove_duplicate=False):
        param.requires_grad_(name in trainable)
