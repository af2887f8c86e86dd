"""Chat examples: reading JSONL, converting classification data sets, and tokenizing with a chat template.

An example is a conversation (``messages``: OpenAI-style ``{"role", "content"}`` dicts). Two JSONL layouts are
read, detected per file from its first record:

* ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``
* ``{"prompt": ..., "completion": ...}`` (one user turn, one assistant turn)

Either may carry ``"choices": [...]`` (the possible answers, for accuracy scoring of classification-style tasks).

:func:`encode_chat` renders a conversation with the tokenizer's chat template and labels only the assistant
turns: their content **and** their end-of-turn token (``<|im_end|>`` for SmolLM2), everything else is ``-100``.
Labels are set by position (where each assistant turn starts and ends in the rendered token sequence), never by
token id, so the end-of-turn token is trained even when the tokenizer's pad token is the same token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100

#: the SST-2 question; the sentence follows after a blank line
SST2_QUESTION = "Is the sentiment of this sentence positive or negative? Answer with one word."
SST2_CHOICES = ("negative", "positive")
#: the BBC News question; the article follows after a blank line
BBC_QUESTION = (
    "What is the topic of this news article: business, entertainment, politics, sport or tech? "
    "Answer with one word."
)


@dataclass
class ChatExample:
    """One conversation; ``choices``/``answer`` are set for classification-style tasks (scored by accuracy)."""

    #: OpenAI-style messages: ``{"role": "system"|"user"|"assistant", "content": str}``
    messages: list[dict[str, str]]
    #: the possible answers (label words), or empty
    choices: list[str] = field(default_factory=list)
    #: index in ``choices`` of the right answer, or -1
    answer: int = -1


@dataclass
class EncodedExample:
    """A tokenized conversation: ``labels`` is ``-100`` except on the trained (assistant) tokens."""

    input_ids: list[int]
    labels: list[int]
    #: tokens of the conversation before the last assistant turn, with the generation prompt (for scoring)
    prompt_length: int
    choices: list[str] = field(default_factory=list)
    answer: int = -1

    @property
    def num_answer_tokens(self) -> int:
        """How many tokens carry a label (the loss's denominator counts these)."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _example_from_record(record: dict[str, Any], layout: str, where: str) -> ChatExample:
    if layout == "messages":
        messages = record.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}} dicts")
    else:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn, so nothing would be trained")
    choices = [str(c) for c in record.get("choices") or []]
    answer = (
        choices.index(messages[-1]["content"].strip()) if messages[-1]["content"].strip() in choices else -1
    )
    return ChatExample([{"role": m["role"], "content": m["content"]} for m in messages], choices, answer)


