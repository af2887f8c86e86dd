"""Every PEFT method, one module each.

A method registers itself with ``@register_method``; adding one is a new file plus its import line here.
"""

from lightning_peft.methods.adapter import Adapter
from lightning_peft.methods.base import PEFTLayer, PEFTMethod
from lightning_peft.methods.bitfit import BitFit
from lightning_peft.methods.dora import DoRA
from lightning_peft.methods.fusion import AdapterFusion
from lightning_peft.methods.ia3 import IA3
from lightning_peft.methods.lora import LoRA
from lightning_peft.methods.prefix import PrefixTuning
from lightning_peft.methods.prompt import PromptTuning
from lightning_peft.methods.registry import (
    available_methods,
    get_method_class,
    method_from_dict,
    register_method,
)

__all__ = [
    "Adapter",
    "AdapterFusion",
    "BitFit",
    "DoRA",
    "IA3",
    "LoRA",
    "PEFTLayer",
    "PEFTMethod",
    "PrefixTuning",
    "PromptTuning",
    "available_methods",
    "get_method_class",
    "method_from_dict",
    "register_method",
]
