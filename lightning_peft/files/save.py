"""Writing adapter folders in HF PEFT's layout (``adapter_model.safetensors`` + ``adapter_config.json``), and the
metadata lightning-peft records with them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lightning_peft.core.base_model import (
    AmbiguousBaseModelError,
    base_prefix,
    config_value,
    name_or_path,
    relative_name,
    task_type_of,
)
from lightning_peft.core.base_model import base_model as find_base_model
from lightning_peft.core.quantized import standard_layout_everywhere
from lightning_peft.core.record import DEFAULT_ADAPTER_NAME, attached_methods, get_record, is_attached
from lightning_peft.distributed.strategies import check_saveable, is_global_zero
from lightning_peft.files import adapterhub
from lightning_peft.files.atomic import replace_folder
from lightning_peft.files.fingerprint import fingerprint_metadata
from lightning_peft.files.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FORMAT_VERSION, METADATA_KEY
from lightning_peft.files.peft_keys import to_file_keys
from lightning_peft.files.reader import PathLike
from lightning_peft.methods.base import PEFTLayer, PEFTMethod
from lightning_peft.ops.named_adapters import list_adapters, only_adapter
from lightning_peft.ops.parameters import peft_layers, trainable_parameter_names
from lightning_peft.ops.resolve import accepts_inner_model
from lightning_peft.ops.state_dict import (
    adapter_state_dict,
    state_dict_key,
)


def file_key_map(model: nn.Module) -> dict[str, str]:
    """Adapter tensor name in ``model`` → key in ``adapter_model.safetensors`` (HF PEFT naming)."""
    prefix = state_dict_key(base_prefix(model))
    layers = {name: module for name, module in model.named_modules() if isinstance(module, PEFTLayer)}
    mapping: dict[str, str] = {}
    for name in trainable_parameter_names(model):
        key = state_dict_key(name)  # the names files and adapter_state_dict use: no wrapper infixes
        rel = relative_name(key, prefix)
        owner = next((p for p in _prefixes(name) if p in layers), None)
        if owner is None:
            mapping[key] = f"base_model.model.{rel}"
            continue
        local = name[len(owner) + 1 :]
        clean_owner = state_dict_key(owner + ".")[:-1]
        path = relative_name(clean_owner, prefix)
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


def base_info(model: nn.Module) -> dict[str, Any]:
    """What a file records about the base model, so that a loader can rebuild it without guessing."""
    num_labels = (
        config_value(model, "num_labels") if task_type_of(find_base_model(model)) == "SEQ_CLS" else None
    )
    info = {
        "base_model_name_or_path": name_or_path(model),
        "task_type": task_type_of(find_base_model(model)),
        "num_labels": num_labels,
    }
    return {k: v for k, v in info.items() if v is not None}


def adapter_meta(model: nn.Module, methods: Sequence[PEFTMethod], strict: bool = True) -> dict[str, Any]:
    """lightning-peft's own metadata of an adapter, written to files and checkpoints. With ``strict=False``
    (checkpoints, whose tensors keep the module's own names) an ambiguous base model is recorded as unknown
    instead of raising; exporting such a checkpoint then asks which model is the base."""
    try:
        prefix: str | None = base_prefix(model)
        base = base_info(model)
    except AmbiguousBaseModelError:
        if strict:
            raise
        prefix, base = None, {}
    record = get_record(model)
    return {
        "format_version": FORMAT_VERSION,
        "adapter_name": record.active[0]
        if record is not None and len(record.active) == 1
        else DEFAULT_ADAPTER_NAME,
        "methods": [m.to_dict() for m in methods],
        "base_prefix": prefix,
        "base": base,
    }


def adapter_config_dict(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config.json, lightning-peft metadata). When HF PEFT has an equivalent configuration the JSON is
    exactly PEFT's (so PEFT loads the folder without warnings) and our metadata goes into the safetensors
    header; otherwise the JSON holds our metadata under ``"lightning_peft"``."""
    methods = [m.saved_config() for m in attached_methods(model) or []]
    meta = {**adapter_meta(model, methods), **fingerprint_metadata(model)}
    peft_config = methods[0].peft_config(model) if len(methods) == 1 else None
    if peft_config:
        meta["peft_config"] = peft_config  # what the JSON said when written: any later edit is detected
    return (peft_config if peft_config else {METADATA_KEY: meta}), meta


def adapter_file_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """File key -> tensor, as written to ``adapter_model.safetensors``.

    Collective under FSDP2 (it gathers sharded tensors): call it on every rank."""
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
        path = relative_name(name, prefix)
        replaced.update({layer.peft_key(path, local): tensor for local, tensor in saved.items()})
    tensors = {mapping[name]: _full(tensor) for name, tensor in state.items()}
    tensors.update({key: _full(tensor) for key, tensor in replaced.items()})
    return tensors


@accepts_inner_model  # issue 20: also given a module inside the one PEFT was attached to
def save_adapter(
    model: nn.Module, path: PathLike, adapter_name: str | None = None, format: str = "lightning_peft"
) -> Path:
    """Write adapters of ``model`` to the folder ``path`` in HF PEFT's layout: ``adapter_model.safetensors``
    holding only the adapter's tensors (and ``modules_to_save``), and ``adapter_config.json``. No pickle is
    involved. With ``adapter_name`` that adapter goes to ``path``; without, every loaded adapter is written,
    ``"default"`` (or the first) at ``path`` and each other one in the sub-folder ``path/<name>``.

    ``format="adapterhub"`` writes AdapterHub's layout instead (:mod:`lightning_peft.files.adapterhub`).

    Collective under FSDP2 (it gathers sharded tensors): call it on every rank; rank 0 writes."""
    if format not in ("lightning_peft", "adapterhub"):
        raise ValueError(f"save_adapter: format must be 'lightning_peft' or 'adapterhub', got {format!r}")
    if not is_attached(model):
        raise ValueError(f"save_adapter: no PEFT method is attached to this {type(model).__name__}")
    check_saveable(model)
    standard_layout_everywhere(model)  # 4-bit weights repacked for the CPU kernel go back first
    folder = Path(path)
    names = list_adapters(model)
    if adapter_name is not None:
        destinations = {adapter_name: folder}
    else:
        root = DEFAULT_ADAPTER_NAME if DEFAULT_ADAPTER_NAME in names else names[0]
        destinations = {root: folder, **{n: folder / n for n in names if n != root}}
    for name, destination in destinations.items():
        with only_adapter(model, name):
            if format == "adapterhub":
                adapterhub.save_folder(model, destination, name)
            else:
                _save_one(model, destination)
    return folder


def _save_one(model: nn.Module, folder: Path) -> None:
    tensors = adapter_file_tensors(model)
    if not is_global_zero():
        return  # every rank gathered (a collective under FSDP2); one writes
    config, meta = adapter_config_dict(model)
    tensors = to_file_keys(tensors, config)

    def write(tmp: Path) -> None:
        metadata = {"format": "pt", METADATA_KEY: json.dumps(meta)}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))

    replace_folder(folder, write)  # the folder is replaced as a unit: old or new, never torn
