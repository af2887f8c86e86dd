"""How prefix tuning hands its prefixes to the attention layers while gradients are on.

Outside autograd (evaluation, ``generate``) the backbone gets an ordinary key/value cache pre-filled with the
prefixes, and each attention layer appends its real keys and values to it. That cache is *written* by every
layer, which breaks activation checkpointing: the backward pass re-runs each layer, which would append the
same keys a second time, and transformers therefore drops the cache inside checkpointed layers (GPT-2 even
at the model level). So whenever gradients are on, the prefix comes from a cache that only *reads*:

* the backbone's ``DynamicCache`` holds a detached copy of the prefixes, so that the model's own bookkeeping
  (``get_seq_length``, mask sizes, positions offset by ``P``) sees them, and :func:`make_read_only` replaces
  its ``update`` by :class:`PrefixKeyValues`'s, which returns ``[prefix_l; new]`` and stores nothing, so a
  recomputed layer gets exactly what it got the first time;
* :class:`PrefixAttentionHook`, a forward pre-hook on every self-attention module, gives the attention a
  :class:`PrefixKeyValues` when the model passed it no cache (what checkpointed layers receive).

``PrefixKeyValues`` computes ``prefix_l`` from the trainable parameters on every call. With reentrant
checkpointing the recomputed layer back-propagates on its own, so the prefix must be part of the recomputed
graph rather than a tensor shared by all layers (the reparameterisation MLP's graph would otherwise be
traversed, and freed, once per layer).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from lightning_peft.methods._virtual_tokens import CACHE_KEYS, forward_parameters

#: names under which attention modules take their key/value cache (older transformers: the singular)
ATTENTION_CACHE_KEYS = (*CACHE_KEYS, "past_key_value")


class PrefixSource(Protocol):
    """The part of :class:`~lightning_peft.methods.prefix.layers.PrefixLayer` this module needs."""

    num_virtual_tokens: int
    #: the layers that received their prefix through :class:`PrefixKeyValues` in the current forward
    layers_used: set[int]

    def layer_key_values(
        self, layer: int, batch: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class PrefixKeyValues:
    """A key/value cache for one forward pass that holds only the prefix and never stores anything."""

    def __init__(self, owner: PrefixSource) -> None:
        self.owner = owner

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: (B, kv_heads, S, head_dim)
        self.owner.layers_used.add(layer_idx)
        batch, dtype = key_states.shape[0], key_states.dtype
        keys, values = self.owner.layer_key_values(layer_idx, batch, dtype)  # (B, kv_heads, P, head_dim)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.owner.num_virtual_tokens


def make_read_only(cache: Any, owner: PrefixSource) -> None:
    """``cache`` (filled with the prefix) keeps its length for the model's bookkeeping but stores nothing more:
    its ``update`` becomes :class:`PrefixKeyValues`'s."""
    cache.update = PrefixKeyValues(owner).update  # an instance attribute: this cache object only


class PrefixAttentionHook:
    """Forward pre-hook (``with_kwargs=True``) of a self-attention module: no cache in, the prefix's in.

    A picklable object rather than a closure, so that ``copy.deepcopy`` and ``ddp_spawn`` carry the hook
    with the model and point it at the copied prefix parameters.
    """

    def __init__(self, owner: nn.Module, keyword: str, position: int) -> None:
        self.owner = owner
        self.keyword = keyword
        self.position = position  # index of the keyword among forward's positional parameters

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        positional = self.keyword not in kwargs and len(args) > self.position
        given = args[self.position] if positional else kwargs.get(self.keyword)
        if given is not None:
            return None
        stand_in = PrefixKeyValues(self.owner)  # type: ignore[arg-type]
        if positional:
            return (*args[: self.position], stand_in, *args[self.position + 1 :]), kwargs
        return args, {**kwargs, self.keyword: stand_in}


def _cache_parameter(module: nn.Module) -> tuple[str, int] | None:
    parameters = forward_parameters(module)
    keyword = next((k for k in ATTENTION_CACHE_KEYS if k in parameters), None)
    return None if keyword is None else (keyword, parameters.index(keyword))


def self_attention_modules(backbone: nn.Module) -> dict[int, tuple[nn.Module, str, int]]:
    """``layer_idx -> (module, cache keyword, its position)`` for the innermost modules of ``backbone`` that
    take a key/value cache and know their layer (``layer_idx``), cross-attention left out."""
    found: dict[str, tuple[int, nn.Module, str, int]] = {}
    for name, module in backbone.named_modules():
        layer = getattr(module, "layer_idx", None)
        if not isinstance(layer, int) or isinstance(layer, bool):
            continue
        if getattr(module, "is_cross_attention", False) or "CrossAttention" in type(module).__name__:
            continue
        parameter = _cache_parameter(module)
        if parameter is not None:
            found[name] = (layer, module, *parameter)
    inner = {
        n: v for n, v in found.items() if not any(o != n and o.startswith(f"{n}.") for o in found)
    }  # BertAttention wraps BertSelfAttention: the cache is used by the inner one
    layers: dict[int, tuple[nn.Module, str, int]] = {}
    for layer, module, keyword, position in inner.values():
        if layer in layers:
            return {}  # two self-attentions per layer index: an unknown layout, give no prefix by hook
        layers[layer] = (module, keyword, position)
    return layers


def install_hooks(owner: nn.Module, backbone: nn.Module, layers: int) -> None:
    """Hook every self-attention module of ``backbone``; nothing unless exactly one per layer ``0 … layers-1``
    is found (a checkpointed forward then fails with an error instead of losing the prefix)."""
    attention = self_attention_modules(backbone)
    if sorted(attention) != list(range(layers)):
        return
    for module, keyword, position in attention.values():
        module.register_forward_pre_hook(PrefixAttentionHook(owner, keyword, position), with_kwargs=True)


def _hooks_of(owner: nn.Module, backbone: nn.Module) -> list[tuple[nn.Module, int]]:
    """``(module, hook id)`` of every :class:`PrefixAttentionHook` of ``owner`` in ``backbone``."""
    return [
        (module, key)
        for module in backbone.modules()
        for key, hook in module._forward_pre_hooks.items()
        if isinstance(hook, PrefixAttentionHook) and hook.owner is owner
    ]


def has_hooks(owner: nn.Module, backbone: nn.Module) -> bool:
    return bool(_hooks_of(owner, backbone))


def remove_hooks(owner: nn.Module, backbone: nn.Module) -> None:
    for module, key in _hooks_of(owner, backbone):
        del module._forward_pre_hooks[key]
        module._forward_pre_hooks_with_kwargs.pop(key, None)


def place_positions(
    kwargs: dict[str, Any], p: int, shift: bool, start: int, shape: tuple[int, int], device: torch.device
) -> None:
    """Position ids for the real tokens behind a P-long prefix, in ``kwargs``: shifted by P (``shift``, HF
    PEFT's layout; absent ids are left to the model, which counts from the cache length, P included), else
    unshifted: ``start … start+S-1`` (AdapterHub's layout)."""
    given = kwargs.get("position_ids")
    if shift:
        if given is not None:
            kwargs["position_ids"] = given + p
    elif given is None:
        batch, length = shape
        kwargs["position_ids"] = torch.arange(start, start + length, device=device).expand(
            batch, -1
        )  # (B, S)
