"""Default targets per transformers ``model_type``: plain data, used when a method gets ``target_modules=None``.

Names are module-name suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``) or regexes matched
against the whole dotted name (used where a plain suffix would also match another layer, e.g. BERT's FFN
output ``layer.N.output.dense`` versus ``attention.output.dense``). A ``model_type`` missing here gets a clear
error asking for ``target_modules``. Checked against transformers 5.24 (the zoo test, ``tests/test_zoo.py``,
builds a tiny model of most of these and attaches every method).
"""

from __future__ import annotations

#: the FFN's second linear of BERT-like encoders (``layer.N.output.dense``), not ``attention.output.dense``
BERT_FFN_OUT = r"(?:.*\.)?layer\.\d+\.output\.dense"
_BERT_ATTN_OUT = r"(.*\.)?attention\.output\.dense"

# -- families: model types that share module names ------------------------------------------------------
BERT_LIKE = (
    "bert",
    "roberta",
    "xlm-roberta",
    "electra",
    "camembert",
    "ernie",
    "layoutlm",
    "megatron-bert",
    "roc_bert",
    "xmod",
    "data2vec-text",
    "nezha",
    "bert-generation",
    "roformer",
)
LLAMA_LIKE = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3_text",
    "granite",
    "granitemoe",
    "olmo",
    "olmo2",
    "cohere",
    "starcoder2",
    "stablelm",
    "yi",
    "deepseek_v2",
    "internlm2",
    "phimoe",
    "glm",
    "helium",
    "smollm3",
    "ministral",
    "seed_oss",
    "arcee",
    "hunyuan_v1_dense",
    "exaone4",
)
#: mixture-of-experts types: their feed-forward layers are experts (often 3-D parameters, not nn.Linear), so only
#: the attention gets (IA)³ by default and bottleneck adapters have no default placement
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "granitemoe", "phimoe", "deepseek_v2")
LLAMA_DENSE = tuple(t for t in LLAMA_LIKE if t not in MOE)
FUSED_QKV = ("gpt_neox", "falcon", "bloom", "persimmon", "chatglm", "gpt_neox_japanese")
BART_LIKE = (
    "bart",
    "mbart",
    "marian",
    "pegasus",
    "m2m_100",
    "blenderbot",
    "blenderbot-small",
    "plbart",
    "nllb-moe",
)
T5_LIKE = ("t5", "mt5", "umt5", "longt5", "switch_transformers")


def _family(types: tuple[str, ...], value: object) -> dict[str, object]:
    return dict.fromkeys(types, value)


#: LoRA and DoRA: the attention's query and value projections (or the fused q/k/v projection)
LORA_TARGETS: dict[str, list[str]] = {
    **_family(BERT_LIKE, ["query", "value"]),  # type: ignore[dict-item]
    "albert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "mpnet": ["q", "v"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "codegen": ["qkv_proj"],
    "phi": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "mpt": ["Wqkv"],
    "opt": ["q_proj", "v_proj"],
    "xglm": ["q_proj", "v_proj"],
    **_family(LLAMA_LIKE, ["q_proj", "v_proj"]),  # type: ignore[dict-item]
    **_family(FUSED_QKV, ["query_key_value"]),  # type: ignore[dict-item]
    **_family(BART_LIKE, ["q_proj", "v_proj"]),  # type: ignore[dict-item]
    **_family(T5_LIKE, ["q", "v"]),  # type: ignore[dict-item]
}

#: (IA)³: keys, values and the feed-forward output layer (:data:`IA3_FEEDFORWARD` says which is which)
IA3_TARGETS: dict[str, list[str]] = {
    **_family(BERT_LIKE, ["key", "value", BERT_FFN_OUT]),  # type: ignore[dict-item]
    "albert": ["key", "value", "ffn_output"],
    "distilbert": ["k_lin", "v_lin", "ffn.lin2"],
    "deberta-v2": ["key_proj", "value_proj", BERT_FFN_OUT],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "gptj": ["k_proj", "v_proj", "fc_out"],
    "gpt_neo": ["k_proj", "v_proj", "mlp.c_proj"],
    "phi": ["k_proj", "v_proj", "fc2"],
    "phi3": ["qkv_proj", "down_proj"],
    "opt": ["k_proj", "v_proj", "fc2"],
    "xglm": ["k_proj", "v_proj", "fc2"],
    **_family(LLAMA_DENSE, ["k_proj", "v_proj", "down_proj"]),  # type: ignore[dict-item]
    **_family(MOE, ["k_proj", "v_proj"]),  # type: ignore[dict-item]
    **_family(FUSED_QKV, ["query_key_value", "dense_4h_to_h"]),  # type: ignore[dict-item]
    **_family(BART_LIKE, ["k_proj", "v_proj", "fc2"]),  # type: ignore[dict-item]
    **_family(T5_LIKE, ["k", "v", "wo"]),  # type: ignore[dict-item]
}
_FEEDFORWARD_NAMES = (
    BERT_FFN_OUT,
    "ffn_output",
    "ffn.lin2",
    "mlp.c_proj",
    "fc_out",
    "fc2",
    "down_proj",
    "dense_4h_to_h",
    "wo",
)
#: the (IA)³ targets that are feed-forward layers (their input is scaled rather than their output)
IA3_FEEDFORWARD: dict[str, list[str]] = {
    model_type: [t for t in targets if t in _FEEDFORWARD_NAMES] for model_type, targets in IA3_TARGETS.items()
}

#: bottleneck adapters: (attention output projection, feed-forward output projection); "pfeiffer" placement
#: uses the second, "houlsby" both
_LLAMA_ADAPTER = ("self_attn.o_proj", "mlp.down_proj")
ADAPTER_PLACEMENT: dict[str, tuple[str, str]] = {
    **_family(BERT_LIKE, (_BERT_ATTN_OUT, r"(.*\.)?layer\.\d+\.output\.dense")),  # type: ignore[dict-item]
    "deberta-v2": (_BERT_ATTN_OUT, r"(.*\.)?layer\.\d+\.output\.dense"),
    "albert": (r"(.*\.)?attention\.dense", r"(.*\.)?ffn_output"),
    "distilbert": (r"(.*\.)?attention\.out_lin", r"(.*\.)?ffn\.lin2"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_bigcode": ("attn.c_proj", "mlp.c_proj"),
    "gptj": ("attn.out_proj", "mlp.fc_out"),
    "phi": ("self_attn.dense", "mlp.fc2"),
    "phi3": _LLAMA_ADAPTER,
    "opt": ("self_attn.out_proj", "fc2"),
    "xglm": ("self_attn.out_proj", "fc2"),
    **_family(LLAMA_DENSE, _LLAMA_ADAPTER),  # type: ignore[dict-item]
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
    "falcon": ("self_attention.dense", "mlp.dense_4h_to_h"),
    "bloom": ("self_attention.dense", "mlp.dense_4h_to_h"),
    **_family(BART_LIKE, ("self_attn.out_proj", "fc2")),  # type: ignore[dict-item]
    **_family(T5_LIKE, ("SelfAttention.o", "DenseReluDense.wo")),  # type: ignore[dict-item]
}
