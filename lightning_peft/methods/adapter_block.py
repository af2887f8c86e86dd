"""Bottleneck adapters placed around a sub-layer's residual add and LayerNorm: the layouts of Pfeiffer et al.
2021 (arXiv:2005.00247), He et al. 2022's parallel adapter (arXiv:2110.04366), and AdapterHub's options.

A post-LayerNorm transformer block (BERT, RoBERTa) ends each sub-layer with an *output block*
``out(x, r) = LN(dropout(W x + b) + r)``, ``r`` being the sub-layer's input (its residual). With
``h = dropout(W x + b)`` and the adapter's MLP ``A(z) = s · W_up act(W_down LN_a(z) + b_down) + b_up·s``
(``s`` = ``scaling``; ``LN_a`` only with ``ln_before``), the block becomes

* sequential, ``original_ln_before=False`` (Houlsby):  ``LN(h + A(h) + r)``;
* sequential, ``original_ln_before=True`` (Pfeiffer):  ``z = LN(h + r)``, then ``LN(A(z) + ρ + r)`` with the
  adapter's residual ``ρ = h`` (``residual_before_ln=True``), ``h + r`` (``"post_add"``) or ``z`` (``False``);
* parallel:  ``LN(h + A(r) + r)``: the adapter reads the sub-layer's input.

``ln_after`` puts a trained LayerNorm ``LN_b`` on the adapter's output, after adding ``ρ`` when
``adapter_residual_before_ln`` (``LN_b(A(z) + ρ)``), else before (``LN_b(A(z)) + ρ``). The sub-layer's dropout
comes before the adapter, as in AdapterHub; in eval mode this is the plain Adapter of
:mod:`lightning_peft.methods.adapter` when no option is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_peft.methods.base import ADAPTER_ROUTING, AdapterLinear, PEFTLayer, ZeroLinear

#: attributes an output block must have for the block layouts (BERT's BertOutput / BertSelfOutput)
BLOCK_PARTS = ("dense", "dropout", "LayerNorm")
RESIDUAL_CHOICES = (True, False, "post_add")


@dataclass(frozen=True)
class BlockLayout:
    """The options of one block adapter (see the module docstring)."""

    original_ln_before: bool = False
    residual_before_ln: bool | str = True
    parallel: bool = False
    scaling: float = 1.0
    ln_before: bool = False
    ln_after: bool = False
    adapter_residual_before_ln: bool = False


def is_output_block(module: nn.Module) -> bool:
    """Whether ``module`` is a post-LayerNorm output block: ``dense``, ``dropout`` and ``LayerNorm`` children."""
    return all(isinstance(getattr(module, part, None), nn.Module) for part in BLOCK_PARTS)


class BlockAdapterLayer(PEFTLayer):
    """An output block ``LN(dropout(dense(x)) + r)`` with a bottleneck adapter inside (module docstring)."""

    def __init__(
        self, base_layer: nn.Module, bottleneck_size: int, activation: nn.Module, layout: BlockLayout
    ) -> None:
        super().__init__()
        if not is_output_block(base_layer):
            raise TypeError(
                f"BlockAdapterLayer needs an output block with {', '.join(BLOCK_PARTS)} children (BERT's "
                f"BertOutput), got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        dense = base_layer.dense
        features = int(dense.out_features)
        factory: dict[str, Any] = {"device": dense.weight.device}
        if dense.weight.is_floating_point():
            factory["dtype"] = dense.weight.dtype
        self.features = features
        self.bottleneck_size = bottleneck_size
        self.layout = layout
        if layout.ln_before:
            self.adapter_norm_before = nn.LayerNorm(features, **factory)
        self.adapter_down = AdapterLinear(features, bottleneck_size, **factory)
        self.adapter_act = activation
        self.adapter_up = ZeroLinear(bottleneck_size, features, **factory)
        if layout.ln_after:
            self.adapter_norm_after = nn.LayerNorm(features, **factory)

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        """``s · (W_up act(W_down LN_a(z) + b_down) + b_up)``: (..., d) -> (..., d)."""
        if self.layout.ln_before:
            z = self.adapter_norm_before(z)
        return self.adapter_up(self.adapter_act(self.adapter_down(z))) * self.layout.scaling

    def adapter_output(self, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The adapter's output with its own residual ``ρ`` and optional ``LN_b``."""
        out = self.bottleneck(z)
        if not self.layout.ln_after:
            return out + residual
        if self.layout.adapter_residual_before_ln:
            return self.adapter_norm_after(out + residual)
        return self.adapter_norm_after(out) + residual

    def plain_block(self) -> tuple[nn.Module, list[BlockAdapterLayer]]:
        """The output block below this layer, and the active block adapters between (innermost first): they
        run stacked with this one (``Stack``), any other active wrapper is refused."""
        block, below = self.base_layer, []
        routed = ADAPTER_ROUTING.get() is not None  # per-sample routing: each sample uses one adapter
        while isinstance(block, PEFTLayer):
            if block.active and not routed:
                if not isinstance(block, BlockAdapterLayer):
                    raise RuntimeError(
                        f"adapter {block.adapter_name!r} ({type(block).__name__}) is active inside the block adapter "
                        f"{self.adapter_name!r}; switch one off (set_adapter)"
                    )
                below.insert(0, block)
            block = block.base_layer
        return block, below

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        block, below = self.plain_block()
        stack = [*below, self]  # one adapter, or a Stack (ops/composition.py): each feeds the next
        layout = stack[0].layout
        if len(stack) > 1 and any(layer.layout.parallel for layer in stack):
            raise RuntimeError(
                f"parallel adapters cannot be stacked: {[layer.adapter_name for layer in stack]}"
            )
        h = block.dropout(block.dense(hidden_states))  # (B, T, d): the sub-layer's output
        dtype = h.dtype
        h, r = h.to(self.adapter_down.weight.dtype), input_tensor.to(self.adapter_down.weight.dtype)
        if layout.parallel:
            a = self.bottleneck(r)
            if layout.ln_after:
                a = self.adapter_norm_after(a)
            return block.LayerNorm((h + a + r).to(dtype))
        x = h
        for layer in stack:  # AdapterHub's Stack: each adapter reads the previous one's output as its h
            z, residual = layer.adapter_input(x, r, block.LayerNorm)
            x = layer.adapter_output(z, residual)
        return block.LayerNorm((x + r).to(dtype))

    def adapter_input(
        self, h: torch.Tensor, r: torch.Tensor, norm: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the adapter's input z, its residual ρ) from the sub-layer output ``h`` and the block input ``r``."""
        if not self.layout.original_ln_before:
            return h, h
        added = h + r
        z = norm(added.to(norm.weight.dtype)).to(h.dtype)
        return z, {True: h, "post_add": added, False: z}[self.layout.residual_before_ln]  # type: ignore[index]

    def unload(self) -> nn.Module:
        return self.base_layer

    def extra_repr(self) -> str:
        return f"features={self.features}, bottleneck_size={self.bottleneck_size}, layout={self.layout}"
