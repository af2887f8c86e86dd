"""Class names and ``{"label", "score"}`` rows: one rule for the pipeline, ``lightning-peft classify`` and the
``predictions.jsonl`` that ``lightning-peft predict`` writes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def label_names(module: nn.Module) -> list[str] | None:
    """Class names from the first transformers config with an ``id2label`` inside ``module`` (``module``'s own
    first), or ``None`` when there is none or it holds only transformers' generic ``LABEL_0``, ``LABEL_1``, ...
    placeholders (which are then not worth recording)."""
    for sub in module.modules():
        id2label = getattr(getattr(sub, "config", None), "id2label", None)
        if isinstance(id2label, dict) and id2label:
            names = [str(id2label[i]) for i in sorted(id2label)]
            if names != [f"LABEL_{i}" for i in range(len(names))]:
                return names
            return None
    return None


def label_of(index: int, labels: Sequence[str] | None) -> str:
    """The name of class ``index``: ``labels[index]``, else transformers' placeholder ``LABEL_<index>``."""
    return labels[index] if labels is not None and index < len(labels) else f"LABEL_{index}"


def score_rows(probabilities: torch.Tensor, labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One ``{"label": name, "score": probability}`` per row of ``probabilities`` (shape (n, classes)): the
    most likely class (named by :func:`label_of`) and its probability."""
    if not len(probabilities):
        return []
    best, index = probabilities.max(-1)
    return [{"label": label_of(i, labels), "score": float(p)} for p, i in zip(best.tolist(), index.tolist())]
