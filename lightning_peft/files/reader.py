"""The one reader for everything lightning-peft loads from disk.

:func:`read_adapter` takes an adapter folder (ours or HF PEFT's), an ``adapter_model.safetensors`` file or an
adapter-only Lightning ``.ckpt`` and returns the method configurations, the tensors and the base-model prefix,
plus what is known about the base model. Nothing is unpickled: checkpoints are read with
``torch.load(weights_only=True)``, and the only things a file can name and have built are registered methods.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from lightning_peft.files import adapterhub
from lightning_peft.files.atomic import recover
from lightning_peft.files.config_check import methods_from, read_json, reconcile
from lightning_peft.files.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LABEL_NAMES_KEY, METADATA_KEY
from lightning_peft.files.safe_load import refusing_pickles
from lightning_peft.files.tensor_checks import check_tensor_file, read_header
from lightning_peft.methods.base import PEFTMethod
from lightning_peft.methods.peft_interop import unsupported_peft_type
from lightning_peft.methods.registry import _REGISTRY

PathLike = str | os.PathLike


@dataclass
class AdapterFile:
    """What :func:`read_adapter` found at ``source``."""

    source: str
    methods: list[PEFTMethod]
    #: the adapter's tensors: keyed as in HF PEFT's ``adapter_model.safetensors`` (``key_format="peft"``) or as
    #: in the saving module's ``state_dict()`` (``key_format="state_dict"``, adapter-only checkpoints)
    tensors: dict[str, torch.Tensor]
    key_format: Literal["peft", "state_dict", "adapterhub"]
    #: prefix of the base transformers model in the module that saved the tensors (``state_dict`` keys);
    #: ``None`` when the file does not say
    base_prefix: str | None = None
    #: what is known about the base: ``base_model_name_or_path``, ``task_type``, ``num_labels``, ``labels``
    base: dict[str, Any] = field(default_factory=dict)
    #: a checkpoint's ``hyper_parameters`` (empty for adapter folders)
    hyper_parameters: dict[str, Any] = field(default_factory=dict)


def read_adapter(path: PathLike | AdapterFile, map_location: str | torch.device = "cpu") -> AdapterFile:
    """Read an adapter folder, an adapter ``.safetensors`` file or an adapter-only ``.ckpt`` (whose tensors
    go to ``map_location``)."""
    if isinstance(path, AdapterFile):
        return path
    location = Path(path)
    recover(location)  # a folder whose save was killed between its two renames
    if location.is_dir():
        return _read_folder(location)
    if location.is_file() and location.suffix == ".safetensors":
        return _read_safetensors(location, location.parent / ADAPTER_CONFIG)
    if location.is_file():
        return _read_checkpoint(location, map_location)
    raise FileNotFoundError(
        f"path={str(path)!r} is neither an adapter folder nor a .ckpt file (nor an adapter .safetensors file)"
    )


def read_methods(path: PathLike) -> list[PEFTMethod]:
    """Only the method configurations at ``path`` (cheap: no tensors are read for folders)."""
    location = Path(path)
    recover(location)
    if location.is_dir():
        return _folder_methods(location)
    return read_adapter(location).methods


def read_meta(path: PathLike) -> dict[str, Any] | None:
    """lightning-peft's own metadata of an adapter folder (or of its ``.safetensors`` file): the JSON's
    ``"lightning_peft"`` entry, else the safetensors header's; ``None`` for other files and HF PEFT folders."""
    location = Path(path)
    if location.is_file() and location.suffix == ".safetensors":
        folder, weights_file = location.parent, location
    elif location.is_dir():
        folder, weights_file = location, location / ADAPTER_WEIGHTS
    else:
        return None
    config_file = folder / ADAPTER_CONFIG
    meta = read_json(config_file).get(METADATA_KEY) if config_file.is_file() else None
    if meta is not None:
        return meta
    header = _header_meta(weights_file)
    return _loads(header, weights_file) if header else None


