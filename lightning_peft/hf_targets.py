"""Per-architecture default targets, by transformers ``config.model_type``: plain data, read through
:func:`lightning_peft.hf.default_targets`. A method without an entry for a model type asks for
``target_modules`` explicitly."""

from __future__ import annotations

#: default targets per transformers ``model_type`` when ``target_modules`` is not given
LORA_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}


#: the FFN's second linear of BERT/RoBERTa (``layer.N.output.dense``) but not ``attention.output.dense``
_BERT_FFN_OUT = r"(?:.*\.)?layer\.\d+\.output\.dense"

#: default (IA)³ targets per transformers ``model_type`` when ``target_modules`` is not given
IA3_TARGETS: dict[str, list[str]] = {
    "bert": ["key", "value", _BERT_FFN_OUT],
    "roberta": ["key", "value", _BERT_FFN_OUT],
    "distilbert": ["k_lin", "v_lin", "ffn.lin2"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["k_proj", "v_proj", "down_proj"],
}
#: which of the default targets are feed-forward (input-side scaling)
IA3_FEEDFORWARD: dict[str, list[str]] = {
    "bert": [_BERT_FFN_OUT],
    "roberta": [_BERT_FFN_OUT],
    "distilbert": ["ffn.lin2"],
    "gpt2": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "qwen2": ["down_proj"],
}
_BERT_LIKE = (r"(.*\.)?attention\.output\.dense", r"(.*\.)?layer\.\d+\.output\.dense")
_LLAMA_LIKE = ("self_attn.o_proj", "mlp.down_proj")
#: (attention output projection, feed-forward output projection) per transformers ``model_type``. BERT's
#: FFN output is ``layer.N.output.dense``; the plain suffix "output.dense" would also match
#: ``attention.output.dense``, hence the regexes.
ADAPTER_PLACEMENT: dict[str, tuple[str, str]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": (r"(.*\.)?attention\.out_lin", r"(.*\.)?ffn\.lin2"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}
