"""Chat data for SFT: the template, answer-only labels (pad = eos), file layouts, converters, batching, packing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_llama import sentiment_rows, tiny_tokenizer, write_jsonl

from lightning_peft.tasks import ChatDataModule
from lightning_peft.tasks.batching import WindowedBatchSampler, collate_packed, pack_examples, pad_batch
from lightning_peft.tasks.chat_format import (
    IGNORE_INDEX,
    ChatExample,
    encode_chat,
    fit_classification_examples,
    read_jsonl,
    sst2_examples,
)

TWO_TURNS = ChatExample(
    [
        {"role": "system", "content": "you are a good assistant"},
        {"role": "user", "content": "hello how are you ?"},
        {"role": "assistant", "content": "i am well"},
        {"role": "user", "content": "what topic ?"},
        {"role": "assistant", "content": "sport news"},
    ]
)


def labelled_tokens(tokenizer, encoded) -> list[str]:
    return [
        tokenizer.convert_ids_to_tokens(t) for t, lab in zip(encoded.input_ids, encoded.labels) if lab != -100
    ]


@pytest.mark.parametrize("pad_is_eos", [True, False])
def test_only_assistant_turns_and_their_end_of_turn_are_labelled(pad_is_eos: bool) -> None:
    tok = tiny_tokenizer(pad_is_eos=pad_is_eos)
    encoded = encode_chat(tok, TWO_TURNS)
    tokens = tok.convert_ids_to_tokens(encoded.input_ids)
    # the rendering is the chat template's, token for token
    assert (
        encoded.input_ids
        == tok(tok.apply_chat_template(TWO_TURNS.messages, tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
    )
    assert labelled_tokens(tok, encoded) == ["i", "am", "well", "<|im_end|>", "sport", "news", "<|im_end|>"]
    # labels equal the input ids where set; the user's and system's <|im_end|> stay unlabelled
    for ident, label in zip(encoded.input_ids, encoded.labels):
        assert label in (IGNORE_INDEX, ident)
    assert tokens.count("<|im_end|>") == 5 and labelled_tokens(tok, encoded).count("<|im_end|>") == 2
    # the answer starts right after the last generation prompt
    assert tokens[encoded.prompt_length - 3 : encoded.prompt_length] == ["<|im_start|>", "assistant", "\n"]


def test_padding_is_masked_by_position_when_pad_is_eos() -> None:
    tok = tiny_tokenizer(pad_is_eos=True)
    assert tok.pad_token_id == tok.eos_token_id
    short = encode_chat(
        tok, ChatExample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    )
    long = encode_chat(tok, TWO_TURNS)
    batch = pad_batch([short, long], tok.pad_token_id)
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))  # dynamic: the longest, not max_length
    assert (batch["input_ids"][0, n:] == tok.eos_token_id).all()  # padded with the eos id ...
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, n:] == 0).all()
    # ... while the real end-of-turn token of the short answer keeps its label
    end = short.input_ids.index(tok.eos_token_id, short.prompt_length)
    assert batch["labels"][0, end] == tok.eos_token_id
    assert batch["labels"][0].ne(IGNORE_INDEX).sum() == short.num_answer_tokens == 2


def test_jsonl_layouts_are_detected_per_file(tmp_path: Path) -> None:
    rows = sentiment_rows(4)
    pc = write_jsonl(tmp_path / "pc.jsonl", rows)
    messages = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in rows
    ]
    msg = write_jsonl(tmp_path / "msg.jsonl", messages)
    assert [e.messages for e in read_jsonl(pc)] == [e.messages for e in read_jsonl(msg)]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [rows[0], messages[1]])
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: the file's layout is 'prompt'"):
        read_jsonl(mixed)
    with pytest.raises(ValueError, match="needs 'messages' or 'prompt'/'completion'"):
        read_jsonl(write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}]))
    with pytest.raises(ValueError, match="no assistant turn"):
        read_jsonl(
            write_jsonl(tmp_path / "noasst.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
        )


def test_sst2_and_bbc_become_one_word_chat_answers(tmp_path: Path) -> None:
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\na good film\t1\nawful plot\t0\n")
    (tmp_path / "sst2" / "validation.tsv").write_text("sentence\tlabel\nfine\t1\n")
    example = sst2_examples([("a good film", 1)])[0]
    assert example.messages[0]["content"] == (
        "Is the sentiment of this sentence positive or negative? Answer with one word.\n\na good film"
    )
    assert example.messages[1] == {"role": "assistant", "content": "positive"} and example.answer == 1
    bbc = tmp_path / "bbc"
    bbc.mkdir()
    (bbc / "train.tsv").write_text("sentence\tlabel\nsport news\t3\ntech news\t4\n")
    (bbc / "validation.tsv").write_text("sentence\tlabel\nthe news\t0\n")
    (bbc / "labels.txt").write_text("business\nentertainment\npolitics\nsport\ntech\n")
    data = ChatDataModule(dataset="bbc_news", data_dir=str(bbc), model_name_or_path=None)
    data._tokenizer = tiny_tokenizer()
    data.setup("fit")
    assert [e.choices[e.answer] for e in data.splits["train"]] == ["sport", "tech"]
    missing = ChatDataModule(dataset="sst2", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere.*LIGHTNING_PEFT_DATA"):
        missing.setup("fit")


def test_long_documents_are_shortened_so_the_answer_fits() -> None:
    tok = tiny_tokenizer()
    examples = fit_classification_examples(tok, sst2_examples([("a very good film " * 40, 1)]), max_length=32)
    encoded = encode_chat(tok, examples[0], max_length=32)
    assert len(encoded.input_ids) <= 32
    assert labelled_tokens(tok, encoded) == ["positive", "<|im_end|>"]


def test_length_grouped_batches_cover_every_item_once_with_similar_lengths() -> None:
    lengths = [(7 * i) % 97 + 3 for i in range(200)]
    grouped = WindowedBatchSampler(
        lengths, [1] * 200, batch_size=8, group_by_length=True, seed=1, group_factor=25
    )
    plain = WindowedBatchSampler(lengths, [1] * 200, batch_size=8, group_by_length=False, seed=1)
    for sampler in (grouped, plain):
        first, second = list(sampler), list(sampler)  # two epochs
        assert sorted(i for b in first for i, _ in b) == list(range(200))
        assert first != second  # reshuffled every epoch

    def spread(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)

    assert spread(grouped.batches(0)) * 5 < spread(plain.batches(0))
    # batches are shuffled by group: not sorted by length across the epoch
    tops = [max(lengths[i] for i in b) for b in grouped.batches(0)]
    assert tops != sorted(tops) and tops != sorted(tops, reverse=True)


def test_batches_carry_their_accumulation_windows_answer_tokens() -> None:
    answers = [1, 2, 3, 4, 5, 6, 7]
    sampler = WindowedBatchSampler(
        [5] * 7, answers, batch_size=2, shuffle=False, group_by_length=False, accumulate=2
    )
    tags = [[t for _, t in batch] for batch in sampler]
    # windows: batches {0,1},{2,3} -> 1+2+3+4 = 10; {4,5},{6} -> 5+6+7 = 18
    assert tags == [[10, 10], [10, 10], [18, 18], [18]]


def test_packing_restarts_positions_and_blocks_attention_between_examples() -> None:
    tok = tiny_tokenizer()
    examples = [
        encode_chat(
            tok,
            ChatExample(
                [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
            ),
        )
        for r in sentiment_rows(6)
    ]
    rows = pack_examples(examples, max_length=48)
    assert (
        all(len(r.input_ids) <= 48 for r in rows) and sum(len(r.parts) for r in rows) == 6 and len(rows) < 6
    )
    batch = collate_packed(rows, tok.pad_token_id)
    mask, positions = batch["attention_mask"], batch["position_ids"]
    assert (
        mask.shape == (len(rows), 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
        and mask.dtype == torch.bool
    )
    r0 = next(r for r, row in enumerate(rows) if len(row.parts) >= 2)
    first = rows[r0]
    a, b = len(first.parts[0].input_ids), len(first.parts[1].input_ids)
    assert positions[r0, :a].tolist() == list(range(a)) and positions[r0, a : a + b].tolist() == list(
        range(b)
    )
    assert not mask[r0, 0, a:, :a].any()  # the second example never sees the first
    assert mask[r0, 0, a : a + b, a : a + b].equal(torch.ones(b, b, dtype=torch.bool).tril())
    assert mask[:, 0].diagonal(dim1=-2, dim2=-1).all()  # no empty attention row, padding included
    assert batch["labels"][r0].ne(IGNORE_INDEX).sum() == first.num_answer_tokens


def test_data_module_pads_dynamically_and_scores_choices(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(folder)
    rows = sentiment_rows(10)
    for r in rows:
        r["choices"] = ["negative", "positive"]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    data = ChatDataModule(
        train_file=str(train),
        val_file=str(train),
        model_name_or_path=str(folder),
        batch_size=4,
        max_length=64,
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    longest = max(len(e.input_ids) for e in data.splits["train"])
    assert batch["input_ids"].shape[1] <= longest < 64
    assert (
        int(batch["num_answer_tokens"]) == batch["labels"].ne(IGNORE_INDEX).sum()
    )  # accumulate 1: own count
    val = next(iter(data.val_dataloader()))
    tok = data.tokenizer
    assert val["choice_token_ids"].tolist() == tok.convert_tokens_to_ids(["negative", "positive"])
    assert val["choice_index"].tolist() == [0, 1, 0, 1]
