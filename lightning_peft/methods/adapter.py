"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
arXiv:1902.00751; Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning", arXiv:2005.00247).

A small residual MLP is inserted on the output ``h`` (width d) of a frozen sub-layer projection:

    adapter(h) = h + W_up · act(W_down · h + b_down) + b_up,      W_down: (m × d), W_up: (d × m), m ≪ d

``W_up`` and ``b_up`` start at zero, so the model is unchanged at init. The adapter sits on the
projection's output, i.e. before the sub-layer's dropout, residual add and LayerNorm.

* ``placement="houlsby"``: after the attention output projection and after the feed-forward output
  projection of every block, and the block's LayerNorms train too;
* ``placement="pfeiffer"``: after the feed-forward output projection only.

The activation makes the adapter nonlinear, so it cannot be folded into the base weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_peft.core.base_model import model_description, model_type_of
from lightning_peft.core.default_targets import ADAPTER_PLACEMENT
from lightning_peft.core.record import mark_trainable
from lightning_peft.core.targeting import (
    ModuleTargets,
    find_targets,
    innermost,
    is_linear_like,
    linear_dims,
    wrap_target,
)
from lightning_peft.methods.adapter_block import (
    BLOCK_PARTS,
    RESIDUAL_CHOICES,
    BlockAdapterLayer,
    BlockLayout,
    is_output_block,
)
from lightning_peft.methods.base import (
    AdapterLinear,
    PEFTLayer,
    PEFTMethod,
    ZeroLinear,
    _as_str_list,
    add_to_rows,
    check_choice,
    check_positive_int,
)
from lightning_peft.methods.registry import register_method

PLACEMENTS = ("houlsby", "pfeiffer")
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}
DEFAULT_REDUCTION_FACTOR = 16


def output_features(module: nn.Module) -> int | None:
    """Width of the last dimension of ``module``'s output, or ``None`` when it cannot be told."""
    if is_linear_like(module):
        return linear_dims(module)[1]
    out_features = getattr(module, "out_features", None)
    if isinstance(out_features, int) and not isinstance(out_features, bool) and out_features > 0:
        return out_features  # e.g. quantised linear layers that keep nn.Linear's attributes
    return None


def is_adapter_target(module: nn.Module) -> bool:
    return output_features(module) is not None


def is_block_target(module: nn.Module) -> bool:
    """A projection or a post-LayerNorm output block (the targets of block-layout adapters)."""
    return is_adapter_target(module) or is_output_block(module)


def is_norm(module: nn.Module) -> bool:
    if isinstance(module, nn.LayerNorm) or isinstance(module, getattr(nn, "RMSNorm", ())):
        return True
    # transformers' own norms (LlamaRMSNorm, T5LayerNorm, ...) are plain nn.Modules
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def block_of(name: str) -> str:
    """The transformer block holding module ``name``: its deepest ancestor whose name ends in a layer index
    (``bert.encoder.layer.3``); the module's parent when no ancestor is numbered."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1].isdigit():
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


class BottleneckAdapterLayer(PEFTLayer):
    """A frozen projection followed by a trainable residual bottleneck MLP (see the module docstring)."""

    routes_rows = True

    def __init__(self, base_layer: nn.Module, bottleneck_size: int, activation: str) -> None:
        super().__init__()
        features = output_features(base_layer)
        if features is None:
            raise TypeError(
                f"BottleneckAdapterLayer needs a module whose output width is known (nn.Linear, Conv1D or one "
                f"with out_features), got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.features = features
        self.bottleneck_size = bottleneck_size
        self.activation_name = activation
        weight = next(base_layer.parameters(), None)
        factory: dict[str, Any] = {}
        if weight is not None:
            factory["device"] = weight.device
            # quantised base weights: keep the adapter in the default float dtype
            if weight.is_floating_point():
                factory["dtype"] = weight.dtype
        self.adapter_down = AdapterLinear(features, bottleneck_size, **factory)
        self.adapter_act = ACTIVATIONS[activation]()
        self.adapter_up = ZeroLinear(bottleneck_size, features, **factory)

    def adapter_delta(self, h: torch.Tensor) -> torch.Tensor:
        """W_up · act(W_down · h + b_down) + b_up."""
        # h: (..., d) -> (..., m) -> (..., d)
        z = self.adapter_act(self.adapter_down(h.to(self.adapter_down.weight.dtype)))
        return self.adapter_up(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.routed_rows(x)
        if rows is not None:
            return self.mixed_forward(x, rows)
        h = self.base_layer(x)  # (..., d)
        return h + self.adapter_delta(h).to(h.dtype)

    def mixed_output(self, x: torch.Tensor, result: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """h_i += W_up · act(W_down · h_i + b_down) + b_up for this adapter's rows i."""
        delta = self.adapter_delta(result.index_select(0, rows)).to(result.dtype)  # (n, ..., d)
        # a fresh linear output takes the add in place; any other projection might hand back a tensor it also
        # keeps elsewhere
        return add_to_rows(result, rows, delta, in_place=is_linear_like(innermost(self.base_layer)))

    def unload(self) -> nn.Module:
        return self.base_layer

    def extra_repr(self) -> str:
        return f"features={self.features}, bottleneck_size={self.bottleneck_size}, activation={self.activation_name}"


