"""Placeholder: Adapter is being implemented."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lightning_peft.methods.base import PEFTMethod
from lightning_peft.methods.registry import register_method


@register_method
@dataclass
class Adapter(PEFTMethod):
    """Not implemented yet."""

    method_name: ClassVar[str] = "adapter"

    def plan(self, model):  # type: ignore[no-untyped-def]
        raise NotImplementedError("Adapter is not implemented yet")
