"""Prefix tuning for encoders whose forward takes no key/value cache (DistilBERT, ALBERT).

The prefix normally enters through the model's cache (:mod:`lightning_peft.methods.prefix`). DistilBERT and
ALBERT have none, but their attention calls go through transformers' attention interface
(``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``). While the wrapped backbone runs, its config points
at an attention function registered by lightning-peft, which puts layer ``l``'s prefix in front of the keys and
values and lets every query attend to it, then runs PyTorch's scaled-dot-product attention:

    head_i = softmax(Q_i [K^p_l; K]^T / √d + [0; M]) [V^p_l; V]

(the same formula as the cache route; the real tokens keep positions ``0 … S-1`` here, since nothing shifts
them). The layer index is the order of the attention calls within one forward, which also covers ALBERT's
layers that share one attention module. The config's attention implementation is put back after every call.
Activation checkpointing would call the attention again in backward, so it is refused with an error.

The same route puts a prefix into the encoder's self-attention of an encoder-decoder model
(``PrefixTuning(encoder_prefix=True)``, :class:`~lightning_peft.methods.prefix.layers.EncoderPrefixLayer`). T5 adds a
relative position bias to the scores; the prefix positions get none (they are position-free memory slots),
so the real tokens keep exactly the bias they had.

Models whose attention does not use the interface (``_supports_attention_backend`` false, e.g. DeBERTa-v2's
disentangled attention) cannot take a prefix this way and are refused at attach.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

#: the name under which the prefix attention (and its mask function, sdpa's) is registered in transformers
IMPLEMENTATION = "lightning_peft_prefix"
#: the prefix layers whose backbone is running (innermost last)
_ACTIVE: list[_Call] = []


class _Call:
    """One forward of a wrapped backbone: which prefix layer, and how many attention calls so far."""

    def __init__(self, owner: Any, layers: int) -> None:
        self.owner = owner
        self.layers = layers
        self.calls = 0


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function registered as :data:`IMPLEMENTATION`: ``[K^p_l; K]``, ``[V^p_l; V]``, then sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    call = _ACTIVE[-1]
    layer = call.calls
    call.calls += 1
    if layer >= call.layers:
        raise RuntimeError(
            f"prefix tuning on {type(call.owner.base_layer).__name__}: attention ran more often than the model "
            f"has layers ({call.layers}); activation checkpointing recomputes the attention, which this route "
            "(models without a key/value cache) does not support: disable gradient checkpointing"
        )
    keys, values = call.owner.layer_key_values(layer, key.shape[0], key.dtype)  # (B, kv_heads, P, head_dim)
    key = torch.cat([keys, key], dim=-2)  # (B, kv_heads, P+S, head_dim)
    value = torch.cat([values, value], dim=-2)
    if attention_mask is not None:  # (B, 1, S, S): every query sees the P prefix positions
        shape = (*attention_mask.shape[:-1], keys.shape[-2])
        visible = torch.ones if attention_mask.dtype == torch.bool else torch.zeros
        pad = visible(shape, dtype=attention_mask.dtype, device=attention_mask.device)
        attention_mask = torch.cat([pad, attention_mask], dim=-1)
    bias = kwargs.get("position_bias")
    if bias is not None:  # T5's relative bias, (1 or B, H, S, S): the prefix has no position, so no bias
        pad = torch.zeros((*bias.shape[:-1], keys.shape[-2]), dtype=bias.dtype, device=bias.device)
        kwargs["position_bias"] = torch.cat([pad, bias], dim=-1)  # (…, H, S, P+S)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, prefix_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def uses_attention_interface(backbone: nn.Module, declared: bool = True) -> bool:
    """Whether ``backbone``'s attention goes through transformers' attention interface: the model declares it
    (``_supports_attention_backend``), or, with ``declared=False``, its modeling code dispatches through
    ``ALL_ATTENTION_FUNCTIONS`` (T5 and BART do, without declaring it). Either way the forward then counts
    the attention calls, so a model that bypasses the interface fails loudly instead of losing the prefix."""
    config = getattr(backbone, "config", None)
    if not hasattr(config, "_attn_implementation"):
        return False
    if getattr(backbone, "_supports_attention_backend", False):
        return True
    return not declared and any(
        hasattr(sys.modules.get(type(m).__module__), "ALL_ATTENTION_FUNCTIONS") for m in backbone.modules()
    )


class InterfacePrefix:
    """The forward of :class:`~lightning_peft.methods.prefix.layers.InterfacePrefixLayer` (a mixin over
    ``PrefixLayer``, whose parameters and per-layer prefixes it uses; see the module docstring)."""

    base_layer: Any
    geometry: Any

    def install(self) -> None:  # no cache, no attention pre-hooks: the attention function gives the prefix
        register()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        checkpointed = any(
            getattr(m, "gradient_checkpointing", False) is True for m in self.base_layer.modules()
        )
        if checkpointed and torch.is_grad_enabled():
            raise RuntimeError(
                f"prefix tuning on {type(self.base_layer).__name__} (no key/value cache) does not support gradient "
                "checkpointing: the recomputed attention in backward would run without the prefix. Disable it "
                "(model.activation_checkpointing_disable(), gradient_checkpointing_disable() before transformers 5)"
            )
        config = self.base_layer.config
        original = config._attn_implementation
        call = _Call(self, self.geometry.layers)
        _ACTIVE.append(call)
        config._attn_implementation = IMPLEMENTATION
        try:
            output = self.base_layer(*args, **kwargs)
        finally:
            config._attn_implementation = original
            _ACTIVE.pop()
        if call.calls != self.geometry.layers:
            raise RuntimeError(
                f"prefix tuning on {type(self.base_layer).__name__}: {call.calls} attention calls for "
                f"{self.geometry.layers} layers; the prefix did not reach every layer"
            )
        return output
