"""A fingerprint of the base model an adapter was saved on, and the check that loading uses it on the same kind
of base.

``save_adapter`` records, beside the method configuration (in ``adapter_config.json`` under
``"lightning_peft"``, or in the safetensors header where the JSON is HF PEFT's own):

* ``library_version``: the lightning-peft version that wrote the folder;
* ``base.architecture``: the class of the transformers model (or of the module given, for plain PyTorch);
* ``base.targets``: every adapted module (name relative to the transformers model) → the shape of the weight it
  adapts (the input embedding matrix for prompt and prefix tuning, which wrap a whole backbone);
* ``base.tensors``: every base tensor the adapter trains in full (``modules_to_save``, BitFit's biases) → shape.

``load_adapter`` compares that fingerprint with the model it is given *before* attaching anything, and refuses a
different base with an error listing the differences, unless ``allow_base_mismatch=True``. Folders without a
fingerprint (written by HF PEFT, or by older versions) load unchecked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lightning_peft.core.base_model import base_model, base_prefix, relative_name
from lightning_peft.core.targeting import innermost
from lightning_peft.files.names import FINGERPRINT_KEY, VERSION_KEY


def _clean(name: str) -> str:
    """A module or parameter name without wrapper infixes (activation checkpointing, FSDP1, adapter layers)."""
    from lightning_peft.ops.state_dict import state_dict_key

    return state_dict_key(name + ".").replace(".base_layer.", ".")[:-1]


def architecture(module: nn.Module) -> str:
    """The class name of ``module``, seen through FSDP2's dynamic ``FSDP<Class>`` subclass."""
    name = type(module).__name__
    for base in type(module).__mro__[1:]:
        if name == "FSDP" + base.__name__:
            return base.__name__
    return name


def target_shape(module: nn.Module) -> list[int] | None:
    """Shape of the weight an adapter layer adapts (an already wrapped layer answers for its base)."""
    module = innermost(module)  # below one adapter layer, or a stack of them (one per named adapter)
    if isinstance(module, nn.Linear):
        # the logical shape: a quantised base (bitsandbytes Linear4bit) stores its weight packed, and an adapter
        # trained on it (QLoRA) must load onto the full-precision base too
        return [int(module.out_features), int(module.in_features)]
    weight = getattr(module, "weight", None)
    if weight is not None and hasattr(weight, "shape"):
        return list(weight.shape)
    get = getattr(module, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    weight = getattr(embedding, "weight", None)
    return list(weight.shape) if weight is not None else None


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The fingerprint of the base of ``model``, which has an adapter attached."""
    from lightning_peft.ops.parameters import peft_layers, trainable_parameter_names

    root, prefix = base_model(model), base_prefix(model)
    layers = list(peft_layers(model))
    targets = {relative_name(_clean(name), _clean(prefix)): target_shape(layer) for name, layer in layers}
    owned = {f"{name}.{local}" for name, layer in layers for local in layer.peft_parameter_names()}
    parameters = dict(model.named_parameters())
    tensors = {
        relative_name(_clean(name), _clean(prefix)): list(parameters[name].shape)
        for name in trainable_parameter_names(model)
        if name not in owned and name in parameters
    }
    return {"architecture": architecture(root), "targets": targets, "tensors": tensors}


def fingerprint_metadata(model: nn.Module) -> dict[str, Any]:
    """What ``save_adapter`` adds to its metadata."""
    from lightning_peft.version import __version__

    return {VERSION_KEY: __version__, FINGERPRINT_KEY: base_fingerprint(model)}


def recorded_fingerprint(path: Path) -> dict[str, Any] | None:
    """The fingerprint saved in an adapter folder (or its ``.safetensors`` file), or ``None`` when it has none."""
    from lightning_peft.files.reader import read_meta

    meta = read_meta(path)
    return None if meta is None else meta.get(FINGERPRINT_KEY)


def base_differences(model: nn.Module, fingerprint: dict[str, Any]) -> list[str]:
    """How ``model`` differs from the base of ``fingerprint`` (empty when it matches)."""
    root = base_model(model)
    differences = []
    if fingerprint.get("architecture") != architecture(root):
        differences.append(f"architecture {fingerprint.get('architecture')} != {architecture(root)}")
    # names inside the transformers model are relative to it; others (a LightningModule's own head) are not
    modules = {_clean(n): m for n, m in [*model.named_modules(), *root.named_modules()]}
    parameters = {_clean(k): v for k, v in [*model.named_parameters(), *root.named_parameters()]}
    shapes = {
        "target": {n: target_shape(m) for n, m in modules.items()},
        "tensor": {n: list(p.shape) for n, p in parameters.items()},
    }
    for kind, key in (("target", "targets"), ("tensor", "tensors")):
        for name, shape in (fingerprint.get(key) or {}).items():
            found = shapes[kind].get(name, "missing")
            if found == "missing":
                differences.append(f"{kind} {name!r} does not exist")
            elif found != shape:
                differences.append(f"{kind} {name!r} has shape {found}, not {shape}")
    return differences


def check_base(model: nn.Module, folder: Path, allow_base_mismatch: bool) -> None:
    """Refuse to load the adapter at ``folder`` onto a base that differs from the one it was saved on."""
    fingerprint = recorded_fingerprint(Path(folder))
    if fingerprint is None or allow_base_mismatch:
        return
    differences = base_differences(model, fingerprint)
    if differences:
        shown = "; ".join(differences[:5]) + (
            f"; and {len(differences) - 5} more" if len(differences) > 5 else ""
        )
        raise ValueError(
            f"{folder}: the adapter was saved on a different base model ({len(differences)} differences: {shown}). "
            "Pass allow_base_mismatch=True to load_adapter to load it anyway"
        )
