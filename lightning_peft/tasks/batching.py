"""Batching for causal-LM SFT: dynamic padding, length-grouped batches, packing, accumulation-window counts.

* :func:`pad_batch` pads a list of encoded examples to the longest one (``attention_mask`` 2-D).
* :func:`pack_examples` concatenates whole examples into rows of at most ``max_length`` tokens (best-fit
  decreasing by default, so rows are nearly full); :func:`collate_packed`
  gives each row ``position_ids`` that restart at 0 for every example and a 4-D block-diagonal causal
  ``attention_mask`` (``True`` = may attend) so no token attends across examples: the packed loss equals the
  unpacked one.
* :class:`WindowedBatchSampler` groups examples of similar length into batches (shuffled by group) and tags
  each batch with the number of answer tokens of its whole gradient-accumulation window, which
  :class:`~lightning_peft.tasks.causal_lm.CausalLMSFT` divides the summed token loss by.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from lightning_peft.tasks.chat_format import IGNORE_INDEX, EncodedExample


class PackedRow:
    """Several encoded examples concatenated into one training row."""

    def __init__(self, parts: list[EncodedExample]) -> None:
        self.parts = parts
        self.input_ids = [t for p in parts for t in p.input_ids]
        self.labels = [t for p in parts for t in p.labels]
        self.num_answer_tokens = sum(p.num_answer_tokens for p in parts)


def pack_examples(
    examples: Sequence[EncodedExample], max_length: int, strategy: str = "best_fit"
) -> list[PackedRow]:
    """Pack whole examples into rows of at most ``max_length`` tokens (an example is never split: a longer one
    must already be truncated). Rows keep their examples in dataset order and come in the order of their
    first example; a sampler shuffles them.

    * ``"best_fit"`` (best-fit decreasing): take the examples longest first and put each into the row with the
      least room left that still fits it (a new row when none does). At most one row is half full or less,
      and there are at most 11/9 of the fewest possible rows plus 4 (Johnson, Demers, Ullman, Garey and
      Graham, 1974), against up to twice as many for ``"sequential"``: fuller rows, less padding.
    * ``"sequential"`` (next fit): in the given order, an example joins the current row while it fits, else
      starts a new one; simple, keeps neighbours together, but a row closes as soon as the next example is too
      long for it.
    """
    if strategy not in ("best_fit", "sequential"):
        raise ValueError(f"strategy must be 'best_fit' or 'sequential', got {strategy!r}")
    for example in examples:
        if len(example.input_ids) > max_length:
            raise ValueError(
                f"an example of {len(example.input_ids)} tokens exceeds max_length={max_length}: truncate it first"
            )
    if strategy == "sequential":
        groups = _next_fit(examples, max_length)
    else:
        groups = _best_fit_decreasing(examples, max_length)
    groups = sorted((sorted(g) for g in groups if g), key=lambda g: g[0])
    return [PackedRow([examples[i] for i in g]) for g in groups]


def _next_fit(examples: Sequence[EncodedExample], max_length: int) -> list[list[int]]:
    rows: list[list[int]] = [[]]
    length = 0
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        if rows[-1] and length + n > max_length:
            rows.append([])
            length = 0
        rows[-1].append(i)
        length += n
    return rows


def _best_fit_decreasing(examples: Sequence[EncodedExample], max_length: int) -> list[list[int]]:
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # tokens left -> rows with exactly that room
    rooms: list[int] = []  # sorted keys of by_room, so bisect finds the tightest fitting room
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids)):  # stable on ties
        n = len(examples[i].input_ids)
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room], rooms[k]
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n not in by_room:
            by_room[room - n] = []
            bisect.insort(rooms, room - n)
        by_room[room - n].append(row)
    return rows


def pad_batch(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``/``labels``/``attention_mask`` of shape (B, L_max).

    Padding positions get ``attention_mask`` 0 and label ``-100`` (decided by position: the pad id may equal the
    end-of-turn id, whose real occurrences keep their labels)."""
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_packed(rows: Sequence[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad packed rows; ``position_ids`` restart per example and ``attention_mask`` is (B, 1, L, L) bool:
    ``mask[b, 0, i, j]`` is True iff j <= i and tokens i and j belong to the same example. Padding tokens form
    one extra segment (they see only padding, so no attention row is empty), and carry label -100."""
    longest = max(len(r.input_ids) for r in rows)
    batch = len(rows)
    ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((batch, longest), dtype=torch.long)
    segments = torch.full((batch, longest), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for s, part in enumerate(row.parts):
            n = len(part.input_ids)
            ids[b, start : start + n] = torch.tensor(part.input_ids)
            labels[b, start : start + n] = torch.tensor(part.labels)
            positions[b, start : start + n] = torch.arange(n)
            segments[b, start : start + n] = s
            start += n
        positions[b, start:] = torch.arange(longest - start)
    same = segments[:, :, None] == segments[:, None, :]  # (B, L, L)
    causal = torch.ones(longest, longest, dtype=torch.bool).tril()  # (L, L)
    mask = (same & causal).unsqueeze(1)  # (B, 1, L, L)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def answer_token_count(labels: torch.Tensor) -> int:
    """Tokens that a causal LM is trained on: labelled positions after the shift (position 0 predicts nothing)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


class TaggedDataset(Dataset):
    """Returns ``(item, window_tokens)`` for keys ``(index, window_tokens)`` produced by the sampler."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        index, window_tokens = key
        return self.items[index], window_tokens


class WindowedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of indices, optionally grouped by length, each index tagged with its window's answer tokens.

    Args:
        lengths: token length of every item.
        answer_tokens: answer (labelled) tokens of every item.
        batch_size: items per batch.
        shuffle: new order every epoch (seeded by ``seed`` and the epoch number).
        group_by_length: sort items by length inside chunks of ``batch_size * group_factor`` (after
            shuffling), cut the chunks into batches and shuffle the batches, so that a batch holds similar
            lengths (less padding) while the order of batches stays random.
        accumulate: batches per gradient-accumulation window (set from the trainer before each epoch).
        seed: base seed of the shuffles.
        group_factor: batches per length-sorting chunk.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        answer_tokens: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        group_by_length: bool = True,
        accumulate: int = 1,
        seed: int = 0,
        group_factor: int = 50,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.lengths = list(lengths)
        self.answer_tokens = list(answer_tokens)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.accumulate = accumulate
        self.seed = seed
        self.group_factor = group_factor
        self.epoch = 0

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches (lists of item indices) of ``epoch``, in order."""
        rng = random.Random(self.seed + epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if not self.group_by_length:
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        chunk = self.batch_size * self.group_factor
        batches: list[list[int]] = []
        for c in range(0, len(order), chunk):
            part = sorted(order[c : c + chunk], key=lambda i: -self.lengths[i])
            batches += [part[i : i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self.batches(self.epoch)
        self.epoch += 1
        k = max(int(self.accumulate), 1)
        for w in range(0, len(batches), k):
            window = batches[w : w + k]
            tokens = sum(self.answer_tokens[i] for batch in window for i in batch)
            for batch in window:
                yield [(i, tokens) for i in batch]