def read_jsonl(path: str | os.PathLike) -> list[ChatExample]:
    """Chat examples of a JSONL file; its layout (``messages`` or ``prompt``/``completion``) is detected from
    the first record and every record must follow it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat data file {str(path)!r} does not exist")
    examples: list[ChatExample] = []
    layout = ""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
            kind = "messages" if "messages" in record else "prompt" if "prompt" in record else ""
            if not layout:
                if not kind:
                    raise ValueError(
                        f"{where}: a record needs 'messages' or 'prompt'/'completion', got keys {sorted(record)}"
                    )
                layout = kind
            elif kind != layout:
                raise ValueError(
                    f"{where}: the file's layout is {layout!r} (first record) but this line is not"
                )
            examples.append(_example_from_record(record, layout, where))
    if not examples:
        raise ValueError(f"chat data file {str(path)!r} holds no records")
    return examples


def classification_examples(
    rows: list[tuple[str, int]], question: str, choices: list[str] | tuple[str, ...]
) -> list[ChatExample]:
    """``(text, label)`` rows as chat questions answered by one label word: ``question\\n\\ntext`` → word."""
    out = []
    for text, label in rows:
        if not 0 <= label < len(choices):
            raise ValueError(f"label {label} is outside the {len(choices)} choices {list(choices)}")
        messages = [
            {"role": "user", "content": f"{question}\n\n{text}"},
            {"role": "assistant", "content": choices[label]},
        ]
        out.append(ChatExample(messages, list(choices), label))
    return out


def sst2_examples(rows: list[tuple[str, int]]) -> list[ChatExample]:
    """SST-2 rows (0 = negative, 1 = positive) as chat questions answered by "negative"/"positive"."""
    return classification_examples(rows, SST2_QUESTION, SST2_CHOICES)


def bbc_news_examples(rows: list[tuple[str, int]], labels: list[str]) -> list[ChatExample]:
    """BBC News rows (``benchmarks/prepare_bbc_news.py`` output; ``labels`` from its ``labels.txt``, in index
    order) as chat questions answered by the topic word."""
    return classification_examples(rows, BBC_QUESTION, labels)


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template (special tokens come from the
    template itself, none are added)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    else:  # no template: the turns' contents one after the other, each answer ended by EOS
        text = ""
        for m in messages:
            text += m["content"] + (tokenizer.eos_token if m["role"] == "assistant" else "\n")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _is_blank(tokenizer: Any, token_id: int) -> bool:
    return tokenizer.decode([token_id]).strip() == ""


def encode_chat(tokenizer: Any, example: ChatExample, max_length: int | None = None) -> EncodedExample | None:
    """Tokenize ``example`` and label its assistant turns (content + end-of-turn token), by position.

    Each assistant turn spans from the end of the conversation rendered up to it with the generation prompt to
    the end of the conversation rendered through it; blank tokens the template writes after the end-of-turn
    token (SmolLM2's ``"\\n"``) stay unlabelled. The first token is never labelled (nothing predicts it).
    Sequences longer than ``max_length`` are cut from the right; returns ``None`` when no labelled token is left.
    """
    messages = example.messages
    ids = render(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    prompt_length = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True) if i else []
        through = render(tokenizer, messages[: i + 1])
        if ids[: len(before)] != before or ids[: len(through)] != through:
            raise ValueError(
                "the chat template does not render a conversation as the concatenation of its turns "
                "(tokens of a prefix differ from the full rendering), so the assistant turns cannot be located"
            )
        start, end = len(before), len(through)
        while end > start and _is_blank(tokenizer, ids[end - 1]):
            end -= 1
        labels[start:end] = ids[start:end]
        prompt_length = start
    labels[0] = IGNORE_INDEX
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return EncodedExample(ids, labels, prompt_length, list(example.choices), example.answer)


def choice_first_tokens(tokenizer: Any, prompt: list[dict[str, str]], choices: list[str]) -> list[int]:
    """The first token of each choice as the chat template renders it as the answer to ``prompt`` (in context:
    a tokenizer may add a leading space marker to a word that starts a text on its own)."""
    start = len(render(tokenizer, prompt, generation_prompt=True))
    ids = []
    for choice in choices:
        full = render(tokenizer, [*prompt, {"role": "assistant", "content": choice}])
        if len(full) <= start:
            raise ValueError(f"the chat template renders no token for the answer {choice!r}")
        ids.append(full[start])
    if len(set(ids)) != len(ids):
        raise ValueError(f"the choices {choices} do not start with distinct tokens: {ids}")
    return ids


def truncate_text(tokenizer: Any, text: str, max_tokens: int) -> str:
    """``text`` cut to its first ``max_tokens`` tokens (decoded back), for questions about long documents."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]).strip()


def fit_classification_examples(
    tokenizer: Any, examples: list[ChatExample], max_length: int
) -> list[ChatExample]:
    """Shorten the document inside each classification question so that the whole conversation, answer
    included, fits ``max_length`` tokens (otherwise truncation would cut the answer away)."""
    out = []
    overheads: dict[tuple[str, str], int] = {}  # tokens around the document, per question and answer
    for example in examples:
        user = example.messages[-2]["content"]
        head, _, text = user.partition("\n\n")
        key = (head, example.messages[-1]["content"])
        if key not in overheads:
            empty = [{"role": "user", "content": head + "\n\n"}, example.messages[-1]]
            overheads[key] = len(render(tokenizer, empty)) + 2
        overhead = overheads[key]
        budget = max(max_length - overhead, 1)
        short = truncate_text(tokenizer, text, budget)
        if short != text:
            messages = [dict(m) for m in example.messages]
            messages[-2]["content"] = f"{head}\n\n{short}"
            example = ChatExample(messages, example.choices, example.answer)
        out.append(example)
    return out
