"""A tiny chat LLM for the post-training tests (issue 20): a random Llama with a byte-level BPE tokenizer trained
in code on a few sentences, a ChatML chat template (the one SmolLM2 uses), saved as a transformers folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the film was great and the acting was wonderful",
    "a dull boring movie with no story at all",
    "positive negative sentiment of this review answer one word",
    "what is the capital of france paris is the capital",
    "hello how are you today i am fine thank you",
]


def tiny_tokenizer() -> Any:
    """A fast tokenizer (byte-level BPE, ~300 tokens) with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_chat_llama(seed: int = 0, vocab_size: int = 320, **overrides: Any) -> nn.Module:
    """A random 2-layer ``LlamaForCausalLM`` (hidden 32, tied embeddings like SmolLM2), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.1,
        **overrides,
    )
    model = LlamaForCausalLM(config).eval()
    # large random weights: greedy decoding then depends strongly on the input and on any adapter (with
    # transformers' small default init it answers the end-of-turn token at once), so token comparisons mean something
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                param.mul_(2.0)
    model.generation_config.pad_token_id = 2
    model.generation_config.eos_token_id = 2
    return model


def save_tiny_chat_llama(folder: Path, seed: int = 0) -> Path:
    """Write the tiny model and its tokenizer to ``folder`` (a transformers folder) and return it."""
    tokenizer = tiny_tokenizer()
    model = tiny_chat_llama(seed, vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
