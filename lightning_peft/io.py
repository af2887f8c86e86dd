"""Adapter files (``adapter_model.safetensors`` + ``adapter_config.json``, HF PEFT's layout) and
adapter-only Lightning checkpoints."""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file
from torch import nn

from lightning_peft.adapters import add_adapter, delete_adapter, list_adapters, only_adapter
from lightning_peft.atomic import replace_folder
from lightning_peft.consistency import methods_from
from lightning_peft.distributed.strategies import check_saveable, is_global_zero
from lightning_peft.files import adapterhub
from lightning_peft.fingerprint import check_base, fingerprint_record
from lightning_peft.hf import AmbiguousBaseModelError, base_prefix, config_value, name_or_path, task_type_of
from lightning_peft.hf import base_model as find_base_model
from lightning_peft.hub import resolve_adapter_path
from lightning_peft.methods.base import PEFTLayer, PEFTMethod
from lightning_peft.model import (
    adapter_state_dict,
    apply_peft,
    as_method_list,
    attached_methods,
    check_adapter_state,
    is_attached,
    load_adapter_state,
    peft_layers,
    state_dict_key,
    trainable_parameter_names,
)
from lightning_peft.participation import watch_first_inference
from lightning_peft.peft_format import from_file_keys, to_file_keys
from lightning_peft.quantized import quantization_state_keys
from lightning_peft.reader import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHECKPOINT_KEY,
    FORMAT_VERSION,
    AdapterFile,
    PathLike,
    read_adapter,
    read_methods,
)
from lightning_peft.record import DEFAULT_ADAPTER, get_record
from lightning_peft.validation import check_dtypes, check_finite

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "CHECKPOINT_KEY", "FORMAT_VERSION"]


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
    """lightning-peft's own record of an adapter, written to files and checkpoints. With ``strict=False``
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
        else DEFAULT_ADAPTER,
        "methods": [m.to_dict() for m in methods],
        "base_prefix": prefix,
        "base": base,
    }


def adapter_config_dict(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config.json, lightning-peft metadata). When HF PEFT has an equivalent configuration the JSON is
    exactly PEFT's (so PEFT loads the folder without warnings) and our metadata goes into the safetensors
    header; otherwise the JSON holds our metadata under ``"lightning_peft"``."""
    methods = [m.saved_config() for m in attached_methods(model) or []]
    meta = {**adapter_meta(model, methods), **fingerprint_record(model)}
    peft_config = methods[0].peft_config(model) if len(methods) == 1 else None
    if peft_config:
        meta["peft_config"] = peft_config  # what the JSON said when written: any later edit is detected
    return (peft_config if peft_config else {CHECKPOINT_KEY: meta}), meta


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
        path = name[len(prefix) :] if prefix and name.startswith(prefix) else name
        replaced.update({layer.peft_key(path, local): tensor for local, tensor in saved.items()})
    tensors = {mapping[name]: _full(tensor) for name, tensor in state.items()}
    tensors.update({key: _full(tensor) for key, tensor in replaced.items()})
    return tensors


def save_adapter(
    model: nn.Module, path: PathLike, adapter_name: str | None = None, format: str = "lightning_peft"
) -> Path:
    """Write adapters of ``model`` to the folder ``path`` in HF PEFT's layout: ``adapter_model.safetensors``
    holding only the adapter's tensors (and ``modules_to_save``), and ``adapter_config.json``. No pickle is
    involved. With ``adapter_name`` that adapter goes to ``path``; without, every loaded adapter is written,
    ``"default"`` (or the first) at ``path`` and each other one in the sub-folder ``path/<name>``.

    ``format="adapterhub"`` writes AdapterHub's layout instead (lightning_peft/files/adapterhub).

    Collective under FSDP2 (it gathers sharded tensors): call it on every rank; rank 0 writes."""
    if format not in ("lightning_peft", "adapterhub"):
        raise ValueError(f"format must be 'lightning_peft' or 'adapterhub', got {format!r}")
    if not is_attached(model):
        raise ValueError(f"save_adapter: no PEFT method is attached to this {type(model).__name__}")
    check_saveable(model)
    folder = Path(path)
    names = list_adapters(model)
    if adapter_name is not None:
        destinations = {adapter_name: folder}
    else:
        root = DEFAULT_ADAPTER if DEFAULT_ADAPTER in names else names[0]
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
        metadata = {"format": "pt", CHECKPOINT_KEY: json.dumps(meta)}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))

    replace_folder(folder, write)  # the folder is replaced as a unit: old or new, never torn


def read_adapter_config(path: PathLike) -> list[PEFTMethod]:
    """The method configurations stored at ``path`` (an adapter folder, ours or HF PEFT's, or a file)."""
    return read_methods(path)