def _read_folder(folder: Path) -> AdapterFile:
    if _is_adapterhub(folder):
        return _read_adapterhub(folder)
    weights_file = folder / ADAPTER_WEIGHTS
    methods = _folder_methods(folder)  # an unknown method fails before the weights are read
    if not weights_file.is_file():
        raise FileNotFoundError(f"path={str(folder)!r} holds no {ADAPTER_WEIGHTS}")
    adapter = _read_safetensors(weights_file, folder / ADAPTER_CONFIG, methods)
    adapter.source = str(folder)
    return adapter


def _read_safetensors(
    weights_file: Path, config_file: Path, methods: list[PEFTMethod] | None = None
) -> AdapterFile:
    config = read_json(config_file) if config_file.is_file() else {}
    meta = _header_meta(weights_file)
    if methods is None:
        if meta is not None:
            methods = methods_from(_loads(meta, weights_file), f"{weights_file} (header)")
        elif config:
            methods = _folder_methods(config_file.parent)
        else:
            raise ValueError(
                f"{weights_file}: no lightning-peft metadata in its header and no {ADAPTER_CONFIG} beside it, "
                "so the method that wrote it is unknown"
            )
    base = {k: config[k] for k in ("base_model_name_or_path", "task_type", LABEL_NAMES_KEY) if config.get(k)}
    # issue 20: a folder in lightning-peft's own format (no HF PEFT equivalent) records its base inside
    own = config.get(METADATA_KEY) if isinstance(config.get(METADATA_KEY), dict) else {}
    base = {**{k: v for k, v in (own.get("base") or {}).items() if v is not None}, **base}
    if LABEL_NAMES_KEY in base:
        base["labels"] = base.pop(LABEL_NAMES_KEY)
    return AdapterFile(
        source=str(weights_file),
        methods=methods,
        # truncation and corruption are refused here, naming the tensor; NaN/Inf by load_adapter
        tensors=_load_tensors(weights_file),
        key_format="peft",
        base_prefix=_loads(meta, weights_file).get("base_prefix") if meta else None,
        base=base,
    )


def _folder_methods(folder: Path) -> list[PEFTMethod]:
    """``adapter_config.json`` is the configuration; metadata in the safetensors header must agree with it."""
    if _is_adapterhub(folder):
        return _read_adapterhub(folder).methods
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"path={str(folder)!r} holds no {ADAPTER_CONFIG}")
    config = read_json(config_file)
    meta = _header_meta(folder / ADAPTER_WEIGHTS)
    if METADATA_KEY in config:
        methods = methods_from(config[METADATA_KEY], str(config_file))
        return reconcile(config, methods, meta, config_file, ours=True)
    described = next((m for cls in _REGISTRY.values() if (m := cls.from_peft_config(config))), None)
    if described is None and meta is None:
        raise unsupported_peft_type(config, str(config_file))
    return reconcile(config, None if described is None else [described], meta, config_file)


def _is_adapterhub(folder: Path) -> bool:
    """AdapterHub's layout (``adapter_config.json`` with ``"config"`` + ``pytorch_adapter.bin``)."""
    config_file = folder / ADAPTER_CONFIG
    if (folder / adapterhub.FUSION_CONFIG).is_file():
        return True
    return config_file.is_file() and adapterhub.is_adapterhub_config(read_json(config_file))


