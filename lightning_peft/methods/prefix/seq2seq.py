"""Prefix tuning on encoder-decoder models (T5, BART), laid out as HF PEFT lays it out.

HF PEFT (``num_transformer_submodules=2``) reserves prefixes for every decoder layer's self-attention *and*
cross-attention, and none for the encoder. The prefix matrix is the same ``Θ ∈ R^{P × L·2·d_kv}`` as for a
decoder-only model (``L`` = the model's ``num_hidden_layers``), whose column blocks ``b = 0 … 2L-1`` (each
``d_kv`` wide) alternate keys and values of "prefix layer" ``b // 2``. HF PEFT duplicates the block list and
hands decoder layer ``i`` the four consecutive blocks ``4i … 4i+3`` (modulo ``2L``):

    decoder layer i:   self-attention  [K^p; K], [V^p; V]          from prefix layer (2i) mod L
                       cross-attention [K^p; K_enc], [V^p; V_enc]  from prefix layer (2i + 1) mod L

HF PEFT 0.21 with transformers ≥ 4.56 then empties the cross-attention half of the cache, so only the
decoder's self-attention gets a prefix; that is the default here too (outputs equal to HF PEFT's, files
interchangeable). ``PrefixTuning(cross_attention_prefix=True)`` also gives the cross-attention its reserved
blocks (more capacity; the same file format, but HF PEFT ignores those blocks).

The prefixes enter through the decoder's ``EncoderDecoderCache``: its self-attention half is pre-filled, so the
decoder's own keys follow the prefix (positions offset by ``P``, as in HF PEFT). With the cross-attention
prefix its half is pre-filled but not marked as computed, so each cross-attention appends the encoder's
keys/values after the prefix on the first call and reuses them on later ``generate`` steps, and the
cross-attention mask gets ``P`` leading ones. The decoder's own attention mask always gets ``P`` leading ones.

HF PEFT gives the encoder no prefix. ``PrefixTuning(encoder_prefix=True)`` adds one: a second prefix matrix
``Θ_enc ∈ R^{P × L_enc·2·d_kv}`` (same column layout, one block pair per encoder layer) on a layer that wraps
the encoder and hands layer ``l``'s prefix to its self-attention through transformers' attention interface
(:mod:`lightning_peft.methods.prefix.interface`):

    encoder layer l:   self-attention  [K^p_l; K], [V^p_l; V]    from Θ_enc, every query sees all P

The encoder has no cache to carry it (its forward takes none). The decoder part is unchanged, so a file
written with it still loads in HF PEFT, which reads ``prompt_embeddings`` and skips ``encoder_prompt_embeddings``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lightning_peft.methods._virtual_tokens import find_encoder_decoder
from lightning_peft.methods.prefix.interface import uses_attention_interface

#: the error when the decoder did not use the cache that carries the prefix
NO_CACHE = "the model did not use its key/value cache, which carries the prefix"


class EncoderDecoderPrefix:
    """The encoder-decoder forward of :class:`~lightning_peft.methods.prefix.layers.EncoderDecoderPrefixLayer` (a
    mixin over ``PrefixLayer``, whose parameters and per-layer prefixes it uses; see the module docstring)."""

    base_layer: Any
    num_virtual_tokens: int
    geometry: Any
    _cache_key: str
    bind: Any
    pop_cache: Any
    batch_and_length: Any
    cache_length: Any
    layer_key_values: Any

    #: also prefix the cross-attention (see the module docstring); set by PrefixTuning.inject
    cross_attention_prefix: bool = False

    def install(self) -> None:  # no attention pre-hooks: the decoder always receives its cache
        pass

    def new_cache(self) -> Any:
        from transformers import DynamicCache, EncoderDecoderCache

        config = self.base_layer.config
        return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = self.bind(args, kwargs)
        cache = self.pop_cache(kwargs)
        p, layers = self.num_virtual_tokens, self.geometry.layers
        batch, length, device = self.batch_and_length(kwargs)
        prefilled = self.cache_length(cache) == 0
        if prefilled:
            cache = (
                self.new_cache() if cache is None or not hasattr(cache, "cross_attention_cache") else cache
            )
            weight = self.base_layer.get_input_embeddings().weight
            dtype = weight.dtype if weight.is_floating_point() else torch.float32
            for layer in range(layers):
                cache.self_attention_cache.update(
                    *self.layer_key_values((2 * layer) % layers, batch, dtype), layer
                )
                if self.cross_attention_prefix:
                    cross = self.layer_key_values((2 * layer + 1) % layers, batch, dtype)
                    cache.cross_attention_cache.update(*cross, layer)
                cache.is_updated[layer] = False  # the encoder's keys still have to be computed (and appended)
        past = self.cache_length(cache)  # P + decoder tokens seen before this call
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = torch.cat(
                [torch.ones(batch, p, dtype=mask.dtype, device=mask.device), mask], dim=1
            )
        states, cross_mask = kwargs.get("encoder_hidden_states"), kwargs.get("encoder_attention_mask")
        if states is not None and self.cross_attention_prefix:
            if cross_mask is None:
                cross_mask = torch.ones(batch, states.shape[1], dtype=torch.long, device=device)
            ones = torch.ones(batch, p, dtype=cross_mask.dtype, device=cross_mask.device)
            kwargs["encoder_attention_mask"] = torch.cat([ones, cross_mask], dim=1)  # (B, P + S_enc)
        kwargs[self._cache_key] = cache
        kwargs["use_cache"] = True  # the prefix lives in the cache
        output = self.base_layer(**kwargs)
        if prefilled and self.cache_length(cache) == past and length > 0:
            raise RuntimeError(f"{type(self.base_layer).__name__}: {NO_CACHE}")
        return output


def encoder_geometry(config: Any, decoder: Any) -> Any:
    """The encoder's key/value layout: the decoder's (``decoder``, a ``KVGeometry``) with the encoder's layer
    and head counts (BART: ``encoder_layers``/``encoder_attention_heads``; T5: ``num_layers``/``num_heads``)."""
    layers = getattr(config, "encoder_layers", None) or getattr(config, "num_layers", None) or decoder.layers
    heads = (
        getattr(config, "encoder_attention_heads", None)
        or getattr(config, "num_heads", None)
        or decoder.kv_heads
    )
    head_dim = getattr(config, "d_kv", None) or decoder.hidden_size // int(heads)
    return dataclasses.replace(decoder, layers=int(layers), kv_heads=int(heads), head_dim=int(head_dim))


def plan_encoder_prefix(model: nn.Module, outer: nn.Module, seq2seq: bool, method: str) -> str:
    """The name of the encoder that ``encoder_prefix=True`` wraps, or an error saying why it cannot."""
    if not seq2seq:
        raise ValueError(
            f"{method}: encoder_prefix=True is for encoder-decoder models (T5, BART); {type(outer).__name__} is "
            "not one, and its prefix already reaches every self-attention layer (use encoder_prefix=False)"
        )
    _, encoder_name, _ = find_encoder_decoder(model, method)
    encoder = model.get_submodule(encoder_name)
    if not uses_attention_interface(encoder, declared=False):
        raise ValueError(
            f"{method}: encoder_prefix=True needs the encoder's attention to run through transformers' attention "
            f"interface; {type(encoder).__name__} of {type(outer).__name__} does not"
        )
    return encoder_name