def load_adapter(
    model: nn.Module,
    path: PathLike | AdapterFile,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    allow_nonfinite: bool = False,
    allow_base_mismatch: bool = False,
) -> nn.Module:
    """Load an adapter onto ``model`` under the name ``adapter_name``: an adapter folder written by
    :func:`save_adapter` (or by HF PEFT for LoRA/DoRA/IA3/prompt/prefix tuning), an adapter ``.safetensors``
    file, an adapter-only ``.ckpt``, or a Hub repository id (``"org/name"``), fetched with ``huggingface_hub``
    (from its cache with HF_HUB_OFFLINE=1).

    An adapter of that name is attached first if ``model`` has none (switched off if other adapters are
    loaded, see :func:`~lightning_peft.add_adapter`). A folder that records its base model (every folder
    :func:`save_adapter` writes) is refused on a different base unless ``allow_base_mismatch=True``. Every
    tensor is checked against the model before anything is loaded; on a mismatch the error names the tensor
    and both shapes and the model is unchanged.
    NaN/Inf values are refused unless ``allow_nonfinite=True``.
    """
    if not isinstance(path, AdapterFile):
        path = resolve_adapter_path(path)
        check_base(model, path, allow_base_mismatch)
    adapter = read_adapter(path)
    tensor_file = _tensor_file(adapter)
    if not allow_nonfinite:
        check_finite(adapter.tensors, tensor_file)
    record = get_record(model)
    attached_here = record is None or adapter_name not in record.adapters
    if attached_here:
        add_adapter(model, adapter.methods, adapter_name)
    try:
        with only_adapter(model, adapter_name):
            state = _model_state(model, adapter)  # AdapterHub's folders: lightning_peft/files/adapterhub
            check_adapter_state(model, state, tensor_file)
            file_keys = file_key_map(model) if adapter.key_format == "peft" else {}
            check_dtypes(model, state, file_keys, tensor_file)
    except Exception:
        if attached_here:
            delete_adapter(model, adapter_name)  # also restores the requires_grad flags
        raise
    with only_adapter(model, adapter_name):
        load_adapter_state(model, state, adapter.source)
    watch_first_inference(model)  # the first forward checks that every method took part (participation.py)
    return model


def _tensor_file(adapter: AdapterFile) -> str:
    """The file that holds the tensors (a folder's ``adapter_model.safetensors``), for messages."""
    source = Path(adapter.source)
    return str(source / ADAPTER_WEIGHTS) if source.is_dir() else adapter.source


def _model_state(model: nn.Module, adapter: AdapterFile) -> dict[str, torch.Tensor]:
    """The file's tensors keyed by ``model``'s adapter tensor names; raises on an unexpected or missing one."""
    if adapter.key_format == "adapterhub":
        return adapterhub.model_tensors(model, adapter.tensors, adapter.source)
    if adapter.key_format == "peft":
        expected = file_key_map(model)  # model name -> file key
    else:
        to_file = _state_prefix_map(model, adapter)
        expected = {name: to_file(name) for name in map(state_dict_key, trainable_parameter_names(model))}
    inverse = {file_key: name for name, file_key in expected.items()}
    if adapter.key_format == "peft":
        adapter.tensors = from_file_keys(adapter.tensors, set(inverse))
    unexpected = sorted(set(adapter.tensors) - set(inverse))
    if unexpected:
        raise ValueError(
            f"{_tensor_file(adapter)}: tensor {unexpected[0]!r} does not belong to the attached adapter "
            f"({len(unexpected)} unexpected tensors; expected keys like {sorted(inverse)[:3]})"
        )
    missing = [key for key in inverse if key not in adapter.tensors]
    if missing:
        raise ValueError(
            f"{_tensor_file(adapter)}: tensor {missing[0]!r} is missing ({len(missing)} missing); expected "
            f"{len(inverse)} tensors, found {len(adapter.tensors)}"
        )
    return {inverse[key]: tensor for key, tensor in adapter.tensors.items()}


def _state_prefix_map(model: nn.Module, adapter: AdapterFile) -> Any:
    """``model`` state-dict name -> the checkpoint's key: the base model's prefix in ``model`` is replaced by
    the one in the module that saved the checkpoint (e.g. ``bert.`` in a bare model, ``model.bert.`` in a
    LightningModule holding it as ``self.model``)."""
    ours = state_dict_key(base_prefix(model))
    theirs = adapter.base_prefix
    if theirs is None:  # a checkpoint from before the prefix was recorded: infer it from an adapter name
        theirs = _infer_prefix(adapter, [state_dict_key(n) for n in trainable_parameter_names(model)], ours)
    if theirs == ours:
        return lambda name: name
    return lambda name: theirs + name[len(ours) :] if name.startswith(ours) else name


def _infer_prefix(adapter: AdapterFile, names: Sequence[str], ours: str) -> str:
    for name in names:
        rel = name[len(ours) :] if name.startswith(ours) else name
        for key in adapter.tensors:
            if key.endswith(rel) and (len(key) == len(rel) or key[-len(rel) - 1] == "."):
                return key[: -len(rel)]
    return ours


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
    checkpoint[CHECKPOINT_KEY] = adapter_meta(module, trained, strict=False)


def checkpoint_methods(checkpoint: dict[str, Any]) -> list[PEFTMethod] | None:
    info = checkpoint.get(CHECKPOINT_KEY)
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
        apply_peft(module, methods, checkpoint[CHECKPOINT_KEY].get("adapter_name", DEFAULT_ADAPTER))
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
    load_adapter_state(model, _model_state(model, adapter), adapter.source)
    return model.eval()
