"""Chat SFT under DDP: the sampler shards every accumulation window, the loss is normalised over the window's
answer tokens on all processes, so 2 processes train exactly as one process on each window's union batch.

The sampler tests need no processes. The fit runs tests/ddp_sft_script.py once (2 CPU processes, gloo), packing
off and on; its reference is one process with ``accumulate_grad_batches = 2 * 2``: the sampler gives it the same
epoch of batches, so each of its windows is the union of the two processes' windows.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_llama import sentiment_rows, tiny_tokenizer, write_jsonl

from lightning_peft.tasks.batching import WindowedBatchSampler, data_parallel

TOLERANCE = 1e-5


def shards(n: int, batch_size: int, accumulate: int, replicas: int = 2, **kwargs: Any) -> list[Any]:
    lengths = [(7 * i) % 31 + 3 for i in range(n)]
    answers = [i % 5 + 1 for i in range(n)]
    return [
        WindowedBatchSampler(
            lengths, answers, batch_size, accumulate=accumulate, num_replicas=replicas, rank=r, **kwargs
        )
        for r in range(replicas)
    ]


def items(batches: list[list[tuple[int, int]]]) -> list[int]:
    return [i for batch in batches for i, _ in batch]


@pytest.mark.parametrize("group_by_length", [True, False])
@pytest.mark.parametrize(("n", "batch_size", "accumulate"), [(40, 4, 2), (37, 4, 3), (9, 2, 1), (20, 3, 4)])
def test_ranks_share_every_window_disjointly(
    n: int, batch_size: int, accumulate: int, group_by_length: bool
) -> None:
    ranks = shards(n, batch_size, accumulate, group_by_length=group_by_length, seed=5)
    answers = ranks[0].answer_tokens
    epochs = []
    for epoch in range(2):
        per_rank = [list(s) for s in ranks]  # __iter__ moves every rank to the next epoch
        epochs.append(per_rank)
        # the same number of batches on every rank, as promised by len(); none larger than batch_size
        assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == len(ranks[1])
        assert all(0 < len(b) <= batch_size for batches in per_rank for b in batches)
        # together every item exactly once: disjoint and complete
        assert sorted(items(per_rank[0]) + items(per_rank[1])) == list(range(n))
        # window w = the w-th `accumulate` batches of each rank: one tag, the answer tokens of both ranks' batches
        for w in range(0, len(per_rank[0]), accumulate):
            window = [b for batches in per_rank for b in batches[w : w + accumulate]]
            tags = {t for b in window for _, t in b}
            assert tags == {sum(answers[i] for b in window for i, _ in b)}, (epoch, w)
    assert items(epochs[0][0]) != items(epochs[1][0])  # reshuffled every epoch


def test_one_process_is_the_old_sampler_and_the_union_of_two() -> None:
    """World size 1 batches as before; the 2 ranks' windows are the single process's windows of 2x batches."""
    (single,) = shards(32, 4, accumulate=4, replicas=1, seed=2)
    pair = shards(32, 4, accumulate=2, seed=2)
    assert [b for b, _ in single.local_batches(0)] == single.batches(0)
    alone, both = list(single), [list(s) for s in pair]
    for w in range(0, 8, 4):
        union = [b for r in range(2) for b in both[r][w // 2 : w // 2 + 2]]
        assert sorted(items(alone[w : w + 4])) == sorted(items(union))
        assert {t for b in alone[w : w + 4] for _, t in b} == {t for b in union for _, t in b}


def test_uneven_batch_counts_are_split_or_repeated() -> None:
    # 5 batches of 4 (the last of 1) on 2 ranks: the first largest is split, nothing is dropped or repeated
    ranks = shards(17, 4, accumulate=1, group_by_length=False, shuffle=False)
    per_rank = [list(s) for s in ranks]
    assert [len(b) for b in per_rank[0]] == [2, 4, 4] and [len(b) for b in per_rank[1]] == [2, 4, 1]
    assert sorted(items(per_rank[0]) + items(per_rank[1])) == list(range(17))
    # batches of one item cannot be split: the first one is repeated, as DistributedSampler repeats items
    ranks = shards(5, 1, accumulate=2, group_by_length=False, shuffle=False)
    per_rank = [list(s) for s in ranks]
    assert items(per_rank[0]) == [0, 2, 4] and items(per_rank[1]) == [1, 3, 0]
    answers = ranks[0].answer_tokens
    assert per_rank[0][2][0][1] == answers[4] + answers[0]  # the repeat counts in its window


def test_rank_and_world_come_from_the_strategy() -> None:
    class Trainer:
        distributed_sampler_kwargs = {"num_replicas": 4, "rank": 3}

    assert data_parallel(Trainer()) == (4, 3)
    assert data_parallel(None) == (1, 0)
    Trainer.distributed_sampler_kwargs = None  # type: ignore[assignment]  # what a single device gives
    assert data_parallel(Trainer()) == (1, 0)
    with pytest.raises(ValueError, match="num_replicas=2, rank=2"):
        WindowedBatchSampler([1], [1], 1, num_replicas=2, rank=2)


# -- the real thing: 2 processes, packing off and on -----------------------------------------------------------


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a, sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def training_rows(tokenizer: Path, train: Path, name: str) -> Counter:
    """Every row of one epoch, as one process's ChatDataModule gives them (fingerprinted)."""
    from ddp_sft_script import data_module, fingerprint

    data = data_module(tokenizer, train, name)
    data.setup("fit")
    rows = [
        tuple(fingerprint(i, lab))
        for b in data.train_dataloader()
        for i, lab in zip(b["input_ids"], b["labels"])
    ]
    return Counter(rows)


