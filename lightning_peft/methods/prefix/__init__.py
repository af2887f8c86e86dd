"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
arXiv:2101.00190).

Every attention layer ``l`` of the frozen model gets ``P`` learned key and value vectors in front of its own:

    K_l' = [K^p_l; K_l],   V_l' = [V^p_l; V_l],   head_i = softmax(Q_i K_l'^T / √d + M') V_l'

with ``K^p_l, V^p_l ∈ R^{P×d_kv}`` (``d_kv`` = key/value heads × head size) and the mask ``M'`` letting every
query see all ``P`` prefix positions. All prefixes live in one matrix ``Θ ∈ R^{P × L·2·d_kv}`` whose columns
are ordered (layer, key/value, head, head dim), HF PEFT's ``prompt_embeddings`` layout. With
``prefix_projection`` (the paper's reparameterisation for stable training) ``Θ = MLP(E)`` with ``E ∈ R^{P×h}``
and ``MLP = Linear(h, encoder_hidden_size) → tanh → Linear(encoder_hidden_size, L·2·d_kv)``; after training
only the folded ``Θ`` is needed (:meth:`~lightning_peft.methods.prefix.layers.PrefixLayer.saved_tensors`).

The prefixes enter through the model's own key/value cache: the backbone receives a cache pre-filled with
them, so the real tokens sit at positions ``P … P+S-1`` (the same offset as HF PEFT, and as BERT prefix
tuning in P-Tuning v2), the attention mask gets ``P`` leading ones, and ``generate()`` keeps the prefix in
its cache from the first step on. This works for encoders (BERT) as for decoders (GPT-2, Llama). While
gradients are on, the cache only reads (it returns ``[K^p_l; K_l]`` and stores nothing) and a pre-hook on each
self-attention module supplies it where the model dropped the cache, so activation checkpointing (HF's or
torch's) recomputes every layer exactly; see :mod:`lightning_peft.methods.prefix.cache`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from lightning_peft.core.base_model import task_type_of
from lightning_peft.core.targeting import ModuleTargets, replace_module
from lightning_peft.methods._virtual_tokens import (
    cache_keyword,
    find_backbone,
    find_encoder_decoder,
    find_outer,
    input_embedding_weight,
    is_encoder_decoder,
    require_inputs,
)
from lightning_peft.methods.base import PEFTMethod, check_positive_int
from lightning_peft.methods.peft_interop import modules_to_save_from_peft
from lightning_peft.methods.prefix.interface import uses_attention_interface
from lightning_peft.methods.prefix.layers import (
    EncoderDecoderPrefixLayer,
    EncoderPrefixLayer,
    InterfacePrefixLayer,
    PrefixLayer,
    kv_geometry,
)
from lightning_peft.methods.prefix.seq2seq import (
    encoder_geometry,
    plan_encoder_prefix,
)
from lightning_peft.methods.registry import register_method


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
            "task_type": task_type_of(outer, default="FEATURE_EXTRACTION"),
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
