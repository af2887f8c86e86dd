"""A tiny random Llama and a tiny word-level chat tokenizer, built in code (no download, no real model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

#: SmolLM2's template without the default system prompt: every turn is "<|im_start|>role\ncontent<|im_end|>\n"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "user assistant system is the sentiment of this sentence positive or negative ? answer with one word . "
    "a good bad film movie great awful fine plot acting was very not hello hi how are you i am well thanks "
    "what topic tech sport news"
).split()


def tiny_tokenizer(pad_is_eos: bool = True) -> Any:
    """A word-level tokenizer whose "\\n" is a token (as in SmolLM2); pad = eos = ``<|im_end|>`` by default."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL, "\n", *WORDS, "<pad>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.Split(" ", behavior="removed"),
            pre_tokenizers.Split(Regex(r"[?.]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>" if pad_is_eos else "<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(seed: int = 0, vocab_size: int | None = None, attn: str = "sdpa", hidden: int = 32) -> Any:
    """A 2-layer Llama (hidden 32 unless given, 4 heads, 2 KV heads, tied embeddings) with random weights, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tiny_tokenizer().get_vocab()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).float()


def save_tiny(folder: Path, seed: int = 0, hidden: int = 32) -> Path:
    """The tiny Llama and tokenizer saved with ``save_pretrained`` (what ``model_name_or_path`` loads)."""
    tiny_llama(seed, hidden=hidden).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def sentiment_rows(n: int) -> list[dict[str, Any]]:
    """``n`` prompt/completion records of a toy sentiment task (alternating answers, varied lengths)."""
    good = ["a good film", "great acting", "a very good movie", "fine"]
    bad = ["a bad film", "awful plot", "the movie was very bad", "not good"]
    out = []
    for i in range(n):
        text = (good if i % 2 else bad)[(i // 2) % 4]
        out.append(
            {
                "prompt": f"is the sentiment positive or negative ? {text}",
                "completion": "positive" if i % 2 else "negative",
            }
        )
    return out


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    """One JSON object per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
