"""``TextClassifierPipeline``: batched text classification with a PEFT-adapted sequence classifier, returning
``[{"label": ..., "score": ...}]`` per text like the ``transformers`` sentiment pipeline."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_peft.inference.labels import label_names, score_rows
from lightning_peft.inference.rebuild import load_classifier, resolve_model_path


class TextClassifierPipeline:
    """Batched text classification with a PEFT-adapted sequence classifier.

    ``pipeline(["a great film", "dull"])`` → ``[{"label": "positive", "score": 0.97}, ...]``: the most likely
    class and its softmax probability per text. Labels are ``labels`` when given, else the model config's
    ``id2label`` names, else transformers' ``LABEL_0``, ``LABEL_1``, ... (see :mod:`lightning_peft.inference.labels`).

    Args:
        model: a sequence-classification model returning ``.logits`` of shape (batch, classes).
        tokenizer: its tokenizer.
        labels: class names, in class-index order.
        batch_size: texts per forward pass.
        max_length: longer texts are truncated to this many tokens.
        device: where to run (default: where the model is).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        labels: Sequence[str] | None = None,
        batch_size: int = 32,
        max_length: int = 128,
        device: str | torch.device | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = getattr(model, "config", None)
        num_labels = getattr(config, "num_labels", None)
        if labels is not None:
            labels = list(labels)
            if num_labels is not None and len(labels) != num_labels:
                raise ValueError(
                    f"labels has {len(labels)} names ({labels}) but the model predicts {num_labels} classes"
                )
        else:
            labels = label_names(model)
        self.labels = labels
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)

    @classmethod
    def from_adapter(
        cls,
        adapter_path: str | os.PathLike,
        base_model: str | None = None,
        labels: Sequence[str] | None = None,
        num_labels: int | None = None,
        **kwargs: Any,
    ) -> TextClassifierPipeline:
        """Load the base model (``base_model``, default: the one recorded with the adapter; ``"minilm"`` = the
        packaged all-MiniLM-L6-v2), attach the adapter at ``adapter_path`` (a folder or an adapter-only
        ``.ckpt``) and wrap it with its tokenizer. Other keyword arguments go to :class:`TextClassifierPipeline`.
        """
        from transformers import AutoTokenizer

        model, info = load_classifier(adapter_path, base_model=base_model, num_labels=num_labels)
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(info["base_model"]))
        return cls(model, tokenizer, labels=labels if labels is not None else info["labels"], **kwargs)

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str]) -> torch.Tensor:
        """Class probabilities, shape (len(texts), classes)."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            encoded = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            logits = self.model(**encoded).logits  # (chunk, classes)
            out.append(logits.float().softmax(-1).cpu())
        return torch.cat(out) if out else torch.empty(0, 0)

    def predict_texts(self, texts: str | Sequence[str]) -> list[dict[str, Any]]:
        """``[{"label": name, "score": probability}]``, one dict per text, in order."""
        if isinstance(texts, str):
            texts = [texts]
        return score_rows(self.predict_proba(texts), self.labels)

    __call__ = predict_texts
