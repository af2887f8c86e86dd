"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
arXiv:2101.00190).

Every attention layer ``l`` of the frozen model gets ``P`` learned key and value vectors in front of its own:

    K_l' = [K^p_l; K_l],   V_l' = [V^p_l; V_l],   head_i = softmax(Q_i K_l'^T / √d + M') V_l'

with ``K^p_l, V^p_l ∈ R^{P×d_kv}`` (``d_kv`` = key/value heads × head size) and the mask ``M'`` letting every
query see all ``P`` prefix positions. All prefixes live in one matrix ``Θ ∈ R^{P × L·2·d_kv}`` whose columns
are ordered (layer, key/value, head, head dim), HF PEFT's ``prompt_embeddings`` layout. With
``prefix_projection`` (the paper's reparameterisation for stable training) ``Θ = MLP(E)`` with ``E ∈ R^{P×h}``
and ``MLP = Linear(h, encoder_hidden_size) → tanh → Linear(encoder_hidden_size, L·2·d_kv)``; after training
only the folded ``Θ`` is needed (:meth:`PrefixLayer.saved_tensors`).

The prefixes enter through the model's own key/value cache: the backbone receives a cache pre-filled with
them, so the real tokens sit at positions ``P … P+S-1`` (the same offset as HF PEFT, and as BERT prefix
tuning in P-Tuning v2), the attention mask gets ``P`` leading ones, and ``generate()`` keeps the prefix in
its cache from the first step on. This works for encoders (BERT) as for decoders (GPT-2, Llama). While
gradients are on, the cache only reads (it returns ``[K^p_l; K_l]`` and stores nothing) and a pre-hook on each
self-attention module supplies it where the model dropped the cache, so activation checkpointing (HF's or
torch's) recomputes every layer exactly; see :mod:`lightning_peft.methods._prefix_cache`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_peft.methods import _prefix_cache
from lightning_peft.methods._prefix_cache import has_hooks, install_hooks, make_read_only, remove_hooks
from lightning_peft.methods._prefix_interface import InterfacePrefix, uses_attention_interface
from lightning_peft.methods._prefix_seq2seq import (
    NO_CACHE,
    EncoderDecoderPrefix,
    encoder_geometry,
    plan_encoder_prefix,
)
from lightning_peft.methods._virtual_tokens import (
    VirtualTokenLayer,
    cache_keyword,
    find_backbone,
    find_encoder_decoder,
    find_outer,
    input_embedding_weight,
    is_encoder_decoder,
    prepend_ones,
    require_inputs,
    task_type_of,
)
from lightning_peft.methods.base import AdapterLinear, PEFTMethod, check_positive_int
from lightning_peft.methods.peft_interop import modules_to_save_from_peft
from lightning_peft.methods.registry import register_method
from lightning_peft.targeting import ModuleTargets, replace_module

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
        """Hook the self-attention modules (see :mod:`lightning_peft.methods._prefix_cache`)."""
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
        read_only = cache is None and torch.is_grad_enabled()
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
        _prefix_cache.place_positions(kwargs, p, self.shift_positions, past - p, (batch, length), device)
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
    (:mod:`lightning_peft.methods._prefix_seq2seq`)."""


class InterfacePrefixLayer(InterfacePrefix, PrefixLayer):
    """Prefix tuning through the attention interface, for encoders without a key/value cache
    (:mod:`lightning_peft.methods._prefix_interface`)."""


class EncoderPrefixLayer(InterfacePrefixLayer):
    """The encoder's self-attention prefixes of an encoder-decoder model (``encoder_prefix=True``), given through
    the attention interface; saved as ``encoder_prompt_embeddings`` beside HF PEFT's ``prompt_embeddings``."""

    peft_names: ClassVar[dict[str, str]] = {"prompt_embeddings": "encoder_prompt_embeddings"}


@register_method
@dataclass
class PrefixTuning(PEFTMethod):
    """Prefix tuning (Li & Liang 2021): ``P`` learned keys and values before the real ones in every attention
    layer, ``softmax(Q [K^p; K]^T / √d) [V^p; V]``, optionally reparameterised by an MLP. Not mergeable."""

    method_name: ClassVar[str] = "prefix"
    #: the layers this method puts into a model (the participation check finds them by type)
    layer_types: ClassVar[tuple[type, ...]] = (
        PrefixLayer,
        EncoderDecoderPrefixLayer,
        InterfacePrefixLayer,
        EncoderPrefixLayer,
    )

    num_virtual_tokens: int = 20
    """Number P of prefix positions in every attention layer (a positive integer)."""
    prefix_projection: bool = False
    """Train the prefixes through an MLP, Θ = MLP(E) (the paper's reparameterisation); the saved adapter holds
    the folded Θ only."""
    encoder_hidden_size: int = 512
    """Hidden width of the reparameterisation MLP (used with prefix_projection)."""
    cross_attention_prefix: bool = False
    """Encoder-decoder models only: also give the decoder's cross-attention the prefix blocks that HF PEFT's
    layout reserves for it (HF PEFT itself leaves them unused, so outputs then differ from HF PEFT's)."""
    encoder_prefix: bool = False
    """Encoder-decoder models only: also give every encoder self-attention layer its own P prefix keys/values
    (HF PEFT has none there; they are saved as encoder_prompt_embeddings, which HF PEFT does not read)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter, e.g. ["classifier"] for a new head."""
    shift_positions: bool = True
    """Real tokens at positions P…P+S-1 behind the prefix (HF PEFT), or 0…S-1 if False (AdapterHub)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.num_virtual_tokens, "num_virtual_tokens")
        check_positive_int(self.encoder_hidden_size, "encoder_hidden_size")
        for argument in ("prefix_projection", "cross_attention_prefix", "encoder_prefix", "shift_positions"):
            if not isinstance(getattr(self, argument), bool):
                raise ValueError(f"{argument} must be true or false, got {getattr(self, argument)!r}")

    def wrapped(self, model: nn.Module) -> tuple[str, nn.Module, bool, bool]:
        """(module to wrap, outer transformers model, whether it is the outer model, encoder-decoder)."""
        _, outer = find_outer(model, type(self).__name__)
        if is_encoder_decoder(outer):
            _, _, decoder = find_encoder_decoder(model, type(self).__name__)
            return decoder, outer, False, True
        name, outer, wraps_outer = find_backbone(model, type(self).__name__)
        return name, outer, wraps_outer, False

    def plan(self, model: nn.Module) -> ModuleTargets:
        name, outer, _, seq2seq = self.wrapped(model)
        backbone = model.get_submodule(name)
        require_inputs(backbone, ("attention_mask",), type(self).__name__)
        input_embedding_weight(backbone, type(self).__name__)
        if cache_keyword(backbone) is None and not uses_attention_interface(backbone):
            raise ValueError(
                f"{type(self).__name__}: {type(backbone).__name__}.forward takes no key/value cache, which prefix "
                "tuning uses to add the prefixes, and its attention does not use transformers' attention "
                "interface, the other way in"
            )
        geometry = kv_geometry(outer.config, type(self).__name__)
        if geometry.kv_dim <= 0 or geometry.layers <= 0:
            raise ValueError(
                f"{type(self).__name__}: cannot read the attention layout of {type(outer).__name__}"
            )
        decoder_layers = getattr(outer.config, "num_decoder_layers", None) or getattr(
            outer.config, "decoder_layers", None
        )
        if seq2seq and decoder_layers is not None and int(decoder_layers) != geometry.layers:
            raise ValueError(
                f"{type(self).__name__}: {type(outer).__name__} has {decoder_layers} decoder layers but "
                f"num_hidden_layers={geometry.layers}; HF PEFT's encoder-decoder prefix layout (one prefix layer "
                "per decoder layer) needs them equal"
            )
        if not self.encoder_prefix:
            return [name]
        return [name, plan_encoder_prefix(model, outer, seq2seq, type(self).__name__)]

    def inject(self, model: nn.Module, targets: ModuleTargets) -> None:
        name, outer, wraps_outer, seq2seq = self.wrapped(model)
        backbone = model.get_submodule(name)
        geometry = kv_geometry(outer.config, type(self).__name__)
        cls = PrefixLayer if cache_keyword(backbone) is not None else InterfacePrefixLayer
        layer = (EncoderDecoderPrefixLayer if seq2seq else cls)(
            backbone,
            self.num_virtual_tokens,
            geometry,
            self.prefix_projection,
            self.encoder_hidden_size,
            wraps_outer,
        )
        layer.shift_positions = self.shift_positions
        if seq2seq:
            layer.cross_attention_prefix = self.cross_attention_prefix
        replace_module(model, name, layer)
        if self.encoder_prefix:
            encoder = targets[1]
            geometry = encoder_geometry(outer.config, geometry)  # the decoder's, with the encoder's counts
            layer = EncoderPrefixLayer(
                model.get_submodule(encoder),
                self.num_virtual_tokens,
                geometry,
                self.prefix_projection,
                self.encoder_hidden_size,
                False,
            )
            replace_module(model, encoder, layer)

    def saved_config(self) -> PrefixTuning:
        """The configuration of the adapter files that save_adapter writes: they hold the folded prefixes."""
        return dataclasses.replace(self, prefix_projection=False)

    # -- HF PEFT interop ------------------------------------------------------------------------------
    def peft_config(self, model: nn.Module) -> dict[str, Any] | None:
        _, outer, _, seq2seq = self.wrapped(model)
        geometry = kv_geometry(outer.config, type(self).__name__)
        return {
            "peft_type": "PREFIX_TUNING",
            "task_type": task_type_of(outer),
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": geometry.kv_dim,
            "num_transformer_submodules": 2 if seq2seq else 1,
            "num_attention_heads": geometry.kv_heads,
            "num_layers": geometry.layers,
            "encoder_hidden_size": self.encoder_hidden_size,
            "prefix_projection": self.prefix_projection,
            "inference_mode": True,
            "base_model_name_or_path": getattr(outer.config, "_name_or_path", None) or None,
            "modules_to_save": list(self.modules_to_save) or None,
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> PrefixTuning | None:
        if config.get("peft_type") != "PREFIX_TUNING":
            return None
        # HF PEFT always saves the folded prefixes, whatever prefix_projection was during training
        return cls(
            num_virtual_tokens=int(config["num_virtual_tokens"]),
            encoder_hidden_size=int(config.get("encoder_hidden_size") or 512),
            modules_to_save=modules_to_save_from_peft(config.get("modules_to_save")),
        )