def _read_adapterhub(folder: Path) -> AdapterFile:
    """An AdapterHub folder: its ``.bin`` files read without unpickling, mapped to methods and tensors
    (:mod:`lightning_peft.files.adapterhub`), with its prediction head if it has one."""
    if (folder / adapterhub.FUSION_CONFIG).is_file():  # an AdapterFusion layer
        fusion_file = next((folder / n for n in adapterhub.FUSION_WEIGHTS if (folder / n).is_file()), None)
        if fusion_file is None:
            raise FileNotFoundError(f"path={str(folder)!r} holds no {' or '.join(adapterhub.FUSION_WEIGHTS)}")
        config = read_json(folder / adapterhub.FUSION_CONFIG)
        fusion, tensors = adapterhub.fusion_from_files(config, _load_any(fusion_file), str(fusion_file))
        return AdapterFile(
            source=str(fusion_file), methods=[fusion], tensors=tensors, key_format="adapterhub"
        )
    weights_file = adapterhub.weights_file(folder)
    if weights_file is None:
        raise FileNotFoundError(f"path={str(folder)!r} holds no {' or '.join(adapterhub.WEIGHTS_FILES)}")
    head_file = next((folder / n for n in adapterhub.HEAD_WEIGHTS if (folder / n).is_file()), None)
    head = None
    if head_file is not None and (folder / adapterhub.HEAD_CONFIG).is_file():
        head = (read_json(folder / adapterhub.HEAD_CONFIG), _load_any(head_file))
    config = read_json(folder / ADAPTER_CONFIG)
    methods, converted = adapterhub.methods_and_tensors(
        config, _load_any(weights_file), str(weights_file), head
    )
    return AdapterFile(source=str(weights_file), methods=methods, tensors=converted, key_format="adapterhub")


def _load_any(path: Path) -> dict[str, torch.Tensor]:
    return _load_tensors(path) if path.suffix == ".safetensors" else _load_bin(path)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save`` file of tensors, read with ``weights_only=True``: a pickled object is refused, never built."""
    with refusing_pickles(path):
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    return dict(data)


def _header_meta(weights_file: Path) -> str | None:
    """Our metadata (JSON text) in a safetensors header, read and checked without loading any tensor."""
    if not weights_file.is_file():
        return None
    header = read_header(weights_file)[0].get("__metadata__") or {}
    meta = header.get(METADATA_KEY) if isinstance(header, dict) else None
    return meta if isinstance(meta, str) else None


def _load_tensors(weights_file: Path) -> dict[str, torch.Tensor]:
    check_tensor_file(weights_file)  # a truncated or corrupt file is refused naming the tensor
    try:
        return load_file(str(weights_file))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
        raise ValueError(f"{weights_file}: corrupt file: {error}") from None


def _loads(meta: str, weights_file: Path) -> dict[str, Any]:
    try:
        data = json.loads(meta)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{weights_file}: the header's lightning-peft metadata is not JSON ({error})"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{weights_file}: the header's lightning-peft metadata is not a JSON object")
    return data


def _read_checkpoint(path: Path, map_location: str | torch.device) -> AdapterFile:
    with refusing_pickles(path):  # weights_only=True: a pickled object is refused, never built
        checkpoint = torch.load(str(path), map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: a checkpoint must hold a dict, found {type(checkpoint).__name__}")
    if not isinstance(checkpoint, dict) or METADATA_KEY not in checkpoint:
        raise ValueError(
            f"{path} is not an adapter-only checkpoint (it was not written while training with PEFTCallback or "
            "PEFTMixin)"
        )
    info = checkpoint[METADATA_KEY]
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    base = dict(info.get("base") or {})
    # checkpoints written before the base was recorded: the example modules' hyper-parameters
    for key, hparam in (("base_model_name_or_path", "model_name_or_path"), ("num_labels", "num_labels")):
        if base.get(key) is None and hparams.get(hparam) is not None:
            base[key] = hparams[hparam]
    if hparams.get("labels") and not base.get("labels"):
        base["labels"] = list(hparams["labels"])
    return AdapterFile(
        source=str(path),
        methods=methods_from(info, str(path)),
        tensors=dict(checkpoint.get("state_dict") or {}),
        key_format="state_dict",
        base_prefix=info.get("base_prefix"),
        base={k: v for k, v in base.items() if v is not None},
        hyper_parameters=hparams,
    )
