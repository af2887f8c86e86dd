"""pack_examples: every example exactly once and whole, rows within max_length, best fit fuller than next fit."""

from __future__ import annotations

import random

import pytest

from lightning_peft.tasks.batching import PackedRow, pack_examples
from lightning_peft.tasks.chat_format import IGNORE_INDEX, EncodedExample

#: best-fit decreasing fills 4 rows of 10 exactly; next fit in this order needs 5
LENGTHS = [6, 5, 5, 4, 4, 3, 3, 2, 2, 6]


def examples(lengths: list[int]) -> list[EncodedExample]:
    """Example i holds tokens 1000 * i + k (k = 0 .. length - 1), so every token names its example."""
    out = []
    for i, n in enumerate(lengths):
        ids = [1000 * i + k for k in range(n)]
        out.append(EncodedExample(ids, [IGNORE_INDEX] + ids[1:], prompt_length=1))
    return out


def groups(rows: list[PackedRow], encoded: list[EncodedExample]) -> list[list[int]]:
    """Indices of the examples in each row, checking that each part is an example whole and in place."""
    index = {id(e): i for i, e in enumerate(encoded)}
    out = []
    for row in rows:
        start = 0
        for part in row.parts:
            n = len(part.input_ids)
            assert row.input_ids[start : start + n] == part.input_ids  # contiguous, unsplit
            assert row.labels[start : start + n] == part.labels
            start += n
        assert start == len(row.input_ids)
        assert row.num_answer_tokens == sum(p.num_answer_tokens for p in row.parts)
        out.append([index[id(p)] for p in row.parts])
    return out


def check_partition(rows: list[PackedRow], encoded: list[EncodedExample], max_length: int) -> list[list[int]]:
    found = groups(rows, encoded)
    assert sorted(i for g in found for i in g) == list(range(len(encoded)))  # each exactly once
    assert all(len(r.input_ids) <= max_length for r in rows)
    assert all(g == sorted(g) for g in found)  # dataset order inside a row
    assert [g[0] for g in found] == sorted(g[0] for g in found)  # rows in order of their first example
    return found


def density(rows: list[PackedRow], max_length: int) -> float:
    return sum(len(r.input_ids) for r in rows) / (len(rows) * max_length)


def test_best_fit_fills_rows_that_next_fit_leaves_half_empty() -> None:
    encoded = examples(LENGTHS)
    sequential = pack_examples(encoded, 10, strategy="sequential")
    best = pack_examples(encoded, 10)  # best fit is the default
    assert check_partition(sequential, encoded, 10) == [[0], [1, 2], [3, 4], [5, 6, 7, 8], [9]]
    assert check_partition(best, encoded, 10) == [[0, 4], [1, 2], [3, 9], [5, 6, 7, 8]]
    assert density(best, 10) == 1.0 and density(sequential, 10) == 0.8


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_on_random_lengths_keeps_examples_whole_and_rows_over_half_full(seed: int) -> None:
    rng = random.Random(seed)
    max_length = rng.choice([16, 64, 128])
    encoded = examples([rng.randint(1, max_length) for _ in range(rng.randint(1, 200))])
    rows = pack_examples(encoded, max_length)
    check_partition(rows, encoded, max_length)
    check_partition(pack_examples(encoded, max_length, strategy="sequential"), encoded, max_length)
    # any-fit: a row left half full or less would have taken the later rows' first example
    assert sum(2 * len(r.input_ids) <= max_length for r in rows) <= 1


def test_pack_examples_refuses_long_examples_and_unknown_strategies() -> None:
    with pytest.raises(ValueError, match="of 11 tokens exceeds max_length=10"):
        pack_examples(examples([3, 11]), 10)
    with pytest.raises(ValueError, match="strategy must be 'best_fit' or 'sequential', got 'ffd'"):
        pack_examples(examples([3]), 10, strategy="ffd")
    assert pack_examples([], 10) == []
