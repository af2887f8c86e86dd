"""Chat/instruction data for causal-LM SFT: JSONL files or SST-2/BBC News as chat tasks.

:class:`ChatDataModule` tokenizes with the model's chat template (:func:`~lightning_peft.tasks.chat_format.
encode_chat`: loss only on the assistant turns and their end-of-turn token), pads dynamically, groups similar
lengths into batches, optionally packs several conversations into one row (no attention across them), and tags
every training batch with the answer-token count of its gradient-accumulation window (see
:class:`~lightning_peft.tasks.causal_lm.CausalLMSFT`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from lightning_peft.packaged_models import resolve_model_path
from lightning_peft.tasks.batching import (
    PackedRow,
    TaggedDataset,
    WindowedBatchSampler,
    collate_packed,
    data_parallel,
    pack_examples,
    pad_batch,
)
from lightning_peft.tasks.chat_format import (
    ChatExample,
    EncodedExample,
    bbc_news_examples,
    choice_first_tokens,
    encode_chat,
    fit_classification_examples,
    read_jsonl,
    sst2_examples,
)
from lightning_peft.tasks.common import default_data_dir, missing_data_error
from lightning_peft.tasks.tsv_data import read_table, table_file

#: the converters of ``ChatDataModule(dataset=...)``
DATASETS = ("sst2", "bbc_news")


def _tagged_collate(items: list[tuple[Any, int]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Collate ``(example or packed row, window_tokens)`` pairs; adds ``num_answer_tokens`` (the window's)."""
    batch = (
        collate_packed([i for i, _ in items], pad_id) if packed else pad_batch([i for i, _ in items], pad_id)
    )
    batch["num_answer_tokens"] = torch.tensor(items[0][1], dtype=torch.long)
    return batch


def collate_eval(examples: list[EncodedExample], pad_id: int, choice_ids: list[int] | None) -> dict[str, Any]:
    """Padded validation batch; for classification tasks also ``choice_token_ids`` (C,) and ``choice_index`` (B,)
    (-1 where an example's answer is not one of the choices)."""
    batch: dict[str, Any] = pad_batch(examples, pad_id)
    if choice_ids is not None:
        batch["choice_token_ids"] = torch.tensor(choice_ids, dtype=torch.long)
        batch["choice_index"] = torch.tensor([e.answer for e in examples], dtype=torch.long)
    return batch


