"""Classify texts with a saved adapter: a small pipeline and the ``lightning-peft classify`` command.

``TextClassifierPipeline.from_adapter(path)`` rebuilds ``AutoModelForSequenceClassification`` from the base
model, attaches the adapter found at ``path`` and returns ``[{"label": ..., "score": ...}]`` per text, like
the ``transformers`` sentiment pipeline. ``path`` is either an adapter folder (``save_adapter``, the
``lightning-peft fit`` run's ``adapter/`` folder, or an HF PEFT folder) or an adapter-only Lightning
``.ckpt`` written while training with ``PEFTCallback``/``PEFTMixin``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.io import load_adapter
from lightning_peft.packaged_models import resolve_model_path
from lightning_peft.reader import read_adapter

#: keys (suffixes) of a classification head's output weight, whose first dimension is the class count
HEAD_WEIGHTS = ("classifier.out_proj.weight", "classifier.weight", "score.weight")


#: HF PEFT task type -> the transformers Auto class that builds a base model for it. Only these classes are
#: ever built from what a file records: a file names a task, never a class.
AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


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
    loaded, in eval mode. ``base_model``, ``num_labels`` and ``task_type`` (a key of :data:`AUTO_CLASSES`)
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
    if task not in AUTO_CLASSES:
        raise ValueError(
            f"{str(adapter_path)!r}: task_type={task!r} is not recorded or not known; pass one of "
            f"{sorted(AUTO_CLASSES)}"
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

    from lightning_peft.quiet import quiet_model_loading

    auto_class = getattr(transformers, AUTO_CLASSES[task])
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


class TextClassifierPipeline:
    """Batched text classification with a PEFT-adapted sequence classifier.

    ``pipeline(["a great film", "dull"])`` → ``[{"label": "positive", "score": 0.97}, ...]``: the most likely
    class and its softmax probability per text. Labels are ``labels`` when given, else the model config's
    ``id2label`` (which transformers fills with ``LABEL_0``, ``LABEL_1``, ... by default).

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
        elif config is not None and getattr(config, "id2label", None):
            labels = [str(config.id2label[i]) for i in sorted(config.id2label)]
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
        probs = self.predict_proba(texts)
        if not len(probs):
            return []
        best, index = probs.max(-1)
        return [
            {"label": self.labels[i] if self.labels else i, "score": float(p)}
            for p, i in zip(best.tolist(), index.tolist())
        ]

    __call__ = predict_texts


# -- lightning-peft classify ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-peft classify",
        description="Classify texts with a saved adapter; prints one result per text.",
    )
    parser.add_argument("texts", nargs="*", help="texts to classify (or use --file)")
    parser.add_argument(
        "--adapter",
        required=True,
        help="adapter folder (adapter_config.json + adapter_model.safetensors) or .ckpt",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="base model name or path; 'minilm' = the packaged all-MiniLM-L6-v2 "
        "(default: the base model recorded with the adapter)",
    )
    parser.add_argument("--file", default=None, help="read texts from this file, one per line ('-' = stdin)")
    parser.add_argument("--labels", default=None, help="comma-separated class names, e.g. negative,positive")
    parser.add_argument("--num-labels", type=int, default=None, help="default: from the adapter's head")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--format", choices=("jsonl", "table"), default="jsonl", help="JSON lines (default) or a text table"
    )
    return parser


def read_texts(file: str | None, texts: Sequence[str]) -> list[str]:
    lines = list(texts)
    if file is not None:
        data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise UnicodeDecodeError(
                error.encoding, error.object, error.start, error.end,
                f"not UTF-8 text (byte 0x{data[error.start]:02x} on line {line} cannot be decoded)",
            ) from None  # fmt: skip
        lines += [line for line in text.splitlines() if line.strip()]
    return lines


def format_rows(texts: Sequence[str], rows: Sequence[dict[str, Any]], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(
            json.dumps({"text": t, "label": r["label"], "score": round(r["score"], 6)}) + "\n"
            for t, r in zip(texts, rows)
        )
    width = max([len(str(r["label"])) for r in rows] + [5])
    lines = [f"{'label':<{width}}  score   text"]
    lines += [f"{str(r['label']):<{width}}  {r['score']:.4f}  {t}" for t, r in zip(texts, rows)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        texts = read_texts(args.file, args.texts)
    except (OSError, UnicodeDecodeError) as error:
        parser.error(f"--file {args.file}: {error}")
    if not texts:
        parser.error("give texts to classify, or --file")
    empty = [i for i, text in enumerate(args.texts, 1) if not text.strip()]
    if empty:
        parser.error(f"text {empty[0]} is empty; give non-empty texts to classify")
    labels = [name.strip() for name in args.labels.split(",")] if args.labels else None
    try:
        pipeline = TextClassifierPipeline.from_adapter(
            args.adapter,
            base_model=args.model,
            labels=labels,
            num_labels=args.num_labels,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))  # a message, not a traceback, for a wrong path or option
    sys.stdout.write(format_rows(texts, pipeline.predict_texts(texts), args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
