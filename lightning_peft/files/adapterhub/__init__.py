"""AdapterHub's adapter folders (the ``adapters`` library, https://adapterhub.ml), read by
:func:`lightning_peft.load_adapter` and written by ``save_adapter(..., format="adapterhub")``.

A folder holds ``adapter_config.json`` (the architecture under ``"config"``, plus ``model_class``,
``model_type``, ``name``, ``hidden_size`` and ``version``) and ``pytorch_adapter.bin``, a ``torch.save``
pickle, read here only through lightning-peft's pickle-free loader (``torch.load(weights_only=True)``), or
``adapter.safetensors``. Which configurations map to which methods: :mod:`.config`; tensor names:
:mod:`.tensors`; the page docs/adapterhub.md.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lightning_peft.core.base_model import base_prefix
from lightning_peft.core.record import attached_methods
from lightning_peft.files.adapterhub.config import AdapterHubOptionError, methods_from_config
from lightning_peft.files.adapterhub.fusion import (
    FUSION_CONFIG,
    FUSION_WEIGHTS,
    fusion_files,
    fusion_from_files,
)
from lightning_peft.files.adapterhub.heads import HEAD_CONFIG, HEAD_WEIGHTS, head_modules
from lightning_peft.files.adapterhub.tensors import convert, model_state, sizes_of
from lightning_peft.files.atomic import replace_folder
from lightning_peft.methods.base import PEFTMethod
from lightning_peft.methods.fusion import AdapterFusion
from lightning_peft.ops.parameters import trainable_parameter_names
from lightning_peft.ops.state_dict import state_dict_key

__all__ = [
    "FUSION_CONFIG",
    "FUSION_WEIGHTS",
    "fusion_from_files",
    "HEAD_CONFIG",
    "HEAD_WEIGHTS",
    "AdapterHubOptionError",
    "is_adapterhub_config",
    "methods_and_tensors",
    "model_tensors",
    "weights_file",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES = ("adapter.safetensors", "pytorch_adapter.bin")


def is_adapterhub_config(config: Mapping[str, Any]) -> bool:
    """Whether an ``adapter_config.json`` is AdapterHub's: the architecture under ``"config"`` and the
    ``model_class``/``version`` keys that the ``adapters`` library writes."""
    version = str(config.get("version", ""))
    return isinstance(config.get("config"), (dict, str)) and (
        "model_class" in config or version.startswith("adapters")
    )


def weights_file(folder: Path) -> Path | None:
    """The folder's ``adapter.safetensors`` (preferred) or ``pytorch_adapter.bin``, if any."""
    return next((folder / n for n in WEIGHTS_FILES if (folder / n).is_file()), None)


def methods_and_tensors(
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    source: str,
    head: tuple[Mapping[str, Any], Mapping[str, torch.Tensor]] | None = None,
) -> tuple[list[PEFTMethod], dict[str, torch.Tensor]]:
    """The lightning-peft methods and tensors equivalent to an AdapterHub adapter (its ``adapter_config.json``
    and the tensors of its weights file, and ``head``: its ``head_config.json`` and head tensors, if any); raises :class:`AdapterHubOptionError` naming an unsupported option."""
    architecture = config["config"]
    if isinstance(architecture, str):
        raise AdapterHubOptionError(
            f"{source}: config={architecture!r} names a configuration instead of holding it"
        )
    name = str(config.get("name", ""))
    methods = methods_from_config(
        architecture, sizes_of(tensors, name, architecture), source, config.get("model_type")
    )
    converted = convert(tensors, name, architecture, methods, source)
    if head is not None:  # the folder's prediction head goes into the first method's modules_to_save
        modules, head_tensors = head_modules(head[0], head[1], source)
        methods[0] = dataclasses.replace(methods[0], modules_to_save=modules)
        converted.update(head_tensors)
    return methods, converted


def model_tensors(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """The converted tensors keyed by ``model``'s names for its active adapter's tensors."""
    names: Sequence[str] = [state_dict_key(n) for n in trainable_parameter_names(model)]
    return model_state(model, names, tensors, source)


def save_folder(model: nn.Module, folder: Path, name: str) -> None:
    """Write the active adapter ``name`` of ``model`` (inside ``only_adapter``) as an AdapterHub folder:
    ``adapter_config.json``, ``pytorch_adapter.bin`` (what AdapterHub reads by default; plain tensors) and
    ``adapter.safetensors``. Refused before writing when AdapterHub cannot express a method (:mod:`.save`)."""
    from lightning_peft.files.adapterhub.save import adapterhub_files, describe

    methods = attached_methods(model) or []
    if len(methods) == 1 and isinstance(methods[0], AdapterFusion):  # AdapterHub's fusion files
        fusion_config, fusion = fusion_files(model, methods[0], base_prefix(model), describe(model))

        def write_fusion(tmp: Path) -> None:
            torch.save(fusion, tmp / FUSION_WEIGHTS[1])
            save_file(fusion, str(tmp / FUSION_WEIGHTS[0]), metadata={"format": "pt"})
            (tmp / FUSION_CONFIG).write_text(json.dumps(fusion_config, indent=2, sort_keys=True))

        replace_folder(folder, write_fusion)
        return
    config, tensors, head = adapterhub_files(model, name)
    tensors = {k: v.clone() for k, v in tensors.items()}  # no shared storage (safetensors refuses it)

    def write(tmp: Path) -> None:
        torch.save(tensors, tmp / WEIGHTS_FILES[1])
        save_file(tensors, str(tmp / WEIGHTS_FILES[0]), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        if head is not None:  # the model's classifier, AdapterHub's static head
            torch.save(head[1], tmp / HEAD_WEIGHTS[1])
            save_file(head[1], str(tmp / HEAD_WEIGHTS[0]), metadata={"format": "pt"})
            (tmp / HEAD_CONFIG).write_text(json.dumps(head[0], indent=2, sort_keys=True))

    replace_folder(folder, write)
