"""The prefix layers: the learned key/value prefixes of every attention layer (``Θ``, optionally through the
reparameterisation MLP), handed to the backbone as a pre-filled key/value cache; one variant per way a model
takes its cache (decoder, encoder-decoder, attention interface, encoder)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_peft.methods._virtual_tokens import (
    VirtualTokenLayer,
    input_embedding_weight,
    prepend_ones,
)
from lightning_peft.methods.base import AdapterLinear
from lightning_peft.methods.prefix import cache as prefix_cache
from lightning_peft.methods.prefix.cache import has_hooks, install_hooks, make_read_only, remove_hooks
from lightning_peft.methods.prefix.interface import InterfacePrefix
from lightning_peft.methods.prefix.seq2seq import (
    NO_CACHE,
    EncoderDecoderPrefix,
)

NO_HOOK = (
    "the model dropped the key/value cache that carries the prefix (transformers does so inside "
    "gradient-checkpointed layers), and lightning-peft found no self-attention modules with a layer_idx and a "
    "cache argument to hand the prefix to directly; disable gradient checkpointing for prefix tuning, or use "
    "prompt tuning"
)


@dataclass(frozen=True)
class KVGeometry:
    """Shape of one attention layer's keys/values in a transformers model."""

    layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def kv_geometry(config: Any, method: str) -> KVGeometry:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        layers = int(text.num_hidden_layers)
        heads = int(text.num_attention_heads)
        hidden = int(text.hidden_size)
    except (AttributeError, TypeError) as error:
        raise ValueError(
            f"{method} needs num_hidden_layers, num_attention_heads and hidden_size in the model config: {error}"
        ) from error
    kv_heads = getattr(text, "num_key_value_heads", None) or getattr(text, "num_kv_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or getattr(text, "d_kv", None) or hidden // heads  # T5: d_kv
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        kv_heads = 1  # Falcon's original layout: one key/value head shared by all query heads
    return KVGeometry(layers, int(kv_heads), int(head_dim), hidden)


class PrefixLayer(VirtualTokenLayer):
    """A transformers backbone whose attention layers all see ``num_virtual_tokens`` learned keys/values."""

    peft_names: ClassVar[dict[str, str]] = {"prompt_embeddings": "prompt_embeddings"}
    shared_across_layers: ClassVar[bool] = True
    shift_positions = True  # PrefixTuning.shift_positions

    def __init__(
        self,
        base_layer: nn.Module,
        num_virtual_tokens: int,
        geometry: KVGeometry,
        prefix_projection: bool,
        encoder_hidden_size: int,
        wraps_outer: bool,
    ) -> None:
        super().__init__(base_layer, num_virtual_tokens, wraps_outer)
        self.geometry = geometry
        self.prefix_projection = prefix_projection
        weight = input_embedding_weight(base_layer, "PrefixTuning")
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        factory: dict[str, Any] = {"device": weight.device, "dtype": dtype}
        width = geometry.layers * 2 * geometry.kv_dim
        # N(0, 1) starts, like an nn.Embedding (HF PEFT's prefix encoder)
        if prefix_projection:
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, geometry.hidden_size, **factory))
            self.transform = nn.Sequential(
                AdapterLinear(geometry.hidden_size, encoder_hidden_size, **factory),
                nn.Tanh(),
                AdapterLinear(encoder_hidden_size, width, **factory),
            )
        else:
            self.prompt_embeddings = nn.Parameter(torch.randn(num_virtual_tokens, width, **factory))
        # attention layers that received the prefix from the read-only cache in the current forward
        self.layers_used: set[int] = set()
        self.install()

    def install(self) -> None:
        """Hook the self-attention modules (see :mod:`lightning_peft.methods.prefix.cache`)."""
        install_hooks(self, self.base_layer, self.geometry.layers)

    def reset_parameters(self) -> None:
        """N(0, 1) prefixes (or MLP inputs), like an ``nn.Embedding``."""
        param = self.embedding if self.prefix_projection else self.prompt_embeddings
        if param.device.type != "meta":
            with torch.no_grad():
                param.normal_()

    def prefix_matrix(self) -> torch.Tensor:
        """Θ, shape (P, L·2·d_kv): the plain prefixes (through the MLP with ``prefix_projection``)."""
        if self.prefix_projection:
            return self.transform(self.embedding)
        return self.prompt_embeddings

    def saved_tensors(self) -> dict[str, torch.Tensor] | None:
        """What HF PEFT writes for this layer: the folded prefixes, without the reparameterisation MLP."""
        if not self.prefix_projection:
            return None
        with torch.no_grad():
            return {"prompt_embeddings": self.prefix_matrix().detach().clone()}

    def layer_key_values(
        self, layer: int, batch: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s prefix keys and values, each (B, kv_heads, P, head_dim), computed from the
        parameters (only this layer's columns of Θ)."""
        g, p = self.geometry, self.num_virtual_tokens
        width = 2 * g.kv_dim
        columns = slice(layer * width, (layer + 1) * width)
        if self.prefix_projection:
            first, activation, last = self.transform
            theta = nn.functional.linear(
                activation(first(self.embedding)), last.weight[columns], last.bias[columns]
            )
        else:
            theta = self.prompt_embeddings[:, columns]  # (P, 2·d_kv)
        theta = theta.to(dtype).reshape(p, 2, g.kv_heads, g.head_dim).permute(1, 2, 0, 3)  # (2, kv, P, hd)
        keys, values = theta.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # each (B, kv_heads, P, head_dim)
        return keys, values

    def unload(self) -> nn.Module:
        remove_hooks(self, self.base_layer)
        return self.base_layer

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.base_layer.config)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = self.bind(args, kwargs)
        cache = self.pop_cache(kwargs)
        p = self.num_virtual_tokens
        batch, length, device = self.batch_and_length(kwargs)
        # with gradients on and no cache from the caller (training), a cache that only reads, so that a layer
        # recomputed for activation checkpointing does not append its keys twice (see _prefix_cache)
        # and when the caller asked for none: generate(use_cache=False) passes the returned cache back with the
        # whole sequence again, which must not meet its own keys twice
        read_only = cache is None and (torch.is_grad_enabled() or kwargs.get("use_cache") is False)
        # an empty cache (training, or the first step of generate) gets the prefix; a filled one has it
        prefilled = self.cache_length(cache) == 0
        if prefilled:
            cache = self.new_cache() if cache is None else cache
            # the model's compute dtype (it may have been cast after the prefix was created)
            weight = self.base_layer.get_input_embeddings().weight
            dtype = weight.dtype if weight.is_floating_point() else torch.float32
            # read-only: the filled-in prefix only sizes the cache (length, masks); update() hands out the prefix
            with torch.no_grad() if read_only else contextlib.nullcontext():
                for layer in range(self.geometry.layers):
                    cache.update(*self.layer_key_values(layer, batch, dtype), layer)
            if read_only:
                make_read_only(cache, self)
        past = self.cache_length(cache)  # P + real tokens seen before this call
        mask = kwargs.get("attention_mask")
        if mask is None:
            # encoders size their mask from it, so make the all-ones mask explicit
            mask = torch.ones(batch, past - p + length, dtype=torch.long, device=device)
        kwargs["attention_mask"] = prepend_ones(mask, p)  # (B, P + past real + S)
        prefix_cache.place_positions(kwargs, p, self.shift_positions, past - p, (batch, length), device)
        kwargs[self._cache_key] = cache
        self.layers_used = set()
        name = type(self.base_layer).__name__
        try:
            output = self.base_layer(**kwargs)
        except (RuntimeError, ValueError) as error:
            # without a prefix the keys are P shorter than the mask: name the cause, not the shape mismatch
            if read_only and not self.layers_used and not has_hooks(self, self.base_layer):
                raise RuntimeError(f"{name}: the attention layers got no prefix: {NO_HOOK}") from error
            raise
        if read_only and len(self.layers_used) < self.geometry.layers:
            missing = sorted(set(range(self.geometry.layers)) - self.layers_used)
            raise RuntimeError(f"{name}: attention layers {missing} got no prefix: {NO_HOOK}")
        # (GPT-2 drops the cache in checkpointed training mode even without gradients: the hooks then gave it)
        if not read_only and prefilled and self.cache_length(cache) == p and not self.layers_used:
            raise RuntimeError(f"{name}: {NO_CACHE}")
        return output

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"num_virtual_tokens={self.num_virtual_tokens}, layers={g.layers}, kv_dim={g.kv_dim}, "
            f"prefix_projection={self.prefix_projection}"
        )


class EncoderDecoderPrefixLayer(EncoderDecoderPrefix, PrefixLayer):
    """Prefix tuning on the decoder of an encoder-decoder model, in HF PEFT's layout
    (:mod:`lightning_peft.methods.prefix.seq2seq`)."""


class InterfacePrefixLayer(InterfacePrefix, PrefixLayer):
    """Prefix tuning through the attention interface, for encoders without a key/value cache
    (:mod:`lightning_peft.methods.prefix.interface`)."""


class EncoderPrefixLayer(InterfacePrefixLayer):
    """The encoder's self-attention prefixes of an encoder-decoder model (``encoder_prefix=True``), given through
    the attention interface; saved as ``encoder_prompt_embeddings`` beside HF PEFT's ``prompt_embeddings``."""

    peft_names: ClassVar[dict[str, str]] = {"prompt_embeddings": "encoder_prompt_embeddings"}
