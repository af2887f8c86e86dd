"""Adapter files (``adapter_model.safetensors`` + ``adapter_config.json``, HF PEFT's layout) and
adapter-only Lightning checkpoints."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_peft.distributed import check_saveable, is_global_zero
from lightning_peft.methods import PEFTLayer, PEFTMethod, method_from_dict
from lightning_peft.methods.registry import _REGISTRY
from lightning_peft.model import (
    adapter_state_dict,
    apply_peft,
    as_method_list,
    attached_methods,
    check_adapter_state,
    is_attached,
    load_adapter_state,
    peft_layers,
    remove_peft,
    state_dict_key,
    trainable_parameter_names,
)
from lightning_peft.quantized import quantization_state_keys

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: key under which adapter-only ``.ckpt`` files keep the method configurations
CHECKPOINT_KEY = "lightning_peft"
FORMAT_VERSION = 1

PathLike = str | os.PathLike


def base_prefix(model: nn.Module) -> str:
    """Prefix of the (outermost) transformers model inside ``model``: ``"model."`` for a LightningModule
    holding ``self.model``; ``""`` when ``model`` is itself the transformers model or a plain module."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return ""
    if isinstance(model, PreTrainedModel):
        return ""
    found = [n for n, m in model.named_modules() if n and isinstance(m, PreTrainedModel)]
    outer = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
    return outer[0] + "." if len(outer) == 1 else ""


def file_key_map(model: nn.Module) -> dict[str, str]:
    """Adapter tensor name in ``model`` → key in ``adapter_model.safetensors`` (HF PEFT naming)."""
    prefix = state_dict_key(base_prefix(model))
    layers = {name: module for name, module in model.named_modules() if isinstance(module, PEFTLayer)}
    mapping: dict[str, str] = {}
    for name in trainable_parameter_names(model):
        key = state_dict_key(name)  # the names files and adapter_state_dict use: no wrapper infixes
        rel = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        owner = next((p for p in _prefixes(name) if p in layers), None)
        if owner is None:
            mapping[key] = f"base_model.model.{rel}"
            continue
        local = name[len(owner) + 1 :]
        clean_owner = state_dict_key(owner + ".")[:-1]
        path = clean_owner[len(prefix) :] if prefix and clean_owner.startswith(prefix) else clean_owner
        mapping[key] = layers[owner].peft_key(path, local)
    return mapping


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # FSDP2 shards parameters as DTensors; files hold the whole tensor (a collective: call on every rank)
    full_tensor = getattr(tensor, "full_tensor", None)
    if callable(full_tensor):
        tensor = full_tensor()
    return tensor.detach().to("cpu").contiguous()


def adapter_config_dict(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config.json, lightning-peft metadata). When HF PEFT has an equivalent configuration the JSON is
    exactly PEFT's (so PEFT loads the folder without warnings) and our metadata goes into the safetensors
    header; otherwise the JSON holds our metadata under ``"lightning_peft"``."""
    methods = [m.saved_config() for m in attached_methods(model) or []]
    meta = {
        "format_version": FORMAT_VERSION,
        "methods": [m.to_dict() for m in methods],
        "base_prefix": base_prefix(model),
    }
    peft_config = methods[0].peft_config(model) if len(methods) == 1 else None
    return (peft_config if peft_config else {CHECKPOINT_KEY: meta}), meta


def adapter_file_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """File key -> tensor, as written to ``adapter_model.safetensors``."""
    state = adapter_state_dict(model)
    mapping = file_key_map(model)
    prefix = base_prefix(model)
    replaced: dict[str, torch.Tensor] = {}
    for name, layer in peft_layers(model):
        saved = layer.saved_tensors()
        if saved is None:
            continue
        # e.g. folded prefixes stand in for the reparameterisation MLP that produced them
        for local in layer.peft_parameter_names():
            state.pop(f"{name}.{local}" if name else local, None)
        path = name[len(prefix) :] if prefix and name.startswith(prefix) else name
        replaced.update({layer.peft_key(path, local): tensor for local, tensor in saved.items()})
    tensors = {mapping[name]: _full(tensor) for name, tensor in state.items()}
    tensors.update({key: _full(tensor) for key, tensor in replaced.items()})
    return tensors


def save_adapter(model: nn.Module, path: PathLike) -> Path:
    """Write the adapter of ``model`` to the folder ``path``: ``adapter_model.safetensors`` holding only the
    adapter's tensors (and ``modules_to_save``), and ``adapter_config.json``. No pickle is involved."""
    if not is_attached(model):
        raise ValueError(f"save_adapter: no PEFT method is attached to this {type(model).__name__}")
    check_saveable(model)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_file_tensors(model)
    if not is_global_zero():
        return folder  # every rank gathered (a collective under FSDP2); one writes
    config, meta = adapter_config_dict(model)
    save_file(
        tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt", CHECKPOINT_KEY: json.dumps(meta)}
    )
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def read_adapter_config(path: PathLike) -> list[PEFTMethod]:
    """The method configurations stored in an adapter folder (ours, or an HF PEFT one for known methods)."""
    config_file = Path(path) / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"path={str(path)!r} holds no {ADAPTER_CONFIG}")
    config = json.loads(config_file.read_text())
    if CHECKPOINT_KEY in config:
        return [method_from_dict(d) for d in config[CHECKPOINT_KEY]["methods"]]
    weights_file = Path(path) / ADAPTER_WEIGHTS
    if weights_file.is_file():
        with safe_open(str(weights_file), "pt") as f:
            meta = (f.metadata() or {}).get(CHECKPOINT_KEY)
        if meta:
            return [method_from_dict(d) for d in json.loads(meta)["methods"]]
    for cls in _REGISTRY.values():
        method = cls.from_peft_config(config)
        if method is not None:
            return [method]
    raise ValueError(
        f"{config_file}: peft_type={config.get('peft_type')!r} is not one lightning-peft can load; "
        f"known methods: {sorted(_REGISTRY)}"
    )


