"""The example data module never validates on the test set."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_peft.tasks import TextClassificationDataModule


def write(folder: Path, split: str, rows: list[tuple[str, int]]) -> None:
    lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in rows]
    (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")


def rows(prefix: str, n: int) -> list[tuple[str, int]]:
    return [(f"{prefix} {i}", i % 2) for i in range(n)]


def test_validation_comes_from_the_validation_file(tmp_path: Path) -> None:
    write(tmp_path, "train", rows("train", 20))
    write(tmp_path, "validation", rows("val", 10))
    write(tmp_path, "test", rows("test", 5))
    data = TextClassificationDataModule(data_dir=str(tmp_path), train_size=8, val_size=4)
    data.setup("fit")
    assert data.splits["train"] == rows("train", 8)
    assert data.splits["validation"] == rows("val", 4)
    assert "test" not in data.splits  # fit never reads the test set
    data.setup("test")
    assert data.splits["test"] == rows("test", 5)


def test_without_validation_file_rows_are_held_out_of_train(tmp_path: Path) -> None:
    write(tmp_path, "train", rows("train", 20))
    write(tmp_path, "test", rows("test", 5))
    data = TextClassificationDataModule(data_dir=str(tmp_path), train_size=None, val_size=6)
    data.setup("fit")
    assert data.splits["validation"] == rows("train", 20)[-6:]
    assert data.splits["train"] == rows("train", 14)
    assert not set(data.splits["train"]) & set(data.splits["validation"])
    assert not set(data.splits["validation"]) & set(rows("test", 5))


@pytest.mark.parametrize("field", ["train_size", "val_size"])
def test_sizes_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be a positive integer or None"):
        TextClassificationDataModule(**{field: 0})
