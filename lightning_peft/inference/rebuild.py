"""Rebuilding the model an adapter was trained on from what the adapter records (base model, task type, label
count and names), with the adapter loaded."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from lightning_peft.core.base_model import TASK_TYPES
from lightning_peft.files.load import load_adapter
from lightning_peft.files.reader import read_adapter
from lightning_peft.packaged_models import resolve_model_path

#: keys (suffixes) of a classification head's output weight, whose first dimension is the class count
HEAD_WEIGHTS = ("classifier.out_proj.weight", "classifier.weight", "score.weight")


def _num_labels_from(tensors: dict[str, torch.Tensor]) -> int | None:
    for suffix in HEAD_WEIGHTS:
        for key, tensor in tensors.items():
            if key.endswith(suffix) and tensor.dim() == 2:
                return int(tensor.shape[0])
    return None


def load_adapted_model(
    adapter_path: str | os.PathLike,
    base_model: str | None = None,
    num_labels: int | None = None,
    task_type: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The base model an adapter was trained on, rebuilt from what the adapter records, with the adapter
    loaded, in eval mode. ``base_model``, ``num_labels`` and ``task_type`` (a key of :data:`~lightning_peft.core.base_model.TASK_TYPES`)
    override the recorded values.

    Returns the model and what was learnt about it: ``base_model``, ``task_type``, ``num_labels`` and
    ``labels`` (class names recorded with the adapter).
    """
    adapter = read_adapter(adapter_path)  # fails early on an unknown method, before loading the base model
    base = base_model if base_model is not None else adapter.base.get("base_model_name_or_path")
    if base is None:
        raise ValueError(
            f"{str(adapter_path)!r}: no base model is recorded with this adapter; pass base_model (e.g. 'minilm')"
        )
    task = task_type or adapter.base.get("task_type")
    if task not in TASK_TYPES:
        raise ValueError(
            f"{str(adapter_path)!r}: task_type={task!r} is not recorded or not known; pass one of "
            f"{sorted(TASK_TYPES)}"
        )
    labels = adapter.base.get("labels")
    kwargs: dict[str, Any] = {}
    if task == "SEQ_CLS":
        num_labels = num_labels or _num_labels_from(adapter.tensors) or adapter.base.get("num_labels")
        kwargs = {"num_labels": num_labels} if num_labels else {}
        if labels and (num_labels is None or len(labels) == num_labels):
            kwargs["id2label"] = dict(enumerate(labels))
            kwargs["label2id"] = {name: i for i, name in enumerate(labels)}
    model = _from_pretrained(task, resolve_model_path(base), kwargs)
    load_adapter(model, adapter)
    num = getattr(model.config, "num_labels", None) if task == "SEQ_CLS" else None
    info = {"base_model": base, "task_type": task, "num_labels": num, "labels": labels}
    return model.eval(), info


def _from_pretrained(task: str, path: str, kwargs: dict[str, Any]) -> nn.Module:
    import transformers

    from lightning_peft.library_noise import quiet_model_loading

    auto_class = getattr(transformers, TASK_TYPES[task].auto_class)
    # a new head is reported "newly initialised" (the adapter brings it): not worth a warning here
    with quiet_model_loading():
        return auto_class.from_pretrained(path, **kwargs)


def load_classifier(
    adapter_path: str | os.PathLike,
    base_model: str | None = None,
    num_labels: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``AutoModelForSequenceClassification`` with the adapter at ``adapter_path`` (an adapter folder or an
    adapter-only ``.ckpt``) attached, in eval mode; see :func:`load_adapted_model`."""
    return load_adapted_model(adapter_path, base_model, num_labels, task_type="SEQ_CLS")