def load_adapter(model: nn.Module, path: PathLike) -> nn.Module:
    """Load an adapter folder written by :func:`save_adapter` (or by HF PEFT for LoRA/DoRA/IA3) onto ``model``.

    The adapter is attached first if ``model`` has none. Every tensor is checked against the model before
    anything is loaded; on a mismatch the error names the tensor and both shapes and the model is unchanged.
    """
    folder = Path(path)
    weights_file = folder / ADAPTER_WEIGHTS
    methods = read_adapter_config(folder)
    if not weights_file.is_file():
        raise FileNotFoundError(f"path={str(path)!r} holds no {ADAPTER_WEIGHTS}")
    tensors = load_file(str(weights_file))
    attached_here = not is_attached(model)
    if attached_here:
        apply_peft(model, methods)
    try:
        mapping = file_key_map(model)
        inverse = {file_key: name for name, file_key in mapping.items()}
        unexpected = sorted(set(tensors) - set(inverse))
        if unexpected:
            raise ValueError(
                f"{weights_file}: tensor {unexpected[0]!r} does not belong to the attached adapter "
                f"({len(unexpected)} unexpected tensors; expected keys like {sorted(inverse)[:3]})"
            )
        state = {inverse[k]: v for k, v in tensors.items()}
        missing = [mapping[n] for n in mapping if n not in state]
        if missing:
            raise ValueError(f"{weights_file}: tensor {missing[0]!r} is missing ({len(missing)} missing)")
        check_adapter_state(model, state, str(weights_file))
    except Exception:
        if attached_here:
            remove_peft(model)  # also restores the requires_grad flags
        raise
    load_adapter_state(model, state, str(weights_file))
    return model


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
    checkpoint[CHECKPOINT_KEY] = {
        "format_version": FORMAT_VERSION,
        "methods": [m.to_dict() for m in attached_methods(module) or []],
    }


def checkpoint_methods(checkpoint: dict[str, Any]) -> list[PEFTMethod] | None:
    info = checkpoint.get(CHECKPOINT_KEY)
    return None if info is None else [method_from_dict(d) for d in info["methods"]]


def prepare_checkpoint_load(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Called from ``on_load_checkpoint``: attach the adapter if needed, check the checkpoint's adapter
    tensors, and fill the frozen weights it omits from the module itself so that loading can be strict."""
    methods = checkpoint_methods(checkpoint)
    if methods is None or "state_dict" not in checkpoint:
        # a full checkpoint loads as usual; FSDP/ModelParallel strategies load (and pop) the weights themselves
        return
    if not is_attached(module):
        apply_peft(module, methods)
    state = checkpoint["state_dict"]
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
    **init_kwargs: Any,
) -> M:
    """Turn an adapter-only ``.ckpt`` into a ready model in one call.

    The base weights come from ``module_class(**hyper_parameters, **init_kwargs)`` (the module's own
    ``__init__``, and ``configure_model`` if it defines one); the adapter and its configuration come from
    the file (or ``method``). The model is returned in eval mode.
    """
    checkpoint = torch.load(str(checkpoint_path), map_location=map_location, weights_only=False)
    kwargs = dict(checkpoint.get("hyper_parameters") or {})
    kwargs.update(init_kwargs)
    signature = inspect.signature(module_class.__init__)
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in signature.parameters}
    model = module_class(**kwargs)
    configure = getattr(model, "configure_model", None)
    if callable(configure):
        configure()
    methods = as_method_list(method) if method is not None else checkpoint_methods(checkpoint)
    if methods is None:
        raise ValueError(f"checkpoint_path={str(checkpoint_path)!r} is not a lightning-peft checkpoint")
    if not is_attached(model):
        apply_peft(model, methods)
    load_adapter_state(model, checkpoint["state_dict"], str(checkpoint_path))
    return model.eval()
