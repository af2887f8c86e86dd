"""AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
arXiv:2005.00247): learned attention over the outputs of several frozen bottleneck adapters.

In every output block ``LN(dropout(W x + b) + r)`` that holds the ``N`` listed adapters, with ``z`` the adapters'
common input and ``ρ`` their residual (the last listed adapter's layout decides both, see
:mod:`lightning_peft.methods.adapter_block`; ``z = ρ = h`` for the plain adapter), each adapter gives its
bottleneck output ``u_n = s_n · (W_up,n act(W_down,n z + b_down,n) + b_up,n)`` and, per token,

    q = W_Q z + b_Q,   k_n = W_K u_n + b_K,   v_n = W_V u_n,
    a = softmax_n(q · k_n),   o = Σ_n a_n v_n + ρ,   out = LN(o + r).

``W_V`` starts at the identity (``value_initialized``), ``W_Q``/``W_K`` at N(0, 0.02²), so fusion starts as an
attention-weighted mean of the adapters. Only ``W_Q``, ``W_K``, ``W_V`` train; the listed adapters stay frozen.
Options follow AdapterHub's fusion configuration (``query``, ``key``, ``value``, ``value_before_softmax``,
``residual_before``, ``query_before_ln``), so its ``adapter_fusion_config.json`` maps one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_peft.core.base_model import model_description
from lightning_peft.core.record import get_record
from lightning_peft.core.targeting import ModuleTargets, wrap_target
from lightning_peft.methods.adapter import BottleneckAdapterLayer
from lightning_peft.methods.adapter_block import BlockAdapterLayer, BlockLayout, is_output_block
from lightning_peft.methods.base import PEFTLayer, PEFTMethod
from lightning_peft.methods.registry import register_method

Child = BlockAdapterLayer | BottleneckAdapterLayer


def _unwrap(module: nn.Module, names: list[str], kind: type) -> tuple[nn.Module, dict[str, Any]]:
    """The module below the listed adapters' wrappers of type ``kind``, and those wrappers by adapter name."""
    found: dict[str, Any] = {}
    while isinstance(module, PEFTLayer):
        if isinstance(module, kind) and module.adapter_name in names:
            found[module.adapter_name] = module
        elif module.active:
            raise RuntimeError(
                f"AdapterFusion: the active adapter {module.adapter_name!r} sits between the fused adapters; "
                "switch it off (set_adapter) to run the fusion"
            )
        module = module.base_layer
    return module, found


