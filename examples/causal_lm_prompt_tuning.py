"""Prompt (or prefix) tuning of a causal language model with Lightning, then ``generate()``.

Offline (the default) the "pretrained" model is a tiny character-level GPT-2 built from a config and trained
in full for a few seconds on a toy corpus where every subject is as often "great" as "awful"::

    the film was great.   the film was awful.   the food was great.   the food was awful.   ...

Greedy generation from ``"the film was "`` then picks one of the two verdicts arbitrarily. Prompt tuning
freezes that model and learns only a few virtual-token embeddings on the *other* verdict for three of the
four subjects; with the learned prompt, generation switches verdict for those subjects and, usually, for the
held-out one too. The script prints the completions before and after.

    python examples/causal_lm_prompt_tuning.py                      # prompt tuning, offline, seconds on CPU
    python examples/causal_lm_prompt_tuning.py --method prefix      # prefix tuning instead
    python examples/causal_lm_prompt_tuning.py --model gpt2         # a real checkpoint (needs the network)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_peft import PEFTCallback, PEFTMethod, PrefixTuning, PromptTuning, count_parameters

SUBJECTS = ("film", "food", "book", "song")
TUNED_SUBJECTS = SUBJECTS[:3]  # the last one is held out
TEXT_PREFIX = "the {} was "
#: the toy model learns positions up to this many virtual tokens plus a sentence
MAX_VIRTUAL_TOKENS = 16


def sentence(subject: str, verdict: str) -> str:
    return TEXT_PREFIX.format(subject) + verdict + "."


class CharTokenizer:
    """Characters as tokens; id 0 ("\\n") starts every sequence. Enough for a toy model built offline."""

    def __init__(self, corpus: Sequence[str]) -> None:
        self.chars = ["\n", *sorted({c for line in corpus for c in line} - {"\n"})]
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        return [0] + [self.index[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids).strip("\n")


class CausalLM(pl.LightningModule):
    """Next-token prediction with any ``transformers`` causal LM; ``configure_optimizers`` uses all params
    (written for full training: ``PEFTCallback`` keeps only the trainable ones)."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def batches(ids: list[list[int]], steps: int, pad_id: int, max_shift: int = 0) -> DataLoader:
    """The padded batch of all sentences, ``steps`` times (one epoch = ``steps`` optimizer steps).

    ``max_shift > 0`` starts the sentences at positions 0, 1, ..., max_shift in turn: prompt tuning puts its
    virtual tokens first, so the frozen model must already know the later positions' embeddings.
    """
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    labels = torch.full((len(ids), width), -100, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if not max_shift:
        return DataLoader([batch] * steps, batch_size=None)
    positions = torch.arange(width).expand(len(ids), width)
    shifted = [{**batch, "position_ids": positions + step % (max_shift + 1)} for step in range(steps)]
    return DataLoader(shifted, batch_size=None)


def fit(module: pl.LightningModule, data: DataLoader, callbacks: list[Any] | None = None) -> None:
    module.train()  # generate() left it in eval mode; Lightning keeps each module's mode as it finds it
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
    )
    trainer.fit(module, train_dataloaders=data)


@torch.no_grad()
def complete(model: nn.Module, encode: Any, decode: Any, prompt: str, max_new_tokens: int) -> str:
    model.eval()
    input_ids = torch.tensor([encode(prompt)])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return decode(out[0].tolist())


def toy_model(corpus: list[str], pretrain_steps: int) -> tuple[nn.Module, CharTokenizer]:
    """A 2-layer character GPT-2 trained in full on ``corpus`` (the stand-in for a pretrained model)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = CharTokenizer(corpus)
    # no end-of-text token: generation stops at max_new_tokens
    config = GPT2Config(
        vocab_size=len(tokenizer.chars),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=MAX_VIRTUAL_TOKENS + 32,
        bos_token_id=0,
        eos_token_id=None,
        loss_type="ForCausalLM",
    )
    model = GPT2LMHeadModel(config)
    data = batches([tokenizer.encode(s) for s in corpus], pretrain_steps, 0, max_shift=MAX_VIRTUAL_TOKENS)
    fit(CausalLM(model, lr=3e-3), data)
    return model, tokenizer


def make_method(name: str, num_virtual_tokens: int) -> PEFTMethod:
    if name == "prefix":
        return PrefixTuning(num_virtual_tokens=num_virtual_tokens)
    return PromptTuning(num_virtual_tokens=num_virtual_tokens)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", choices=("prompt", "prefix"), default="prompt")
    parser.add_argument(
        "--model", default=None, help="a Hugging Face causal LM (default: a toy GPT-2, offline)"
    )
    parser.add_argument("--num-virtual-tokens", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="prompt/prefix-tuning steps")
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--pretrain-steps", type=int, default=200, help="full training of the toy model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)

    threads = torch.get_num_threads()
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.model is None:
        # a 100k-parameter model: synchronising threads costs more than they compute (10x on a busy CPU)
        torch.set_num_threads(1)
        corpus = [sentence(s, v) for s in SUBJECTS for v in ("great", "awful")]
        model, char_tokenizer = toy_model(corpus, args.pretrain_steps)
        encode, decode, pad_id = char_tokenizer.encode, char_tokenizer.decode, 0
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf_tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        pad_id = hf_tokenizer.pad_token_id or hf_tokenizer.eos_token_id or 0

        def encode(text: str) -> list[int]:
            return hf_tokenizer(text)["input_ids"]

        def decode(ids: Sequence[int]) -> str:
            return hf_tokenizer.decode(ids, skip_special_tokens=True)

    new_tokens = len(encode(sentence("film", "awful"))) - len(encode(TEXT_PREFIX.format("film")))
    results: dict[str, Any] = {"base": {}, "tuned": {}}
    for subject in SUBJECTS:
        results["base"][subject] = complete(model, encode, decode, TEXT_PREFIX.format(subject), new_tokens)

    # steer towards the verdict the frozen model does not pick by itself, so that the change is visible
    awful = sum(text.endswith("awful.") for text in results["base"].values())
    great = sum(text.endswith("great.") for text in results["base"].values())
    target = "great" if awful > great else "awful"
    print(f"tuning towards {target!r} on the subjects {', '.join(TUNED_SUBJECTS)}")
    module = CausalLM(model, lr=args.lr)
    method = make_method(args.method, args.num_virtual_tokens)
    tuned = [encode(sentence(s, target)) for s in TUNED_SUBJECTS]
    fit(module, batches(tuned, args.steps, pad_id), callbacks=[PEFTCallback(method)])
    print(f"{type(method).__name__}: {count_parameters(model)}")
    for subject in SUBJECTS:
        results["tuned"][subject] = complete(model, encode, decode, TEXT_PREFIX.format(subject), new_tokens)

    for subject in SUBJECTS:
        held_out = "" if subject in TUNED_SUBJECTS else "   (held out: not in the tuning data)"
        print(f"base:  {results['base'][subject]!r:<24} tuned: {results['tuned'][subject]!r}{held_out}")
    results["target"] = target
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
