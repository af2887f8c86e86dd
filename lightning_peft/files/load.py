"""Loading an adapter (folder, ``.safetensors``, adapter-only ``.ckpt`` or Hub id) onto a model: every tensor is
matched to the model and checked before anything is loaded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.core.base_model import (
    base_prefix,
)
from lightning_peft.core.record import DEFAULT_ADAPTER_NAME, get_record
from lightning_peft.files import adapterhub
from lightning_peft.files.fingerprint import check_base
from lightning_peft.files.hub import resolve_adapter_path
from lightning_peft.files.names import ADAPTER_WEIGHTS
from lightning_peft.files.peft_keys import from_file_keys
from lightning_peft.files.reader import AdapterFile, PathLike, read_adapter
from lightning_peft.files.save import file_key_map
from lightning_peft.files.tensor_checks import check_dtypes, check_finite
from lightning_peft.ops.named_adapters import add_adapter, delete_adapter, only_adapter
from lightning_peft.ops.parameters import trainable_parameter_names
from lightning_peft.ops.participation import watch_first_inference
from lightning_peft.ops.resolve import accepts_inner_model
from lightning_peft.ops.state_dict import (
    check_adapter_state,
    load_adapter_state,
    state_dict_key,
)


def read_adapter_for(
    model: nn.Module, path: PathLike | AdapterFile, *, allow_base_mismatch: bool = False
) -> AdapterFile:
    """Read the adapter at ``path`` (a folder, a ``.safetensors`` file, an adapter-only ``.ckpt`` or a Hub id,
    which is fetched first) for loading onto ``model``: a folder saved on a different base is refused unless
    ``allow_base_mismatch=True`` (:func:`~lightning_peft.files.fingerprint.check_base`). Nothing is attached."""
    if isinstance(path, AdapterFile):
        return path
    path = resolve_adapter_path(path)
    check_base(model, path, allow_base_mismatch)
    return read_adapter(path)


@accepts_inner_model  # issue 20: also given a module inside the one PEFT was attached to
def load_adapter(
    model: nn.Module,
    path: PathLike | AdapterFile,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
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
    adapter = read_adapter_for(model, path, allow_base_mismatch=allow_base_mismatch)
    tensor_file = _tensor_file(adapter)
    if not allow_nonfinite:
        check_finite(adapter.tensors, tensor_file)
    record = get_record(model)
    attached_here = record is None or adapter_name not in record.adapters
    if attached_here:
        add_adapter(model, adapter.methods, adapter_name)
    try:
        with only_adapter(model, adapter_name):
            state = state_from_file(model, adapter)
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


def state_from_file(model: nn.Module, adapter: AdapterFile) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter`` keyed by ``model``'s adapter tensor names (the adapter must be attached and
    the only one active); raises on an unexpected or missing tensor. :func:`load_adapter`, Lightning checkpoints
    and ``combine_adapter_folders`` (which reads tensors without loading them) all map keys through here."""
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
