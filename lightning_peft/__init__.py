"""lightning-peft: parameter-efficient fine-tuning for PyTorch Lightning."""

from lightning_peft.adapters import (
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapters,
    list_adapters,
    set_adapter,
)
from lightning_peft.callback import PEFTCallback
from lightning_peft.combine_folders import combine_adapter_folders, combine_adapters
from lightning_peft.io import load_adapter, load_peft_checkpoint, save_adapter
from lightning_peft.lifecycle import PEFTLifecycle
from lightning_peft.methods import (
    IA3,
    Adapter,
    AdapterFusion,
    BitFit,
    DoRA,
    LoRA,
    PEFTLayer,
    PEFTMethod,
    PrefixTuning,
    PromptTuning,
    available_methods,
    register_method,
)
from lightning_peft.mixin import PEFTMixin
from lightning_peft.model import (
    adapter_state_dict,
    apply_peft,
    count_parameters,
    merge_adapter,
    merge_and_unload,
    remove_peft,
    trainable_parameter_names,
    unmerge_adapter,
)
from lightning_peft.version import __version__ as __version__

__all__ = [
    "IA3",
    "Adapter",
    "AdapterFusion",
    "BitFit",
    "DoRA",
    "LoRA",
    "PEFTCallback",
    "PEFTLayer",
    "PEFTLifecycle",
    "PEFTMethod",
    "PEFTMixin",
    "PrefixTuning",
    "PromptTuning",
    "active_adapters",
    "add_adapter",
    "adapter_state_dict",
    "apply_peft",
    "available_methods",
    "combine_adapter_folders",
    "combine_adapters",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "list_adapters",
    "load_adapter",
    "load_peft_checkpoint",
    "merge_adapter",
    "merge_and_unload",
    "register_method",
    "remove_peft",
    "save_adapter",
    "set_adapter",
    "trainable_parameter_names",
    "unmerge_adapter",
]
