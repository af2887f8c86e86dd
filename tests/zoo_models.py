"""Tiny random-weight models of many transformers architectures (2 layers, hidden 32; no downloads)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

VOCAB = 96


@dataclass(frozen=True)
class ZooModel:
    name: str
    kind: str  # "encoder", "decoder" or "encoder-decoder"
    build: Callable[[], nn.Module]


def _common(**extra: object) -> dict[str, object]:
    # special tokens inside the tiny vocabulary (several configs default to ids of the real vocabulary)
    return {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **extra}


def _build(config_cls: str, model_cls: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_cls)(**kwargs)
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(config)
        return model.eval()

    return build


_LLAMA_LIKE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
_BERT_LIKE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "num_labels": 2,
}

ZOO: list[ZooModel] = [
    ZooModel(
        "BERT", "encoder", _build("BertConfig", "BertForSequenceClassification", **_common(**_BERT_LIKE))
    ),
    ZooModel(
        "RoBERTa",
        "encoder",
        _build(
            "RobertaConfig",
            "RobertaForSequenceClassification",
            **{**_common(**_BERT_LIKE), "pad_token_id": 1},
        ),
    ),
    ZooModel(
        "DistilBERT",
        "encoder",
        _build(
            "DistilBertConfig",
            "DistilBertForSequenceClassification",
            **_common(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, num_labels=2),
        ),
    ),
    ZooModel(
        "ALBERT",
        "encoder",
        _build(
            "AlbertConfig",
            "AlbertForSequenceClassification",
            **_common(**_BERT_LIKE, embedding_size=16),
        ),
    ),
    ZooModel(
        "ELECTRA",
        "encoder",
        _build(
            "ElectraConfig", "ElectraForSequenceClassification", **_common(**_BERT_LIKE, embedding_size=32)
        ),
    ),
    ZooModel(
        "DeBERTa-v2",
        "encoder",
        _build("DebertaV2Config", "DebertaV2ForSequenceClassification", **_common(**_BERT_LIKE)),
    ),
    ZooModel(
        "GPT-2",
        "decoder",
        _build("GPT2Config", "GPT2LMHeadModel", **_common(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    ),
    ZooModel("Llama", "decoder", _build("LlamaConfig", "LlamaForCausalLM", **_common(**_LLAMA_LIKE))),
    ZooModel("Qwen2", "decoder", _build("Qwen2Config", "Qwen2ForCausalLM", **_common(**_LLAMA_LIKE))),
    ZooModel("Mistral", "decoder", _build("MistralConfig", "MistralForCausalLM", **_common(**_LLAMA_LIKE))),
    ZooModel(
        "Gemma", "decoder", _build("GemmaConfig", "GemmaForCausalLM", **_common(**_LLAMA_LIKE, head_dim=8))
    ),
    ZooModel("Phi-3", "decoder", _build("Phi3Config", "Phi3ForCausalLM", **_common(**_LLAMA_LIKE))),
    ZooModel(
        "GPT-NeoX",
        "decoder",
        _build(
            "GPTNeoXConfig",
            "GPTNeoXForCausalLM",
            **_common(**{k: v for k, v in _LLAMA_LIKE.items() if k != "num_key_value_heads"}),
        ),
    ),
    ZooModel(
        "OPT",
        "decoder",
        _build(
            "OPTConfig",
            "OPTForCausalLM",
            **_common(
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
            ),
        ),
    ),
    ZooModel(
        "Falcon",
        "decoder",
        _build(
            "FalconConfig",
            "FalconForCausalLM",
            **_common(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False
            ),
        ),
    ),
    ZooModel(
        "Mixtral",
        "decoder",
        _build(
            "MixtralConfig",
            "MixtralForCausalLM",
            **_common(**_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
        ),
    ),
    ZooModel(
        "Qwen2-MoE",
        "decoder",
        _build(
            "Qwen2MoeConfig",
            "Qwen2MoeForCausalLM",
            **_common(
                **_LLAMA_LIKE,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=32,
            ),
        ),
    ),
    ZooModel(
        "T5",
        "encoder-decoder",
        _build(
            "T5Config",
            "T5ForConditionalGeneration",
            **_common(
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=4,
                decoder_start_token_id=0,
            ),
        ),
    ),
    ZooModel(
        "BART",
        "encoder-decoder",
        _build(
            "BartConfig",
            "BartForConditionalGeneration",
            **_common(
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=64,
            ),
        ),
    ),
]
