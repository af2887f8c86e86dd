"""Packing against three kinds of padding on the SFT set (``bench_llm.py --packing``, issue 20).

The same SST-2 training conversations (SmolLM2's chat template, cut at ``max_length``), LoRA r 8 on q/k/v/o,
``batch`` rows per training step (forward + backward + AdamW), in four layouts:

* ``fixed``: every row padded to ``max_length`` (``padding="max_length"``, many tools' default);
* ``dynamic``: padded to the longest row of the batch, conversations in their original order;
* ``grouped``: padded to the longest row, batches of similar lengths (ChatDataModule's default sampler);
* ``packed``: best-fit-decreasing rows of at most ``pack_length`` tokens (restarting position ids, a block-diagonal
  mask), batched like ``grouped`` (as ChatDataModule does with ``packing=True``).

Each round runs one pass over all batches of every layout, the layouts' order rotating from round to round.
Warm-up: the loss pass (every batch forward) and one training step on each layout's largest batch. Throughput
is real (non-padding) tokens per second; every layout holds the same real tokens, so packed ÷ baseline is the
baseline's pass time over packed's; the reported ratio is the median over rounds of that round's ratio. The
loss is the mean answer-token loss over all conversations at the initial weights, per layout: the same up to
float error. Packed batches hold more conversations, so packing also takes fewer optimizer steps (LoRA's
AdamW step is small next to a forward and backward).

Ceiling: a step costs about (positions computed) × (cost per position) plus small per-step costs, so when the
per-position cost dominates, packed ÷ padded ≤ (real fraction of packed) ÷ (real fraction of padded): less
where packed rows are longer (attention grows with the row length) or the 4-D mask costs more, a little more
where per-step costs matter (packing takes fewer steps).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import common
import torch
import torch.nn.functional as F

LAYOUTS = ("fixed", "dynamic", "grouped", "packed")


def encoded_conversations(tokenizer: Any, count: int, max_length: int) -> list[Any]:
    from lightning_peft.tasks.chat_format import encode_chat, sst2_examples
    from lightning_peft.tasks.common import default_data_dir
    from lightning_peft.tasks.tsv_data import read_table, table_file

    rows = read_table(table_file(default_data_dir("sst2"), "train"))[:count]
    encoded = [encode_chat(tokenizer, x, max_length) for x in sst2_examples(rows)]
    return [e for e in encoded if e is not None]


def pad_to(batch: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a dynamically padded batch further, to ``length`` positions (padding="max_length")."""
    extra = length - batch["input_ids"].shape[1]
    return {
        "input_ids": F.pad(batch["input_ids"], (0, extra), value=pad_id),
        "attention_mask": F.pad(batch["attention_mask"], (0, extra), value=0),
        "labels": F.pad(batch["labels"], (0, extra), value=-100),
    }


