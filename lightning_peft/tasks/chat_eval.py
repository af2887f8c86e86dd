"""Scoring a chat model on classification-style tasks (one answer word among fixed choices).

* :func:`first_token_choice` (used for ``val_acc`` during training): at the position that predicts the first
  answer token, compare the log-probabilities of each choice's first token; one forward pass, no sampling.
* :func:`generate_answers` / :func:`accuracy_by_generation`: greedy ``generate()`` after the chat template's
  generation prompt; an answer counts as right when its first word is the right choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_peft.tasks.chat_format import IGNORE_INDEX, ChatExample, choice_first_tokens


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B,) index of the position whose logits predict each row's first labelled token (-1: no label)."""
    labelled = labels != IGNORE_INDEX  # (B, L)
    first = labelled.float().argmax(dim=1)  # (B,) first labelled position
    return torch.where(labelled.any(dim=1), first - 1, torch.full_like(first, -1))


def first_token_choice(
    logits: torch.Tensor, labels: torch.Tensor, choice_token_ids: torch.Tensor
) -> torch.Tensor:
    """(B,) index of the choice whose first token has the highest log-probability where the answer starts.

    Args:
        logits: (B, L, V) next-token logits of the conversations (teacher forcing).
        labels: (B, L) labels, -100 outside the answers; the first labelled token starts the answer.
        choice_token_ids: (C,) first token of each choice.
    """
    where = answer_positions(labels).clamp(min=0)  # (B,)
    rows = logits[torch.arange(logits.shape[0], device=logits.device), where]  # (B, V)
    return rows[:, choice_token_ids.to(rows.device)].argmax(dim=-1)  # (B,)


def _prompt_messages(example: ChatExample) -> list[dict[str, str]]:
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    return example.messages[:last]


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[list[dict[str, str]]],
    max_new_tokens: int = 8,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers of ``model`` to each conversation (rendered with the chat template and its generation
    prompt), left-padded in batches; returns the decoded new tokens without special tokens."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # the new tokens must follow every prompt directly
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    try:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            texts = [
                tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chunk
            ]
            enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
            device = next(model.parameters()).device
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            new = out[:, enc["input_ids"].shape[1] :]
            answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def matches(answer: str, choice: str) -> bool:
    """Whether a generated answer names ``choice`` (its first word, case and punctuation ignored)."""
    words = answer.strip().split()
    return bool(words) and words[0].strip(".,!:;\"'").lower() == choice.lower()


def accuracy_by_generation(
    model: Any, tokenizer: Any, examples: Sequence[ChatExample], max_new_tokens: int = 8, batch_size: int = 8
) -> tuple[float, list[str]]:
    """Accuracy of greedy answers on classification-style examples (each with ``choices`` and ``answer``),
    and the answers themselves."""
    if any(e.answer < 0 for e in examples):
        raise ValueError("every example needs choices and the index of its right answer")
    answers = generate_answers(
        model, tokenizer, [_prompt_messages(e) for e in examples], max_new_tokens, batch_size
    )
    right = sum(matches(a, e.choices[e.answer]) for a, e in zip(answers, examples))
    return right / max(len(examples), 1), answers


@torch.no_grad()
def accuracy_by_first_token(
    model: Any, tokenizer: Any, examples: Sequence[ChatExample], batch_size: int = 8
) -> float:
    """Accuracy from the first answer token's log-probabilities among the choices' first tokens (the metric
    ``val_acc`` of :class:`~lightning_peft.tasks.causal_lm.CausalLMSFT`), computed outside a Trainer."""
    if any(e.answer < 0 for e in examples):
        raise ValueError("every example needs choices and the index of its right answer")
    was_training = model.training
    model.eval()
    right = 0
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            prompts = [
                tokenizer.apply_chat_template(_prompt_messages(e), tokenize=False, add_generation_prompt=True)
                for e in chunk
            ]
            side = tokenizer.padding_side
            tokenizer.padding_side = "left"
            enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
            tokenizer.padding_side = side
            device = next(model.parameters()).device
            mask = enc["attention_mask"].to(device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt starts at position 0
            logits = model(input_ids=enc["input_ids"].to(device), attention_mask=mask, position_ids=positions)
            logits = logits.logits[:, -1]  # (B, V)
            for e, row in zip(chunk, logits):
                ids = choice_first_tokens(tokenizer, _prompt_messages(e), e.choices)
                right += int(int(row[ids].argmax()) == e.answer)
    finally:
        model.train(was_training)
    return right / max(len(examples), 1)
