"""lightning-peft adapters as AdapterHub folders: ``save_adapter(model, path, format="adapterhub")``.

The inverse of :mod:`.config` and :mod:`.tensors`: each method becomes the AdapterHub configuration that computes
the same function (a ``union`` for several), each tensor AdapterHub's name. What AdapterHub cannot express is
refused before anything is written, naming the argument: a Houlsby adapter that trains the LayerNorms
(``train_layernorms=True``), (IA)^3 scaling the input of feed-forward layers, a prefix whose real tokens are
shifted (``shift_positions=True``, HF PEFT's layout), LoRA with rsLoRA/rank patterns/bias, ``modules_to_save``.
Call it inside ``only_adapter(model, name)``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from lightning_peft.core.base_model import base_model, base_prefix, model_type_of, name_or_path
from lightning_peft.core.record import attached_methods
from lightning_peft.files.adapterhub.config import ACTIVATIONS, ATTN_MATRICES, MODEL_TYPES
from lightning_peft.files.adapterhub.tensors import clean_name
from lightning_peft.methods.adapter import Adapter
from lightning_peft.methods.adapter_block import BlockAdapterLayer
from lightning_peft.methods.base import PEFTMethod
from lightning_peft.methods.ia3 import IA3, IA3Layer
from lightning_peft.methods.lora import LoRA
from lightning_peft.methods.prefix import PrefixTuning
from lightning_peft.methods.prefix.layers import PrefixLayer
from lightning_peft.ops.parameters import peft_layers

VERSION = "adapters.1.3.0"
#: lightning-peft activation -> AdapterHub non_linearity
NON_LINEARITY = {ours: theirs for theirs, ours in reversed(ACTIVATIONS.items())}
LAYER = re.compile(r"(?:.*\.)?layer\.(\d+)\.(.+)")
#: BERT module (after ``layer.N.``) -> AdapterHub LoRA location
LORA_PLACES = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
}


def refuse(method: PEFTMethod, argument: str, value: Any, why: str) -> ValueError:
    return ValueError(
        f"save_adapter(format='adapterhub'): {type(method).__name__}({argument}={value!r}) has no AdapterHub "
        f"counterpart: {why}"
    )


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The adapter's layers, named like AdapterHub's keys (relative to the transformers model, no wrappers)."""
    prefix = base_prefix(model)
    return [
        (clean_name(n[len(prefix) :] if prefix and n.startswith(prefix) else n), m)
        for n, m in peft_layers(model)
    ]


def _index(path: str) -> tuple[int, str]:
    match = LAYER.fullmatch(path)
    if match is None:
        raise ValueError(f"save_adapter(format='adapterhub'): {path!r} is not in a numbered BERT layer")
    return int(match.group(1)), match.group(2)


def _leave_out(used: set[int], layers: int) -> list[int]:
    return [i for i in range(layers) if i not in used]


Head = tuple[dict[str, Any], dict[str, torch.Tensor]]


