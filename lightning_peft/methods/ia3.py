"""Placeholder: IA3 is being implemented."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lightning_peft.methods.base import PEFTMethod
from lightning_peft.methods.registry import register_method


@register_method
@dataclass
class IA3(PEFTMethod):
    """Not implemented yet."""

    method_name: ClassVar[str] = "ia3"

    def plan(self, model):  # type: ignore[no-untyped-def]
        raise NotImplementedError("IA3 is not implemented yet")
