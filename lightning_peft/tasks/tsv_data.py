"""Sentence classification data from TSV/CSV files (SST-2, BBC News, your own) with dynamic padding.

:class:`TextClassificationDataModule` reads a ``train``/``validation``/``test`` file set or, for users who are
online, a Hugging Face ``datasets`` name; the tokenizer comes from the model; batches are padded dynamically to
their longest sentence.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_peft.packaged_models import resolve_model_path
from lightning_peft.tasks.common import default_data_dir, missing_data_error


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


def table_file(data_dir: Path, split: str) -> Path:
    """``data_dir/<split>.tsv`` or ``.csv``; a clear error naming the folder when neither exists."""
    for suffix in (".tsv", ".csv"):
        candidate = data_dir / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    raise missing_data_error(data_dir, f"{split}.tsv or {split}.csv")


class TextDataset(Dataset):
    """A list of ``(text, label)`` rows as a map-style dataset."""

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
            ``$LIGHTNING_PEFT_DATA/sst2``, else ``../shared/data/sst2`` relative to the working directory.
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
        self.data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir("sst2")
        self.splits: dict[str, list[tuple[str, int]]] = {}
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded on first use."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                resolve_model_path(self.hparams.model_name_or_path)
            )
        return self._tokenizer

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
        return read_table(table_file(self.data_dir, split), hp.text_column, hp.label_column)

    def setup(self, stage: str | None = None) -> None:
        """Read the splits ``stage`` needs (fit/validate: train + validation; test/predict: test)."""
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
        """Tokenize and pad to the longest sentence of the batch; ``labels`` holds the class indices."""
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
        """Training batches (shuffled unless ``shuffle=False``)."""
        return self._loader("train", shuffle=self.hparams.shuffle)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in file order."""
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        """Test batches, in file order."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test split, for ``predict``."""
        return self._loader("test")
