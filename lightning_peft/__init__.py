"""lightning-peft: parameter-efficient fine-tuning for PyTorch Lightning."""

from lightning_peft.combine.folders import combine_adapter_folders, combine_adapters
from lightning_peft.files.load import load_adapter
from lightning_peft.files.save import save_adapter
from lightning_peft.lightning.callback import PEFTCallback
from lightning_peft.lightning.checkpoints import load_peft_checkpoint
from lightning_peft.lightning.lifecycle import PEFTLifecycle
from lightning_peft.lightning.mixin import PEFTMixin
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
from lightning_peft.ops.attach import apply_peft, remove_peft
from lightning_peft.ops.merging import merge_adapter, merge_and_unload, unmerge_adapter
from lightning_peft.ops.named_adapters import (
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapters,
    list_adapters,
    set_adapter,
)
from lightning_peft.ops.parameters import count_parameters, trainable_parameter_names
from lightning_peft.ops.state_dict import adapter_state_dict
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
