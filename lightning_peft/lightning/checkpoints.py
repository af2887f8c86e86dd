"""Adapter-only Lightning checkpoints: keeping only the adapter's tensors when saving, attaching and checking
when loading, and ``load_peft_checkpoint``."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_peft.core.quantized import quantization_state_keys
from lightning_peft.core.record import DEFAULT_ADAPTER_NAME, get_record, is_attached
from lightning_peft.files.config_check import methods_from
from lightning_peft.files.load import state_from_file
from lightning_peft.files.names import METADATA_KEY
from lightning_peft.files.reader import PathLike, read_adapter
from lightning_peft.files.save import adapter_meta
from lightning_peft.files.tensor_checks import check_finite
from lightning_peft.methods.base import PEFTMethod
from lightning_peft.ops.attach import apply_peft, as_method_list
from lightning_peft.ops.parameters import trainable_parameter_names
from lightning_peft.ops.state_dict import (
    check_adapter_state,
    load_adapter_state,
    state_dict_key,
)


# -- Lightning checkpoints -----------------------------------------------------------------------------
def filter_checkpoint(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Keep only the adapter's tensors in ``checkpoint["state_dict"]`` and record the configuration."""
    if not is_attached(module) or "state_dict" not in checkpoint:
        return
    # FSDP1/activation-checkpoint wrappers add infixes to parameter names that state_dict keys do not have
    keep = {state_dict_key(n) for n in trainable_parameter_names(module)}
    if not any(_is_dtensor(v) for v in checkpoint["state_dict"].values()):
        # (a sharded ModelParallelStrategy checkpoint keeps every tensor: Lightning resumes those only whole)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
    record = get_record(module)
    trained = [m for name in (record.active if record else []) for m in record.adapters[name].methods]  # type: ignore[union-attr]
    checkpoint[METADATA_KEY] = adapter_meta(module, trained, strict=False)


def checkpoint_methods(checkpoint: dict[str, Any]) -> list[PEFTMethod] | None:
    info = checkpoint.get(METADATA_KEY)
    return None if info is None else methods_from(info, "checkpoint")


def prepare_checkpoint_load(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Called from ``on_load_checkpoint``: attach the adapter if needed, check the checkpoint's adapter
    tensors, and fill the frozen weights it omits from the module itself so that loading can be strict."""
    methods = checkpoint_methods(checkpoint)
    if methods is None or "state_dict" not in checkpoint:
        # a full checkpoint loads as usual; FSDP/ModelParallel strategies load (and pop) the weights themselves
        return
    state = checkpoint["state_dict"]
    trainer = getattr(module, "_trainer", None)
    if trainer is None or trainer.state.fn != "fit":
        # a file loaded for inference (load_from_checkpoint, validate/test/predict with ckpt_path); a fit that
        # resumes from its own checkpoint is not checked
        check_finite({k: v for k, v in state.items() if not _is_dtensor(v)}, "checkpoint")
    if not is_attached(module):
        apply_peft(module, methods, checkpoint[METADATA_KEY].get("adapter_name", DEFAULT_ADAPTER_NAME))
    check_adapter_state(module, state, "checkpoint")
    statistics = quantization_state_keys(module)  # bitsandbytes layers keep their own
    for key, value in module.state_dict().items():
        if key not in state and key not in statistics and not _is_dtensor(value):
            state[key] = value


def _is_dtensor(value: Any) -> bool:
    return type(value).__name__ == "DTensor"


M = TypeVar("M", bound=nn.Module)


def load_peft_checkpoint(
    module_class: type[M],
    checkpoint_path: PathLike,
    method: PEFTMethod | Sequence[PEFTMethod] | None = None,
    map_location: str | torch.device = "cpu",
    *,
    allow_nonfinite: bool = False,
    **init_kwargs: Any,
) -> M:
    """Turn an adapter-only ``.ckpt`` into a ready model in one call.

    The base weights come from ``module_class(**hyper_parameters, **init_kwargs)`` (the module's own
    ``__init__``, and ``configure_model`` if it defines one); the adapter and its configuration come from
    the file (or ``method``). The file is read without unpickling anything, and NaN/Inf adapter values are
    refused unless ``allow_nonfinite=True``. The model is returned in eval mode.
    """
    adapter = read_adapter(checkpoint_path, map_location=map_location)
    if not allow_nonfinite:
        check_finite(adapter.tensors, adapter.source)
    if adapter.key_format != "state_dict":
        raise ValueError(
            f"checkpoint_path={str(checkpoint_path)!r} is an adapter folder or file, not a Lightning checkpoint; "
            "build the model yourself and call load_adapter(model, path)"
        )
    kwargs = dict(adapter.hyper_parameters)
    kwargs.update(init_kwargs)
    signature = inspect.signature(module_class.__init__)
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in signature.parameters}
    model = module_class(**kwargs)
    configure = getattr(model, "configure_model", None)
    if callable(configure):
        configure()
    if method is not None:
        adapter.methods = as_method_list(method)
    if not is_attached(model):
        apply_peft(model, adapter.methods)
    load_adapter_state(model, state_from_file(model, adapter), adapter.source)
    return model.eval()