class FusionLayer(PEFTLayer):
    """An output block whose listed bottleneck adapters are combined by attention (module docstring)."""

    def __init__(self, base_layer: nn.Module, method: AdapterFusion, features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.names = list(method.adapters)
        self.options = method
        weight = next(base_layer.parameters())
        factory: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
        if method.query:
            self.query = nn.Linear(features, features, **factory)
        if method.key:
            self.key = nn.Linear(features, features, **factory)
        if method.value:
            self.value = nn.Linear(features, features, bias=False, **factory)
        self.dropout = nn.Dropout(method.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name in ("query", "key"):
                if hasattr(self, name):
                    getattr(self, name).weight.normal_(0.0, 0.02)
                    getattr(self, name).bias.zero_()
            if hasattr(self, "value"):
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)

    def children_of(self) -> tuple[nn.Module, nn.Module, list[Child]]:
        """(the plain output block, its dense layer without the fused adapters, the fused adapters in order)."""
        block, blocks = _unwrap(self.base_layer, self.names, BlockAdapterLayer)
        dense, projections = _unwrap(block.dense, self.names, BottleneckAdapterLayer)
        found = {**blocks, **projections}
        missing = [n for n in self.names if n not in found]
        if missing:
            raise RuntimeError(f"AdapterFusion: adapter {missing[0]!r} is not in this block any more")
        return block, dense, [found[n] for n in self.names]

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        block, dense, children = self.children_of()
        o = self.options
        last = children[-1]
        layout = last.layout if isinstance(last, BlockAdapterLayer) else BlockLayout()
        h, r = block.dropout(dense(hidden_states)), input_tensor  # (B, T, d)
        if layout.original_ln_before:
            added = h + r
            z = block.LayerNorm(added)
            residual = {True: h, "post_add": added, False: z}[layout.residual_before_ln]  # type: ignore[index]
        else:
            z, residual = h, h
        query = h if o.query_before_ln else z
        ups = [c.bottleneck(z) if isinstance(c, BlockAdapterLayer) else c.adapter_delta(z) for c in children]
        u = torch.stack(ups, dim=2)  # (B, T, N, d)
        if o.residual_before:
            u = u + residual.unsqueeze(2)  # keys and values both (AdapterHub adds it to the shared tensor)
        q = self.query(query) if o.query else query  # (B, T, d)
        k = self.key(u) if o.key else u  # (B, T, N, d)
        v = self.value(u) if o.value and o.value_before_softmax else u
        scores = self.dropout(torch.einsum("btd,btnd->btn", q, k))  # (B, T, N)
        context = torch.einsum("btn,btnd->btd", scores.softmax(dim=-1), v)  # (B, T, d)
        if o.value and not o.value_before_softmax:
            context = self.value(context)
        if not o.residual_before:
            context = context + residual
        return block.LayerNorm(context + r)

    def unload(self) -> nn.Module:
        return self.base_layer

    def extra_repr(self) -> str:
        return f"adapters={self.names}"


@register_method
@dataclass
class AdapterFusion(PEFTMethod):
    """AdapterFusion (Pfeiffer et al. 2021): per token, ``softmax_n(q · k_n)``-weighted sum of the bottleneck
    outputs of the listed (frozen) adapters, in every output block that holds them all."""

    method_name: ClassVar[str] = "adapter_fusion"
    mergeable: ClassVar[bool] = False

    adapters: list[str] = field(default_factory=list)
    """Names of the bottleneck adapters to fuse (already on the model, e.g. load_adapter(..., adapter_name=)),
    at least two; the last one's layout gives the fusion's input and residual."""
    query: bool = True
    """A trained query projection W_Q (else the adapters' input is the query)."""
    key: bool = True
    """A trained key projection W_K (else the adapter outputs are the keys)."""
    value: bool = True
    """A trained value projection W_V, started at the identity (else the adapter outputs are the values)."""
    value_before_softmax: bool = True
    """Apply W_V to each adapter output (True) or to the weighted sum (False)."""
    residual_before: bool = False
    """Add the residual ρ to the adapter outputs before the attention instead of after it."""
    query_before_ln: bool = False
    """With original_ln_before adapters: the query is the sub-layer output before the residual add and LayerNorm."""
    dropout: float = 0.0
    """Dropout on the attention scores (training only)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Not supported with AdapterFusion (must stay empty)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            isinstance(self.adapters, str)
            or len(self.adapters) == 1  # [] (the default): not given yet (a CLI builds it); attach refuses it
            or len(set(self.adapters)) != len(self.adapters)
        ):
            raise ValueError(
                f"adapters must list at least two different adapter names, got {self.adapters!r}"
            )
        self.adapters = [str(a) for a in self.adapters]
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.modules_to_save:
            raise ValueError(f"AdapterFusion takes no modules_to_save, got {self.modules_to_save!r}")

    def plan(self, model: nn.Module) -> ModuleTargets:
        if not self.adapters:
            raise ValueError("AdapterFusion(adapters=[]): name at least two adapters on the model to fuse")
        record = get_record(model)
        loaded = list(record.adapters) if record is not None else []
        unknown = [a for a in self.adapters if a not in loaded]
        if unknown:
            raise ValueError(
                f"AdapterFusion(adapters={self.adapters}): adapter {unknown[0]!r} is not on {model_description(model)} "
                f"(loaded: {loaded}); load it first, e.g. load_adapter(model, path, adapter_name={unknown[0]!r})"
            )
        blocks: dict[str, set[str]] = {}
        for name, module in model.named_modules():
            if (
                isinstance(module, (BlockAdapterLayer, BottleneckAdapterLayer))
                and module.adapter_name in self.adapters
            ):
                if isinstance(module, BlockAdapterLayer) and module.layout.parallel:
                    raise ValueError(
                        f"AdapterFusion: {module.adapter_name!r} is a parallel adapter, which is not fused"
                    )
                clean = ".".join(p for p in name.split(".") if p != "base_layer")
                block = clean if isinstance(module, BlockAdapterLayer) else clean.rpartition(".")[0]
                blocks.setdefault(block, set()).add(module.adapter_name)
        targets = sorted(b for b, names in blocks.items() if names == set(self.adapters))
        partial = sorted(set(blocks) - set(targets))
        if partial or not targets:
            raise ValueError(
                f"AdapterFusion(adapters={self.adapters}): every fused adapter must be a bottleneck Adapter in the "
                f"same output blocks; {partial[:1] or 'no block'} holds only some of them"
            )
        for target in targets:
            if not is_output_block(_unwrap(model.get_submodule(target), self.adapters, BlockAdapterLayer)[0]):
                raise ValueError(
                    f"AdapterFusion: {target!r} is not an output block (dense, dropout, LayerNorm)"
                )
        return targets

    def inject(self, model: nn.Module, targets: ModuleTargets) -> None:
        for target in targets:
            block = _unwrap(model.get_submodule(target), self.adapters, BlockAdapterLayer)[0]
            features = int(block.LayerNorm.normalized_shape[0])
            wrap_target(model, target, lambda base, features=features: FusionLayer(base, self, features))