def layouts(
    tokenizer: Any, rows: int, batch: int, max_length: int, pack_length: int
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """The four layouts' batches of the same ``rows`` conversations."""
    from lightning_peft.tasks.batching import WindowedBatchSampler, collate_packed, pack_examples, pad_batch

    encoded = encoded_conversations(tokenizer, rows, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def grouped(items: list[Any]) -> list[list[Any]]:  # ChatDataModule's train sampler, first epoch
        sampler = WindowedBatchSampler([len(i.input_ids) for i in items], [0] * len(items), batch, seed=0)
        return [[items[i] for i in b] for b in sampler.batches(0)]

    dynamic = [pad_batch(encoded[i : i + batch], pad) for i in range(0, len(encoded), batch)]
    return {
        "fixed": [pad_to(b, max_length, pad) for b in dynamic],
        "dynamic": dynamic,
        "grouped": [pad_batch(b, pad) for b in grouped(encoded)],
        "packed": [collate_packed(b, pad) for b in grouped(pack_examples(encoded, pack_length))],
    }


def mean_answer_loss(module: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    from lightning_peft.tasks.causal_lm import summed_token_loss

    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            s, n = summed_token_loss(module(**b).logits, b["labels"])
            total, count = total + float(s), count + int(n)
    return total / count


def pass_fn(module: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> Any:
    """One training pass (a step per batch, each forward + backward + AdamW) over ``batches``."""
    from lightning_peft.tasks.causal_lm import summed_token_loss

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def run(only: list[dict[str, torch.Tensor]] | None = None) -> None:
        for b in batches if only is None else only:
            total, count = summed_token_loss(module(**b).logits, b["labels"])
            (total / count.clamp(min=1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def bench_packing(args: argparse.Namespace, module: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
    pack_length = args.pack_length or args.max_length
    data = layouts(tokenizer, args.rows, args.batch, args.max_length, pack_length)
    real = sum(int(b["attention_mask"].sum()) for b in data["dynamic"])
    answers = {n: sum(int((b["labels"] != -100).sum()) for b in bs) for n, bs in data.items()}
    if len(set(answers.values())) != 1:
        raise RuntimeError(f"the layouts differ in labelled tokens: {answers}")
    positions = {n: sum(b["input_ids"].numel() for b in bs) for n, bs in data.items()}
    density = {n: real / positions[n] for n in LAYOUTS}
    module.eval()
    loss = {n: mean_answer_loss(module, data[n]) for n in LAYOUTS}
    module.train()
    print(f"losses at the initial weights: {loss}", flush=True)
    passes = {n: pass_fn(module, data[n]) for n in LAYOUTS}
    for n in LAYOUTS:  # warm-up (after the loss pass ran every batch forward): a step on the largest batch
        passes[n]([max(data[n], key=lambda b: b["input_ids"].numel())])
    times = common.interleaved(passes, args.rounds, warmup=0)
    wall = {n: statistics.median(times[n].wall) for n in LAYOUTS}
    result: dict[str, Any] = {
        "conversations": args.rows,
        "max_length": args.max_length,
        "pack_length": pack_length,
        "batch_rows": args.batch,
        "rounds": args.rounds,
        "real_tokens": real,
        "answer_tokens": answers["packed"],
        "layouts": {
            n: {
                "steps": len(data[n]),
                "positions": positions[n],
                "real_fraction": density[n],
                "mean_answer_loss": loss[n],
                "loss_minus_grouped": loss[n] - loss["grouped"],
                "median_pass_s": wall[n],
                "tokens_per_second": real / wall[n],
            }
            for n in LAYOUTS
        },
        "packed_over": {
            n: {
                "tokens_per_second_ratio": common.paired(times[n].wall, times["packed"].wall),
                "cpu_ratio": common.paired(times[n].cpu, times["packed"].cpu),
                "ceiling": density["packed"] / density[n],
                "per_round": [b / p for b, p in zip(times[n].wall, times["packed"].wall)],
                "cpu_per_round": [b / p for b, p in zip(times[n].cpu, times["packed"].cpu)],
            }
            for n in ("fixed", "dynamic", "grouped")
        },
    }
    print_table(result)
    return result


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\n{result['conversations']} conversations, {result['real_tokens']} real tokens "
        f"({result['answer_tokens']} answer tokens), max_length {result['max_length']}, packed rows of "
        f"<= {result['pack_length']} tokens, {result['batch_rows']} rows per step, {result['rounds']} rounds\n"
    )
    print("| layout | steps | positions | real fraction | mean answer loss | tokens/s (median pass) |")
    print("|---|---:|---:|---:|---:|---:|")
    for n, r in result["layouts"].items():
        print(
            f"| {n} | {r['steps']} | {r['positions']:,} | {r['real_fraction']:.1%} | "
            f"{r['mean_answer_loss']:.7f} | {r['tokens_per_second']:.1f} |"
        )
    print(
        "\n| packed against | tokens/s ratio (median of rounds) | CPU-time ratio | ceiling (real fractions) |"
    )
    print("|---|---:|---:|---:|")
    for n, r in result["packed_over"].items():
        print(f"| {n} | {r['tokens_per_second_ratio']:.2f}x | {r['cpu_ratio']:.2f}x | {r['ceiling']:.2f}x |")
    spread = max(abs(r["loss_minus_grouped"]) for r in result["layouts"].values())
    print(
        f"\nlargest loss difference between layouts: {spread:.1e}. Ceiling: a step costs about (positions) x "
        "(cost per position), so packed / padded throughput is at most about (real fraction of packed) / (real "
        "fraction of padded) when the per-position cost dominates: less where longer packed rows make "
        "attention dearer, a little more where packing's fewer steps save per-step costs (optimizer, Python). "
        "A ceiling well below 1.5x means no packing of these conversations reaches 1.5x against that layout."
    )