def adapterhub_files(
    model: nn.Module, name: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Head | None]:
    """(``adapter_config.json``, tensors of ``pytorch_adapter.bin``, the head: ``head_config.json`` and its
    tensors, or ``None``) for the adapter ``name`` of ``model``. ``modules_to_save=["classifier"]`` is written as
    AdapterHub's static head (the model's own classifier); other modules_to_save are refused."""
    methods = attached_methods(model) or []
    model_type = model_type_of(model)
    if model_type not in MODEL_TYPES:  # AdapterHub's key names are mapped for these families only
        raise ValueError(
            f"save_adapter(format='adapterhub'): the model is a {type(model).__name__} "
            f"(model_type={model_type!r}); AdapterHub's layout is written for model types {list(MODEL_TYPES)}"
        )
    base = base_model(model)
    layers = int(getattr(base.config, "num_hidden_layers", 0))
    configs: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    named = _layers(model)
    head: Head | None = None
    for method in methods:
        if method.modules_to_save:
            head = _static_head(model, method, name)
        if isinstance(method, Adapter):
            config, found = _bottleneck(method, named, name, layers, int(base.config.hidden_size))
        elif isinstance(method, IA3):
            config, found = _lora_like(method, named, name, layers, scale=True)
        elif isinstance(method, LoRA) and type(method) is LoRA:
            config, found = _lora_like(method, named, name, layers, scale=False)
        elif isinstance(method, PrefixTuning):
            config, found = _prefix(method, named, name)
        else:
            raise ValueError(f"save_adapter(format='adapterhub'): AdapterHub has no {type(method).__name__}")
        configs.append(config)
        tensors.update(found)
    config = configs[0] if len(configs) == 1 else {"architecture": "union", "configs": configs}
    folder_config = {"config": config, **describe(model), "name": name}
    return folder_config, {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, head


def describe(model: nn.Module) -> dict[str, Any]:
    """What every AdapterHub JSON file says about the model."""
    base = base_model(model)
    return {
        "hidden_size": int(base.config.hidden_size),
        "model_class": type(base).__name__,
        "model_name": name_or_path(model),
        "model_type": model_type_of(model),
        "version": VERSION,
    }


def _static_head(model: nn.Module, method: PEFTMethod, name: str) -> Head:
    """The model's own ``classifier`` as AdapterHub's static head (``"config": null``)."""
    base = base_model(model)
    classifier = getattr(base, "classifier", None)
    if method.modules_to_save != ["classifier"] or not isinstance(classifier, nn.Linear):
        raise refuse(
            method,
            "modules_to_save",
            method.modules_to_save,
            "AdapterHub's static head is the model's own classifier (an nn.Linear) only",
        )
    labels = getattr(base.config, "label2id", None) or {}
    config = {"config": None, **describe(model), "label2id": dict(labels), "name": name}
    tensors = {
        f"classifier.{p}": getattr(classifier, p).detach().to("cpu").clone() for p in ("weight", "bias")
    }
    return config, tensors


def _bottleneck(
    method: Adapter, named: list[tuple[str, nn.Module]], name: str, layers: int, hidden: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if method.layernorms_trained:
        raise refuse(
            method, "train_layernorms", True, "AdapterHub's adapters leave the model's LayerNorms frozen"
        )
    if method.activation not in NON_LINEARITY:
        raise refuse(method, "activation", method.activation, f"AdapterHub has {', '.join(NON_LINEARITY)}")
    tensors: dict[str, torch.Tensor] = {}
    places: dict[str, set[int]] = {"mh_adapter": set(), "output_adapter": set()}
    size = 0
    for path, layer in named:
        if not hasattr(layer, "adapter_down"):
            continue
        block = path if isinstance(layer, BlockAdapterLayer) else path.rpartition(".")[0]
        index, rest = _index(block)
        place = {"attention.output": "mh_adapter", "output": "output_adapter"}.get(rest)
        if place is None:
            raise refuse(
                method, "target_modules", method.target_modules, f"{path!r} is not a BERT output block"
            )
        places[place].add(index)
        size = int(layer.adapter_down.weight.shape[0])
        key = f"{block}.adapters.{name}"
        down = 0
        if getattr(layer, "adapter_norm_before", None) is not None:
            for p in ("weight", "bias"):
                norm = getattr(layer.adapter_norm_before, p)
                tensors[f"{key}.adapter_down.0.{p}"] = tensors[f"{key}.adapter_norm_before.{p}"] = norm
            down = 1
        for p in ("weight", "bias"):
            tensors[f"{key}.adapter_down.{down}.{p}"] = getattr(layer.adapter_down, p)
            tensors[f"{key}.adapter_up.{p}"] = getattr(layer.adapter_up, p)
            if getattr(layer, "adapter_norm_after", None) is not None:
                tensors[f"{key}.adapter_norm_after.{p}"] = getattr(layer.adapter_norm_after, p)
    used = places["mh_adapter"] | places["output_adapter"]
    for place, indices in places.items():
        if indices and indices != used:
            raise refuse(method, "target_modules", method.target_modules, f"{place} not in the same layers")
    config = {
        "mh_adapter": bool(places["mh_adapter"]),
        "output_adapter": bool(places["output_adapter"]),
        "reduction_factor": hidden / size,
        "non_linearity": NON_LINEARITY[method.activation],
        "original_ln_before": method.original_ln_before,
        "original_ln_after": True,
        "residual_before_ln": method.residual_before_ln,
        "adapter_residual_before_ln": method.adapter_residual_before_ln,
        "ln_before": method.ln_before,
        "ln_after": method.ln_after,
        "is_parallel": method.parallel,
        "scaling": float(method.scaling),
        "init_weights": "mam_adapter" if method.parallel else "bert",
        "leave_out": _leave_out(used, layers),
    }
    return config, tensors


def _lora_like(
    method: LoRA | IA3, named: list[tuple[str, nn.Module]], name: str, layers: int, scale: bool
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if isinstance(method, LoRA):
        for argument, default in (
            ("use_rslora", False),
            ("rank_pattern", {}),
            ("alpha_pattern", {}),
            ("bias", "none"),
        ):
            if getattr(method, argument) != default:
                raise refuse(
                    method, argument, getattr(method, argument), "AdapterHub's LoRA has one r and alpha"
                )
        if method.lora_bias:
            raise refuse(method, "lora_bias", True, "AdapterHub's LoRA has no bias")
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, set[int]] = {}
    for path, layer in named:
        if scale and isinstance(layer, IA3Layer):
            if layer.is_feedforward:
                raise refuse(method, "feedforward_modules", path, "AdapterHub's (IA)^3 scales outputs only")
            tensors[f"{path}.loras.{name}.lora_B"] = layer.ia3_l
        elif not scale and hasattr(layer, "lora_A"):
            tensors[f"{path}.loras.{name}.lora_A"] = layer.lora_A
            tensors[f"{path}.loras.{name}.lora_B"] = layer.lora_B
        else:
            continue
        index, rest = _index(path)
        if rest not in LORA_PLACES:
            raise refuse(method, "target_modules", method.target_modules, f"{path!r} has no AdapterHub place")
        where.setdefault(LORA_PLACES[rest], set()).add(index)
    used = set().union(*where.values()) if where else set()
    if any(indices != used for indices in where.values()):
        raise refuse(
            method, "target_modules", method.target_modules, "every layer must adapt the same matrices"
        )
    config: dict[str, Any] = {
        "architecture": "lora",
        "selfattn_lora": any(m in where for m in ATTN_MATRICES),
        "attn_matrices": [m for m in ATTN_MATRICES if m in where],
        "intermediate_lora": "intermediate" in where,
        "output_lora": "output" in where,
        "leave_out": _leave_out(used, layers),
        "composition_mode": "scale" if scale else "add",
    }
    if scale:
        config.update(r=1, alpha=1, init_weights="ia3")
    else:
        config.update(r=method.r, alpha=method.alpha, dropout=method.dropout, init_weights="lora")  # type: ignore[union-attr]
    return config, tensors


def _prefix(
    method: PrefixTuning, named: list[tuple[str, nn.Module]], name: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if method.shift_positions:
        raise refuse(method, "shift_positions", True, "AdapterHub keeps the real tokens at positions 0…S-1")
    found = [(path, layer) for path, layer in named if isinstance(layer, PrefixLayer)]
    if len(found) != 1:
        raise refuse(
            method, "num_virtual_tokens", method.num_virtual_tokens, "only one encoder prefix is mapped"
        )
    path, layer = found[0]
    with torch.no_grad():
        theta = layer.prefix_matrix()  # (P, L·2·d)
    root = f"{path}." if path else ""
    key = f"{root}prefix_tuning.prefix_tunings.{name}.self_prefix.control_trans"
    config = {"architecture": "prefix_tuning", "flat": True, "prefix_length": method.num_virtual_tokens}
    return config, {key: theta.reshape(-1)}