@pytest.mark.distributed
@pytest.mark.xdist_group("distributed")
def test_two_processes_train_as_one_process_on_the_union_of_their_windows(tmp_path: Path) -> None:
    import ddp_sft_script as script

    tokenizer = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tokenizer)
    records = [
        dict(r, completion=r["completion"] + " i am well" * (i % 3)) for i, r in enumerate(sentiment_rows(16))
    ]
    train = write_jsonl(tmp_path / "train.jsonl", records)  # answers of 2, 5 and 8 tokens
    script.run_script(tmp_path / "out", tokenizer, train)
    for name in script.SETTINGS:
        ranks = [torch.load(tmp_path / "out" / f"{name}_rank{r}.pt") for r in (0, 1)]
        info = [json.loads((tmp_path / "out" / f"{name}_rank{r}.json").read_text()) for r in (0, 1)]
        reference = script.fit(tokenizer, train, name, devices=1, accumulate=2 * script.ACCUMULATE)
        ref_adapter = reference["adapter"]
        assert any(
            k.endswith("lora_B") and v.abs().max() > 1e-3 for k, v in ref_adapter.items()
        )  # it trained

        # each rank: half of every epoch, disjoint and together all of it (the packed rows or the conversations)
        per_epoch = info[0]["batches_per_epoch"]
        assert per_epoch == info[1]["batches_per_epoch"] == reference["batches_per_epoch"] / 2, name
        seen = [Counter(tuple(row) for b in i["record"]["rows"][:per_epoch] for row in b) for i in info]
        assert seen[0] + seen[1] == training_rows(tokenizer, train, name), name

        # the same gradient as one process at every optimizer step, hence the same adapter
        assert (
            len(ranks[0]["grads"])
            == len(reference["grads"])
            == script.EPOCHS * -(-per_epoch // script.ACCUMULATE)
        ), name
        for step, (grad, ref) in enumerate(zip(ranks[0]["grads"], reference["grads"], strict=True)):
            assert max_diff(grad, ref) < TOLERANCE * max(float(g.abs().max()) for g in ref.values()), (
                name,
                step,
            )
        assert max_diff(ranks[0]["adapter"], ranks[1]["adapter"]) == 0.0, name
        assert max_diff(ranks[0]["adapter"], ref_adapter) < TOLERANCE, name

        # train_loss: the answer-token mean of the micro-step on both processes, the same value on each
        local = [i["record"]["local"] for i in info]
        logged = [i["record"]["logged"] for i in info]
        assert logged[0] == logged[1], name
        for step, (a, b) in enumerate(zip(*local, strict=True)):
            assert a[2] == b[2]  # one window count on both ranks
            assert logged[0][step] == pytest.approx((a[0] + b[0]) / (a[1] + b[1]), rel=1e-6), (name, step)
