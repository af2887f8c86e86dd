"""AdapterHub's tensor names and values (``pytorch_adapter.bin``) to lightning-peft's, and back onto a model.

AdapterHub names (``<name>`` = the adapter's name, ``<path>`` = a module path such as
``bert.encoder.layer.0.output``):

* bottleneck: ``<path>.adapters.<name>.adapter_down.0.weight`` (``.1`` after an ``ln_before`` LayerNorm at
  ``.0``), ``adapter_up``, ``adapter_norm_after``;
* LoRA / (IA)^3: ``<path>.loras.<name>.lora_A`` (r, in), ``lora_B`` (out, r); (IA)^3 has ``lora_B`` (out, 1) only;
* prefix tuning: ``bert.prefix_tuning.prefix_tunings.<name>.self_prefix.control_trans`` (flat, P·L·2·d) or
  ``wte.weight`` and ``control_trans.{0,2}`` (the MLP), plus per-layer copies under ``...prefix_tuning.pool``.

Converted tensors are keyed by module paths relative to the base transformers model (no ``bert.``), ending in
lightning-peft's parameter names; :func:`model_state` matches them to a model by dotted suffix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lightning_peft.files.adapterhub.config import architecture
from lightning_peft.methods.adapter import Adapter
from lightning_peft.methods.base import PEFTMethod
from lightning_peft.methods.ia3 import IA3

#: AdapterHub prefix-MLP non_linearity -> the torch function
PREFIX_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "swish": F.silu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
}
BASE_ROOTS = ("encoder.", "embeddings.", "pooler.")


def parts(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The single configurations of ``config`` (a union's parts, or itself)."""
    if architecture(config) == "union":
        return [p for part in config.get("configs", []) for p in parts(part)]
    return [config]


def relative(path: str) -> str:
    """A module path relative to the base model: ``bert.encoder.layer.0`` -> ``encoder.layer.0``."""
    for root in BASE_ROOTS:
        if path.startswith(root):
            return path
        at = path.find("." + root)
        if at >= 0:
            return path[at + 1 :]
    return path


def sizes_of(tensors: Mapping[str, torch.Tensor], name: str, config: Mapping[str, Any]) -> dict[str, int]:
    """What the configuration does not say but the tensors do: the bottleneck width, the prefix length."""
    n = re.escape(name)
    linear = 1 if any(p.get("ln_before") for p in parts(config) if architecture(p) == "bottleneck") else 0
    widths = {
        int(t.shape[0])
        for k, t in tensors.items()
        if re.fullmatch(rf".*\.adapters\.{n}\.adapter_down\.{linear}\.weight", k)
    }
    sizes = {"bottleneck": widths.pop()} if len(widths) == 1 else {}
    for key, tensor in tensors.items():
        if re.fullmatch(rf"(?:.*\.)?prefix_tuning\.prefix_tunings\.{n}\.self_prefix\.wte\.weight", key):
            sizes["prefix_length"] = int(tensor.shape[0])
    return sizes