@register_method
@dataclass
class Adapter(PEFTMethod):
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021):
    ``h ← h + W_up · act(W_down · h + b_down) + b_up`` on the output ``h`` of the target projections."""

    method_name: ClassVar[str] = "adapter"
    mergeable: ClassVar[bool] = False
    layer_class: ClassVar[type[BottleneckAdapterLayer]] = BottleneckAdapterLayer

    placement: str = "pfeiffer"
    """Where adapters go by default: "pfeiffer" (after each block's feed-forward output projection) or
    "houlsby" (after the attention output projection and the feed-forward output projection, with the
    block's LayerNorms trained too)."""
    bottleneck_size: int | None = None
    """Width m of the adapter's hidden layer. Give this or reduction_factor, not both."""
    reduction_factor: int | None = None
    """m = output width // reduction_factor (16 when neither this nor bottleneck_size is given)."""
    activation: str = "relu"
    """Nonlinearity between the down and up projections: relu, gelu, gelu_tanh, silu, swish, tanh, sigmoid
    or leaky_relu."""
    target_modules: list[str] | str | None = None
    """Projections after which adapters go: names or dotted suffixes, regexes, or one regex string. None uses
    the architecture's defaults for the placement (BERT attention.output.dense / layer.N.output.dense,
    GPT-2 attn.c_proj / mlp.c_proj, Llama self_attn.o_proj / mlp.down_proj)."""
    exclude_modules: list[str] | str | None = None
    """Projections to leave alone even if target_modules matches them (same syntax)."""
    train_layernorms: bool | None = None
    """Also train the LayerNorms (RMSNorms) of every block that holds an adapter. None: True for "houlsby",
    False for "pfeiffer"."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter, e.g. ["classifier"] for a new head."""
    original_ln_before: bool = False
    """Pfeiffer's layout (AdapterHub's seq_bn): the adapter reads the sub-layer's output after its residual add
    and LayerNorm. This and the options below put the adapter inside the block LN(dropout(dense(x)) + r)
    (post-LayerNorm models such as BERT: the parent of each target must have dense, dropout and LayerNorm);
    formulas in lightning_peft/methods/adapter_block.py."""
    residual_before_ln: bool | str = True
    """The adapter's own residual with original_ln_before: True (the sub-layer output before the residual
    add), "post_add" (after the add, before the LayerNorm) or False (after the LayerNorm)."""
    parallel: bool = False
    """Parallel adapter (He et al. 2022): the adapter reads the sub-layer's input and its output is added to
    the sub-layer's output, LN(h + A(r) + r)."""
    scaling: float = 1.0
    """Factor s on the adapter's output, s · W_up act(W_down h) (4.0 in AdapterHub's par_bn)."""
    ln_before: bool = False
    """A trained LayerNorm on the adapter's input."""
    ln_after: bool = False
    """A trained LayerNorm on the adapter's output."""
    adapter_residual_before_ln: bool = False
    """With ln_after: add the adapter's residual before that LayerNorm instead of after it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.placement, "placement", PLACEMENTS)
        if self.residual_before_ln not in RESIDUAL_CHOICES:
            raise ValueError(
                f"residual_before_ln must be True, False or 'post_add', got {self.residual_before_ln!r}"
            )
        if self.residual_before_ln == "post_add" and not self.original_ln_before:
            raise ValueError(
                "residual_before_ln='post_add' needs original_ln_before=True (there is no add before)"
            )
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ValueError(f"scaling must be a number, got {self.scaling!r}")
        if self.parallel and self.original_ln_before:
            raise ValueError(
                "parallel=True reads the sub-layer's input: it cannot also have original_ln_before=True"
            )
        check_choice(self.activation, "activation", tuple(ACTIVATIONS))
        if self.bottleneck_size is not None:
            check_positive_int(self.bottleneck_size, "bottleneck_size")
        if self.reduction_factor is not None:
            check_positive_int(self.reduction_factor, "reduction_factor")
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ValueError(
                f"give bottleneck_size or reduction_factor, not both; got bottleneck_size={self.bottleneck_size} "
                f"and reduction_factor={self.reduction_factor}"
            )
        if self.train_layernorms is not None and not isinstance(self.train_layernorms, bool):
            raise ValueError(f"train_layernorms must be True, False or None, got {self.train_layernorms!r}")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = _as_str_list(self.target_modules, "target_modules")
            if not self.target_modules:
                raise ValueError("target_modules must name at least one module (or be None), got []")
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, str):
            self.exclude_modules = _as_str_list(self.exclude_modules, "exclude_modules")

    # -- resolved settings ----------------------------------------------------------------------------------
    @property
    def layout(self) -> BlockLayout | None:
        """The block layout, or ``None`` for the plain adapter on the projection's output."""
        layout = BlockLayout(
            self.original_ln_before,
            self.residual_before_ln,
            self.parallel,
            float(self.scaling),
            self.ln_before,
            self.ln_after,
            self.adapter_residual_before_ln,
        )
        return None if layout == BlockLayout() else layout

    @property
    def layernorms_trained(self) -> bool:
        return self.placement == "houlsby" if self.train_layernorms is None else self.train_layernorms

    def bottleneck_for(self, features: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return features // (self.reduction_factor or DEFAULT_REDUCTION_FACTOR)

    def resolved_targets(self, model: nn.Module) -> list[str] | str:
        if self.target_modules is not None:
            return self.target_modules
        model_type = model_type_of(model)
        if model_type not in ADAPTER_PLACEMENT:
            raise ValueError(
                f"target_modules=None: Adapter on {model_description(model)} has no default placement for "
                f"model_type={model_type!r}; pass target_modules naming the projections after which adapters "
                "go (e.g. the attention output and feed-forward output layers). "
                f"{len(ADAPTER_PLACEMENT)} model types have defaults, listed in lightning_peft/core/default_targets.py"
            )
        attention_out, ffn_out = ADAPTER_PLACEMENT[model_type]
        targets = [attention_out, ffn_out] if self.placement == "houlsby" else [ffn_out]
        if self.layout is not None:  # the blocks around the projections (another adapter may wrap a dense)
            targets = [re.sub(r"(\\\.|\.)dense$", "", t) for t in targets]
        return targets

    # -- the interface --------------------------------------------------------------------------------------
    def plan(self, model: nn.Module) -> ModuleTargets:
        layout = self.layout
        targets = find_targets(
            model,
            self.resolved_targets(model),
            self.exclude_modules,
            supported=is_adapter_target if layout is None else is_block_target,
            supported_desc="nn.Linear, transformers Conv1D or a Linear-like module with an integer out_features"
            + ("" if layout is None else ", or an output block with dense, dropout and LayerNorm"),
            method=type(self).__name__,
        )
        if layout is not None:  # the adapter goes around the output block: the target or the target's parent
            targets = list(dict.fromkeys(self.output_block(model, name) for name in targets))
        for name in targets:
            module = innermost(model.get_submodule(name))
            features = output_features(module.dense if layout is not None else module)
            assert features is not None  # guaranteed by find_targets(supported=...)
            if self.bottleneck_for(features) < 1:
                raise ValueError(
                    f"reduction_factor={self.reduction_factor or DEFAULT_REDUCTION_FACTOR} leaves no bottleneck "
                    f"for {name!r}, whose output has {features} features; use a reduction_factor <= {features} "
                    "or set bottleneck_size"
                )
        return targets

    def output_block(self, model: nn.Module, name: str) -> str:
        """The output block an adapter with a block layout goes around: ``name`` itself or its parent."""
        if is_output_block(innermost(model.get_submodule(name))):
            return name
        parent, _, child = name.rpartition(".")
        parent = block_path(parent)
        if parent and child == "dense" and is_output_block(innermost(model.get_submodule(parent))):
            return parent
        raise ValueError(
            "Adapter(original_ln_before/parallel/scaling/ln_before/ln_after...): these place the adapter inside the "
            f"output block LN(dropout(dense(x)) + r), so each target must be such a block (a module with "
            f"{', '.join(BLOCK_PARTS)}, as in BERT or RoBERTa) or its dense child; {name!r} in "
            f"{model_description(model)} is neither"
        )

    def inject(self, model: nn.Module, targets: ModuleTargets) -> None:
        layout, act = self.layout, ACTIVATIONS[self.activation]
        for name in targets:
            module = innermost(model.get_submodule(name))
            features = output_features(module.dense if layout is not None else module)
            assert features is not None
            size = self.bottleneck_for(features)
            if layout is not None:
                make = lambda base, size=size: BlockAdapterLayer(base, size, act(), layout)  # noqa: E731
                wrap_target(model, name, make)
                continue
            wrap_target(model, name, lambda base, size=size: self.layer_class(base, size, self.activation))
        if not self.layernorms_trained:
            return
        norms = layernorms_near(model, targets)
        if not norms:
            rank_zero_warn(
                f"Adapter(train_layernorms=True): no LayerNorm/RMSNorm found in the blocks holding the adapters "
                f"({sorted({block_of(t) for t in targets})[:4]}); only the adapters train"
            )
        for norm in norms:
            local = [n for n, _ in norm.named_parameters(recurse=False) if n in ("weight", "bias")]
            if local:
                mark_trainable(model, norm, *local)


def block_path(name: str) -> str:
    """The path of an output block without other adapters' wrapper infixes (its outermost wrapper's path)."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def layernorms_near(model: nn.Module, targets: ModuleTargets) -> list[nn.Module]:
    """The LayerNorm/RMSNorm modules of the blocks that hold the ``targets``."""
    blocks = {block_of(t) for t in targets}
    found: list[nn.Module] = []
    for name, module in model.named_modules():
        if not is_norm(module) or any(module is f for f in found):
            continue
        if any(b == "" or name.startswith(b + ".") for b in blocks):
            found.append(module)
    return found
