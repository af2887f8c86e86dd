"""The adapter's tensors as ``state_dict()`` names them: taking them out of a model, checking and loading them back."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_peft.ops.parameters import trainable_parameter_names
from lightning_peft.ops.resolve import relative_names

#: infixes that wrappers (FSDP1, activation checkpointing) add to ``named_parameters()`` names but that
#: ``state_dict()`` keys do not have
WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def state_dict_key(name: str) -> str:
    """A ``named_parameters()`` name as ``state_dict()`` keys (and checkpoints, adapter files) spell it."""
    for infix in WRAPPER_INFIXES:
        name = name.replace(infix, "")
    return name


@relative_names  # issue 20: also given a module inside the one PEFT was attached to
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed by their names in ``model.state_dict()``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {state_dict_key(name): params[name].detach() for name in trainable_parameter_names(model)}


def check_adapter_state(model: nn.Module, state: dict[str, Any], source: str) -> None:
    """Raise when ``state`` lacks an adapter tensor of ``model`` or holds one of the wrong shape."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in trainable_parameter_names(model):
        key = state_dict_key(name)  # ``state`` is keyed like state_dict(), without wrapper infixes
        if key not in state:
            raise ValueError(f"{source} has no tensor {key!r}, which the attached adapter needs")
        expected = tuple(params[name].shape)  # a DTensor (FSDP2) reports its global shape
        got = tuple(state[key].shape)
        if expected != got:
            raise ValueError(f"{source}: tensor {key!r} has shape {got} but the model expects {expected}")


def load_adapter_state(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter state"
) -> None:
    check_adapter_state(model, state, source)
    names = [state_dict_key(n) for n in trainable_parameter_names(model)]
    model.load_state_dict({n: state[n] for n in names}, strict=False)
