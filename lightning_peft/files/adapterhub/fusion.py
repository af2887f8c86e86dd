"""AdapterHub's AdapterFusion folders (``adapter_fusion_config.json`` + ``pytorch_model_adapter_fusion.bin``)
as :class:`~lightning_peft.AdapterFusion`, and back.

The configuration's options map one to one (``query``, ``key``, ``value``, ``value_before_softmax``,
``residual_before``, ``query_before_ln``); ``temperature=True`` (a softmax temperature annealed from 50 during
training) is refused; ``regularization``, ``value_initialized`` and ``dropout_prob`` act only in training or at
initialisation. Tensor names: ``<block>.adapter_fusion_layer.<a,b,...>.{query,key,value}.{weight,bias}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_peft.files.adapterhub.config import AdapterHubOptionError
from lightning_peft.files.adapterhub.tensors import clean_name, relative
from lightning_peft.methods.fusion import AdapterFusion, FusionLayer

FUSION_CONFIG = "adapter_fusion_config.json"
FUSION_WEIGHTS = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")
OPTIONS = ("query", "key", "value", "value_before_softmax", "residual_before", "query_before_ln")
VERSION = "adapters.1.3.0"


def fusion_from_files(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: str
) -> tuple[AdapterFusion, dict[str, torch.Tensor]]:
    """The AdapterFusion method and its tensors (keyed by block path) of an AdapterHub fusion folder."""
    options = config.get("config") or {}
    if options.get("temperature"):
        raise AdapterHubOptionError(
            f"{source}: AdapterHub option temperature=True is not supported: its softmax temperature is annealed "
            "step by step during training, which lightning-peft does not reproduce"
        )
    names = [str(n) for n in config.get("adapter_names") or []]
    method = AdapterFusion(adapters=names, **{k: bool(options[k]) for k in OPTIONS if k in options})
    fused = re.escape(",".join(names))
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(rf"(.*)\.adapter_fusion_layer\.{fused}\.(query|key|value)\.(weight|bias)", key)
        if match is None:
            raise ValueError(
                f"{source}: tensor {key!r} is not one lightning-peft reads from AdapterHub's fusion files"
            )
        path, part, param = match.groups()
        out[f"{relative(path)}.{part}.{param}"] = tensor
    return method, out


def fusion_files(
    model: nn.Module, method: AdapterFusion, prefix: str, description: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(``adapter_fusion_config.json``, the fusion tensors) of ``model``'s attached fusion ``method``."""
    fused = ",".join(method.adapters)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, FusionLayer):
            path = clean_name(name[len(prefix) :] if prefix and name.startswith(prefix) else name)
            for local, param in module.named_parameters():
                if not local.startswith("base_layer."):
                    tensors[f"{path}.adapter_fusion_layer.{fused}.{local}"] = param.detach().to("cpu").clone()
    options = {k: getattr(method, k) for k in OPTIONS}
    options.update(
        temperature=False, regularization=False, value_initialized=True, dropout_prob=method.dropout
    )
    config = {**description, "adapter_names": list(method.adapters), "config": options, "name": fused}
    return config, tensors
