"""Placeholder: PromptTuning is being implemented."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lightning_peft.methods.base import PEFTMethod
from lightning_peft.methods.registry import register_method


@register_method
@dataclass
class PromptTuning(PEFTMethod):
    """Not implemented yet."""

    method_name: ClassVar[str] = "prompt"

    def plan(self, model):  # type: ignore[no-untyped-def]
        raise NotImplementedError("PromptTuning is not implemented yet")