class ChatDataModule(pl.LightningDataModule):
    """Conversations for supervised fine-tuning of a chat model.

    Args:
        train_file: JSONL training file (``messages`` or ``prompt``/``completion`` records); or use ``dataset``.
        val_file: JSONL validation file (optional with ``train_file``).
        test_file: JSONL test file (optional with ``train_file``), read only by ``trainer.test``.
        dataset: ``"sst2"`` or ``"bbc_news"``: the TSV files of ``data_dir`` turned into one-word chat answers
            ("Is the sentiment of this sentence positive or negative? Answer with one word." → "positive").
        data_dir: folder of ``dataset``'s ``train``/``validation``/``test`` TSV files (default ``$LIGHTNING_PEFT_DATA/
            <dataset>``, else ``../shared/data/<dataset>`` relative to the working directory).
        model_name_or_path: whose tokenizer and chat template to use (``"smollm2"`` = the packaged
            SmolLM2-135M-Instruct).
        train_size: use the first N training conversations (``None`` = all).
        val_size: validate on the first N validation conversations (``None`` = all).
        test_size: test on the first N test conversations (``None`` = all). The test split is never used for
            validation: only ``trainer.test`` reads it.
        batch_size: conversations (or packed rows) per batch.
        max_length: tokens per conversation (longer ones are cut; classification documents are shortened so
            the answer fits) and per packed row.
        packing: concatenate conversations into rows of ``max_length`` tokens (position ids restart and a
            block-diagonal mask keeps them apart). Not with prompt or prefix tuning, which need a 2-D mask.
        group_by_length: batch similar lengths together (less padding); batches are still shuffled.
        shuffle: new order every epoch.
        seed: seed of the shuffles.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        dataset: str | None = None,
        data_dir: str | None = None,
        model_name_or_path: str | None = "smollm2",
        train_size: int | None = None,
        val_size: int | None = None,
        test_size: int | None = None,
        batch_size: int = 8,
        max_length: int = 256,
        packing: bool = False,
        group_by_length: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if (train_file is None) == (dataset is None):
            raise ValueError(
                f"give exactly one of train_file or dataset, got train_file={train_file!r}, dataset={dataset!r}"
            )
        if dataset is not None and dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {list(DATASETS)} or None, got {dataset!r}")
        for name, value in (("val_file", val_file), ("test_file", test_file)):
            if dataset is not None and value is not None:
                raise ValueError(
                    f"{name}={value!r} is for JSONL data (train_file); with dataset={dataset!r} every split comes "
                    "from the TSV files of data_dir"
                )
        for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None (all rows), got {value!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length!r}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir(dataset or "")
        self.splits: dict[str, list[EncodedExample]] = {}
        self._tokenizer: Any = None
        self._sampler: WindowedBatchSampler | None = None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (with its chat template), loaded on first use."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                resolve_model_path(self.hparams.model_name_or_path)
            )
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        """Padding id: the pad token, else EOS (padding is masked by position, so they may coincide)."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad if pad is not None else 0)

    def _examples(self, split: str, size: int | None) -> list[ChatExample]:
        """The first ``size`` conversations of ``split`` (all when ``None``), read or converted."""
        hp = self.hparams
        if hp.dataset is None:
            path = {"train": hp.train_file, "validation": hp.val_file, "test": hp.test_file}[split]
            return read_jsonl(path)[:size] if path else []
        rows = read_table(table_file(self.data_dir, split))[:size]  # convert only what is used
        if hp.dataset == "sst2":
            examples = sst2_examples(rows)
        else:
            labels_file = self.data_dir / "labels.txt"
            if not labels_file.is_file():
                raise missing_data_error(self.data_dir, "labels.txt (the BBC News class names)")
            names = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
            examples = bbc_news_examples(rows, names)
        return fit_classification_examples(self.tokenizer, examples, hp.max_length)

    def _encode(self, examples: list[ChatExample], split: str) -> list[EncodedExample]:
        encoded = [encode_chat(self.tokenizer, e, self.hparams.max_length) for e in examples]
        kept = [e for e in encoded if e is not None]
        if len(kept) < len(encoded):
            rank_zero_warn(
                f"{split}: {len(encoded) - len(kept)} of {len(encoded)} conversations dropped: no assistant token "
                f"is left within max_length={self.hparams.max_length}"
            )
        if not kept:
            raise ValueError(f"{split}: no conversation has an assistant token within max_length")
        return kept

    def setup(self, stage: str | None = None) -> None:
        """Read, convert and tokenize the conversations ``stage`` needs: training and validation for fit and
        validate, test for test (``None``: all of them)."""
        hp = self.hparams
        if stage in (None, "fit", "validate") and "train" not in self.splits:
            self.splits["train"] = self._encode(self._examples("train", hp.train_size), "train")
            val = self._examples("validation", hp.val_size)
            if val:
                self.splits["validation"] = self._encode(val, "validation")
        if stage in (None, "test") and "test" not in self.splits:
            test = self._examples("test", hp.test_size)  # dataset=...: test.tsv must exist
            if test:
                self.splits["test"] = self._encode(test, "test")

    def choice_token_ids(self, split: str = "validation") -> list[int] | None:
        """First token of each answer word when the split is a classification task with shared choices, else
        ``None``. Raises when two choices start with the same token (the scoring could not tell them apart)."""
        examples = self.splits.get(split) or []
        if not examples or not examples[0].choices or any(e.choices != examples[0].choices for e in examples):
            return None
        first = examples[0]
        messages = [{"role": "user", "content": "?"}]  # only the template's answer position matters
        return choice_first_tokens(self.tokenizer, messages, first.choices)

    def train_dataloader(self) -> DataLoader:
        """Length-grouped (optionally packed) batches tagged with their accumulation window's answer tokens.

        Under data parallelism (DDP) each process takes its share of every window (the sampler is a
        ``DistributedSampler``, so Lightning does not put its own in) and the tag counts the window on all
        processes (see :class:`~lightning_peft.tasks.batching.WindowedBatchSampler`)."""
        hp = self.hparams
        items: list[EncodedExample] | list[PackedRow] = self.splits["train"]
        if hp.packing:
            items = pack_examples(self.splits["train"], hp.max_length)
        lengths = [len(i.input_ids) for i in items]
        answers = [i.num_answer_tokens for i in items]
        trainer = getattr(self, "trainer", None)
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if trainer is not None else 1
        replicas, rank = data_parallel(trainer)
        self._sampler = WindowedBatchSampler(
            lengths,
            answers,
            hp.batch_size,
            hp.shuffle,
            hp.group_by_length,
            accumulate,
            hp.seed,
            num_replicas=replicas,
            rank=rank,
        )
        return DataLoader(
            TaggedDataset(items),
            sampler=self._sampler,  # yields whole batches: no automatic batching
            batch_size=None,
            collate_fn=partial(_tagged_collate, pad_id=self.pad_id, packed=hp.packing),
            num_workers=hp.num_workers,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=self.hparams.batch_size,
            shuffle=False,
            collate_fn=partial(collate_eval, pad_id=self.pad_id, choice_ids=self.choice_token_ids(split)),
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches (never packed), with the choice tokens of classification tasks; none (an empty
        list, which Lightning skips) without ``val_file``."""
        if "validation" not in self.splits:
            return []
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader | list:
        """Test batches, like the validation batches; none (an empty list: ``trainer.test`` runs nothing and
        returns no metrics) without ``test_file``."""
        if "test" not in self.splits:
            rank_zero_warn("ChatDataModule has no test split (test_file=None): nothing to test")
            return []
        return self._eval_loader("test")
