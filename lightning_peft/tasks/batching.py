"""Batching for causal-LM SFT: dynamic padding, length-grouped batches, packing, accumulation-window counts.

* :func:`pad_batch` pads a list of encoded examples to the longest one (``attention_mask`` 2-D).
* :func:`pack_examples` concatenates whole examples into rows of at most ``max_length`` tokens (best-fit
  decreasing by default, so rows are nearly full); :func:`collate_packed`
  gives each row ``position_ids`` that restart at 0 for every example and a 4-D block-diagonal causal
  ``attention_mask`` (``True`` = may attend) so no token attends across examples: the packed loss equals the
  unpacked one.
* :class:`WindowedBatchSampler` groups examples of similar length into batches (shuffled by group) and tags
  each batch with the number of answer tokens of its whole gradient-accumulation window, which
  :class:`~lightning_peft.tasks.causal_lm.CausalLMSFT` divides the summed token loss by. Under data
  parallelism (DDP) every process builds the same epoch of batches from the seed and takes its share of each
  window; the tag counts the window's answer tokens on all processes.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

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


def data_parallel(trainer: Any) -> tuple[int, int]:
    """``(replicas, rank)``: how many processes each train on their own share of the data (and have their
    gradients averaged) and this process's index among them; ``(1, 0)`` without a trainer or on one device.

    Read from the strategy's ``distributed_sampler_kwargs`` (what Lightning would give a ``DistributedSampler``):
    the data-parallel group, which is smaller than the world when a model is also split across processes."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    if not kwargs:
        return 1, 0
    return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))


class TaggedDataset(Dataset):
    """Returns the ``(item, window_tokens)`` pairs of one batch key, a list of ``(index, window_tokens)``
    produced by :class:`WindowedBatchSampler` (used with ``DataLoader(batch_size=None)``)."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, keys: Sequence[tuple[int, int]]) -> list[tuple[Any, int]]:
        return [(self.items[index], window_tokens) for index, window_tokens in keys]


class WindowedBatchSampler(DistributedSampler[list[tuple[int, int]]]):
    """Whole batches of indices, optionally grouped by length, each index tagged with its window's answer tokens.

    It yields batches, so it goes into a ``DataLoader`` as ``sampler`` with ``batch_size=None``. It shards the
    data itself (``num_replicas``/``rank``), which is why it is a ``DistributedSampler``: Lightning leaves a
    loader whose sampler is one as it is, even with ``Trainer(use_distributed_sampler=True)``, and calls its
    ``set_epoch`` before every epoch.

    Every process computes the same epoch of batches (same seed). If their number is not a multiple of
    ``num_replicas``, the largest batches are split in two until it is (when every batch holds one item, the
    first batches are repeated instead, as ``DistributedSampler`` repeats items), so all processes get the same
    number of batches. A window is ``accumulate * num_replicas`` consecutive batches; process ``rank`` takes
    every ``num_replicas``-th of them, starting at its rank. Each batch is tagged with the answer tokens of its
    whole window, all processes included.

    Args:
        lengths: token length of every item.
        answer_tokens: answer (labelled) tokens of every item.
        batch_size: items per batch.
        shuffle: new order every epoch (seeded by ``seed`` and the epoch number).
        group_by_length: sort items by length inside chunks of ``batch_size * group_factor`` (after
            shuffling), cut the chunks into batches and shuffle the batches, so that a batch holds similar
            lengths (less padding) while the order of batches stays random.
        accumulate: batches per gradient-accumulation window and process (set from the trainer).
        seed: base seed of the shuffles.
        group_factor: batches per length-sorting chunk.
        num_replicas: data-parallel processes (set from the trainer).
        rank: this process's index among them.
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
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"rank must be in [0, num_replicas) with num_replicas >= 1, got num_replicas={num_replicas!r}, "
                f"rank={rank!r}"
            )
        # sets num_replicas, rank, shuffle, seed and epoch = 0 (its num_samples/total_size are unused here)
        super().__init__(list(lengths), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.lengths = list(lengths)
        self.answer_tokens = list(answer_tokens)
        self.batch_size = batch_size
        self.group_by_length = group_by_length
        self.accumulate = accumulate
        self.group_factor = group_factor

    def __len__(self) -> int:
        """Batches per epoch on this process (the same on every process)."""
        batches = (len(self.lengths) + self.batch_size - 1) // self.batch_size
        return (batches + self.num_replicas - 1) // self.num_replicas

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches (lists of item indices) of ``epoch`` on all processes together, in order."""
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

    def _even(self, batches: list[list[int]]) -> list[list[int]]:
        """``batches`` made a multiple of ``num_replicas`` long: split the (first) largest batch in two while
        one holds two items or more, else repeat the first batches."""
        batches = list(batches)
        while len(batches) % self.num_replicas:
            big = max(range(len(batches)), key=lambda b: len(batches[b]))  # the first of the largest
            if len(batches[big]) < 2:
                return batches + batches[: -len(batches) % self.num_replicas]
            half = len(batches[big]) // 2
            batches[big : big + 1] = [batches[big][:half], batches[big][half:]]
        return batches

    def local_batches(self, epoch: int) -> list[tuple[list[int], int]]:
        """This process's batches of ``epoch``, each with the answer tokens of its window on all processes."""
        batches = self._even(self.batches(epoch))
        span = max(int(self.accumulate), 1) * self.num_replicas
        out: list[tuple[list[int], int]] = []
        for w in range(0, len(batches), span):
            window = batches[w : w + span]  # a multiple of num_replicas long: every process gets its share
            tokens = sum(self.answer_tokens[i] for batch in window for i in batch)
            out += [(batch, tokens) for batch in window[self.rank :: self.num_replicas]]
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.local_batches(self.epoch)
        self.epoch += 1  # a new order next time, also without set_epoch (Lightning calls it every epoch)
        for batch, tokens in local:
            yield [(i, tokens) for i in batch]