def convert(
    tensors: Mapping[str, torch.Tensor],
    name: str,
    config: Mapping[str, Any],
    methods: Sequence[PEFTMethod],
    source: str,
) -> dict[str, torch.Tensor]:
    """AdapterHub's tensors as lightning-peft's (module docstring); an unknown tensor is refused by name."""
    n = re.escape(name)
    single = {architecture(p): p for p in parts(config)}
    adapter = next((m for m in methods if isinstance(m, Adapter)), None)
    ia3 = any(isinstance(m, IA3) for m in methods)
    out: dict[str, torch.Tensor] = {}
    prefix: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if m := re.fullmatch(
            rf"(.*)\.adapters\.{n}\.(adapter_down\.\d+|adapter_up|adapter_norm_after|adapter_norm_before)\.(\w+)",
            key,
        ):
            path, part, param = m.groups()
            if adapter is None:
                raise ValueError(
                    f"{source}: tensor {key!r} is a bottleneck adapter's, but the config has none"
                )
            if part.startswith("adapter_down"):
                ln_before = bool(single["bottleneck"].get("ln_before"))
                part = "adapter_norm_before" if ln_before and part.endswith(".0") else "adapter_down"
            owner = relative(path) if adapter.layout is not None else relative(path) + ".dense"
            out[f"{owner}.{part}.{param}"] = tensor
        elif m := re.fullmatch(rf"(.*)\.adapters\.{n}\.scaling", key):
            scales[m.group(1)] = tensor
        elif m := re.fullmatch(rf"(.*)\.loras\.{n}\.(lora_A|lora_B)", key):
            path, param = m.groups()
            if ia3 and param == "lora_B":
                alpha = float(single["lora"].get("alpha", 1))
                out[f"{relative(path)}.ia3_l"] = tensor * alpha  # y = (W x + b) ⊙ (alpha · lora_B)
            elif ia3:
                raise ValueError(f"{source}: tensor {key!r}: AdapterHub's (IA)^3 has no lora_A")
            else:
                out[f"{relative(path)}.{param}"] = tensor
        elif m := re.fullmatch(rf"(?:.*\.)?prefix_tuning\.prefix_tunings\.{n}\.self_prefix\.(.+)", key):
            prefix[m.group(1)] = tensor
        elif re.fullmatch(rf".*\.prefix_tuning\.pool\.prefix_tunings\.{n}\..+", key):
            continue  # per-layer references to the same prefix module
        else:
            raise ValueError(
                f"{source}: tensor {key!r} is not one lightning-peft reads from AdapterHub's files"
            )
    for path, scale in scales.items():  # s · (W_up z + b_up) = (s W_up) z + s b_up, s scalar or per channel
        owner = relative(path) if adapter is None or adapter.layout is not None else relative(path) + ".dense"
        weight, bias = f"{owner}.adapter_up.weight", f"{owner}.adapter_up.bias"
        if weight not in out or bias not in out:
            raise ValueError(f"{source}: a learned scaling at {path!r} without its adapter_up")
        out[weight], out[bias] = out[weight] * scale.reshape(-1, 1), out[bias] * scale.reshape(-1)
    if prefix:
        out["prompt_embeddings"] = prefix_matrix(prefix, single.get("prefix_tuning", {}), source)
    return out


def prefix_matrix(prefix: Mapping[str, torch.Tensor], config: Mapping[str, Any], source: str) -> torch.Tensor:
    """The (P, L·2·d) prefix: the flat parameter reshaped, or the MLP evaluated once on its embeddings."""
    if "control_trans" in prefix:  # flat
        length = int(config.get("prefix_length", 30))
        return prefix["control_trans"].reshape(length, -1)
    needed = ["wte.weight", "control_trans.0.weight", "control_trans.0.bias"]
    needed += ["control_trans.2.weight", "control_trans.2.bias"]
    missing = [k for k in needed if k not in prefix]
    if missing:
        raise ValueError(f"{source}: the prefix MLP's tensor {missing[0]!r} is missing")
    act = str(config.get("non_linearity", "tanh")).lower()
    if act not in PREFIX_ACTIVATIONS:
        raise ValueError(
            f"{source}: prefix non_linearity={act!r} is not supported ({', '.join(PREFIX_ACTIVATIONS)})"
        )
    with torch.no_grad():
        hidden = PREFIX_ACTIVATIONS[act](F.linear(prefix["wte.weight"], *_wb(prefix, "0")))  # (P, bottleneck)
        return F.linear(hidden, *_wb(prefix, "2"))  # (P, L·2·d)


def _wb(prefix: Mapping[str, torch.Tensor], index: str) -> tuple[torch.Tensor, torch.Tensor]:
    return prefix[f"control_trans.{index}.weight"], prefix[f"control_trans.{index}.bias"]


def clean_name(name: str) -> str:
    """A parameter name without lightning-peft's wrapper infixes (``base_layer``)."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def model_state(
    model: nn.Module, names: Sequence[str], tensors: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """``tensors`` (relative keys) keyed by the model's adapter tensor ``names``: each file key must match
    exactly one name by dotted suffix, and each name one key; otherwise the error names the tensor."""
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name in names:
        clean = clean_name(name)
        keys = [k for k in tensors if clean == k or clean.endswith("." + k)]
        if len(keys) != 1:
            found = "no tensor" if not keys else f"{len(keys)} tensors ({keys[:2]})"
            raise ValueError(
                f"{source}: {found} in the AdapterHub file for the model's adapter tensor {name!r}"
            )
        state[name] = tensors[keys[0]]
        used.add(keys[0])
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{source}: tensor {unused[0]!r} matches no adapter tensor of the model")
    return state
