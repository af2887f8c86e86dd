"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685).

For a frozen linear layer ``y = W x + b`` LoRA learns ``A`` (r × in) and ``B`` (out × r):

    y = W x + b + s · B A dropout(x),      s = alpha / r   (or alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023)

``A`` starts Kaiming-uniform (a = √5) and ``B`` at zero, so the model's outputs are unchanged at init.
Merging adds ``s · B A`` to ``W``; inference then costs exactly what the base model costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_peft.core.base_model import default_targets, relative_name
from lightning_peft.core.default_targets import LORA_TARGETS
from lightning_peft.core.quantized import float_weight
from lightning_peft.core.record import mark_trainable
from lightning_peft.core.targeting import (
    ModuleTargets,
    conv1d_type,
    find_targets,
    innermost,
    linear_dims,
    wrap_target,
)
from lightning_peft.methods.base import (
    PEFTLayer,
    PEFTMethod,
    _as_str_list,
    add_to_rows,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_probability,
    kaiming_uniform_,
)
from lightning_peft.methods.lora_patterns import (
    check_layers_pattern,
    check_layers_to_transform,
    check_pattern_dict,
    in_layers,
    inside_modules_to_save,
    pattern_key,
    pattern_value,
    transformers_prefix,
)
from lightning_peft.methods.peft_interop import lora_kwargs_from_peft_config, lora_peft_config
from lightning_peft.methods.registry import register_method


def weight_as_out_in(layer: nn.Module) -> torch.Tensor:
    """The base weight as (out, in), whether it is an ``nn.Linear`` (dequantized when it is a bitsandbytes
    4-bit/8-bit layer) or a GPT-2 ``Conv1D`` (stored (in, out)), also through the adapter layers of other named
    adapters that wrap it."""
    inner = innermost(layer)
    return float_weight(inner) if isinstance(inner, nn.Linear) else inner.weight.T


class LoRALinear(PEFTLayer):
    """A frozen linear (or GPT-2 Conv1D) layer plus a trainable low-rank update."""

    mergeable = True
    routes_rows = True
    #: keys of these tensors in HF PEFT's adapter_model.safetensors
    peft_names: ClassVar[dict[str, str]] = {
        "lora_A": "lora_A.weight",
        "lora_B": "lora_B.weight",
        "lora_B_bias": "lora_B.bias",
    }

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        lora_bias: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_dims(base_layer)
        # Conv1D keeps its weight as (in, out); merging must transpose the update
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base_layer.weight
        factory: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
        if not weight.is_floating_point() or weight.device.type == "meta":
            factory = {"device": weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        # HF PEFT's lora_bias: a bias on B, scaled with the branch; merging adds s·b_B to the base bias
        bias = nn.Parameter(torch.zeros(self.out_features, **factory)) if lora_bias else None
        self.register_parameter("lora_B_bias", bias)
        if lora_bias and getattr(base_layer, "bias", None) is None:
            self.mergeable = False  # there is no base bias to fold s·b_B into
        self.reset_lora_parameters()

    def reset_parameters(self) -> None:
        """A Kaiming-uniform (a = √5), B zero: the identity. Written with tensor methods rather than
        ``torch.nn.init``, which ``Trainer.init_module(empty_init=True)`` turns into no-ops: a new adapter is
        never loaded from the base checkpoint, so it must always be initialised."""
        kaiming_uniform_(self.lora_A, self.in_features)
        if self.lora_B.device.type != "meta":
            with torch.no_grad():
                self.lora_B.zero_()
                if self.lora_B_bias is not None:
                    self.lora_B_bias.zero_()

    def reset_lora_parameters(self) -> None:
        self.reset_parameters()

    def delta_weight(self) -> torch.Tensor:
        """s · B A as an (out, in) matrix."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def lora_hidden(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., r); scaling the r-wide intermediate costs r/out of scaling the output
        return F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A) * self.scaling

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(self.lora_hidden(x), self.lora_B)  # (..., out)
        return out if self.lora_B_bias is None else out + self.scaling * self.lora_B_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.routed_rows(x)
        if rows is not None:
            return self.mixed_forward(x, rows)
        result = self.base_layer(x)  # (..., out)
        if self.merged:
            return result
        if self.lora_B_bias is not None or result.dtype != self.lora_B.dtype:
            return result + self.lora_forward(x).to(result.dtype)
        hidden = self.lora_hidden(x)  # (..., r)
        # W x + b + (s·A x̃) Bᵀ as one accumulating GEMM: no (..., out) temporary for the branch and no
        # separate add pass over the output, forward or backward
        flat = torch.addmm(result.reshape(-1, self.out_features), hidden.reshape(-1, self.r), self.lora_B.t())
        return flat.view(result.shape)  # (..., out)

    def mixed_output(self, x: torch.Tensor, result: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """y_i += s · B A x_i (+ s · b_B) for the rows i of this adapter: one gather, two rank-r matmuls, one
        scatter-add into the base output."""
        delta = self.lora_forward(x.index_select(0, rows))  # (n, ..., out)
        return add_to_rows(result, rows, delta.to(result.dtype))  # (batch, ..., out); a fresh linear output

    def _base_weight_update(self, delta: torch.Tensor, sign: float) -> None:
        weight = self.base_layer.weight
        delta = delta.T if self.fan_in_fan_out else delta
        weight.data.add_(delta.to(weight.dtype), alpha=sign)
        if self.lora_B_bias is not None:
            bias = innermost(self.base_layer).bias
            bias.data.add_((self.scaling * self.lora_B_bias.detach()).to(bias.dtype), alpha=sign)

    def merge(self) -> None:
        self._base_weight_update(self.delta_weight(), 1.0)
        self.merged = True

    def unmerge(self) -> None:
        self._base_weight_update(self.delta_weight(), -1.0)
        self.merged = False

    def unload(self) -> nn.Module:
        return self.base_layer

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


def is_lora_target(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


@register_method
@dataclass
class LoRA(PEFTMethod):
    """LoRA (Hu et al. 2021): ``y = W x + b + (alpha / r) · B A dropout(x)`` on the target linear layers."""

    method_name: ClassVar[str] = "lora"
    mergeable: ClassVar[bool] = True
    layer_class: ClassVar[type[LoRALinear]] = LoRALinear
    #: written to adapter_config.json as HF PEFT's use_dora
    peft_use_dora: ClassVar[bool] = False

    r: int = 8
    """Rank of the update B A (a positive integer)."""
    alpha: float = 16.0
    """Scaling numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input, in [0, 1)."""
    target_modules: list[str] | str | None = None
    """Layers to adapt: names or dotted suffixes (["query", "value"]), a regex string, or "all-linear".
    None uses the architecture's default (query/value for BERT, c_attn for GPT-2, q_proj/v_proj for Llama)."""
    exclude_modules: list[str] | str | None = None
    """Layers to leave alone even if target_modules matches them (same syntax)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter, e.g. ["classifier"] for a new head."""
    bias: str = "none"
    """Which biases train: "none", "all" (every bias in the model) or "lora_only" (biases of adapted layers)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Ranks other than r for some layers: module-name regex -> rank, HF PEFT's rule (the key must match the end
    of the name at a dot, e.g. {"layer.0.attention.self.query": 16}; the first matching key wins)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Alphas other than alpha for some layers, matched like rank_pattern."""
    layers_to_transform: list[int] | int | None = None
    """Adapt only the targets in these transformer blocks (their index is the first numbered segment of the
    name, e.g. 3 in encoder.layer.3.attention.self.query). None adapts every block."""
    layers_pattern: list[str] | str | None = None
    """Name(s) of the block list whose index layers_to_transform selects (e.g. "layer", "h", "layers"), for
    models where the first numbered segment is not the block. Used only with layers_to_transform."""
    lora_bias: bool = False
    """Give B a trainable bias b_B (zeros at init): the branch becomes s · (B A x + b_B), HF PEFT's lora_bias.
    Merging folds s · b_B into the base bias, so it needs base layers with a bias."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.r, "r")
        check_positive_float(self.alpha, "alpha")
        check_probability(self.dropout, "dropout")
        check_choice(self.bias, "bias", ("none", "all", "lora_only"))
        if not isinstance(self.target_modules, str) and self.target_modules is not None:
            self.target_modules = _as_str_list(self.target_modules, "target_modules")
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, str):
            self.exclude_modules = _as_str_list(self.exclude_modules, "exclude_modules")
        self.rank_pattern = check_pattern_dict(self.rank_pattern, "rank_pattern", integer=True)
        self.alpha_pattern = check_pattern_dict(self.alpha_pattern, "alpha_pattern", integer=False)
        self.layers_to_transform = check_layers_to_transform(self.layers_to_transform)
        self.layers_pattern = check_layers_pattern(self.layers_pattern, self.layers_to_transform)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                f"layers_to_transform={self.layers_to_transform!r} needs target_modules as a list of names (or "
                f"None), got the regex {self.target_modules!r}; put the block index into the regex instead"
            )
        if not isinstance(self.lora_bias, bool):
            raise ValueError(f"lora_bias must be true or false, got {self.lora_bias!r}")
        if self.lora_bias and self.peft_use_dora:
            raise ValueError(
                f"lora_bias=True is not supported by {type(self).__name__} (as in HF PEFT); use LoRA"
            )

    def resolved_targets(self, model: nn.Module) -> list[str] | str:
        if self.target_modules is None:
            return default_targets(model, LORA_TARGETS, type(self).__name__)
        return self.target_modules

    def plan(self, model: nn.Module) -> ModuleTargets:
        prefix = transformers_prefix(model)

        def skip(name: str, _module: nn.Module) -> bool:
            rel = relative_name(name, prefix)
            outside = not in_layers(rel, self.layers_to_transform, self.layers_pattern)
            return outside or inside_modules_to_save(name, self.modules_to_save)

        targets = find_targets(
            model,
            self.resolved_targets(model),
            self.exclude_modules,
            supported=is_lora_target,
            method=type(self).__name__,
            skip=skip,
        )
        for argument, patterns in (
            ("rank_pattern", self.rank_pattern),
            ("alpha_pattern", self.alpha_pattern),
        ):
            used = {pattern_key(patterns, relative_name(n, prefix)) for n in targets}
            unused = [key for key in patterns if key not in used]
            if unused:
                rank_zero_warn(f"{argument} keys {unused} match none of the {type(self).__name__} targets")
        return targets

    def layer_options(self, name: str, prefix: str) -> tuple[int, float]:
        """(r, alpha) of the target ``name`` (``prefix``: the transformers model's, see ``transformers_prefix``):
        rank_pattern/alpha_pattern, else r/alpha."""
        rel = relative_name(name, prefix)
        r = pattern_value(self.rank_pattern, rel, self.r)
        return r, pattern_value(self.alpha_pattern, rel, self.alpha)

    def peft_config(self, model: nn.Module) -> dict[str, Any] | None:
        return lora_peft_config(self, model, use_dora=self.peft_use_dora)

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> PEFTMethod | None:
        if config.get("peft_type") != "LORA" or bool(config.get("use_dora", False)) != cls.peft_use_dora:
            return None
        return cls(**lora_kwargs_from_peft_config(config))

    def make_layer(self, base: nn.Module, r: int, alpha: float) -> LoRALinear:
        if self.lora_bias:
            return self.layer_class(base, r, alpha, self.dropout, self.use_rslora, lora_bias=True)
        return self.layer_class(base, r, alpha, self.dropout, self.use_rslora)

    def inject(self, model: nn.Module, targets: ModuleTargets) -> None:
        prefix = transformers_prefix(model)
        for name in targets:
            base = innermost(model.get_submodule(name))
            r, alpha = self.layer_options(name, prefix)
            layer = wrap_target(
                model, name, lambda module, r=r, alpha=alpha: self.make_layer(module, r, alpha)
            )
            if not layer.mergeable:
                rank_zero_warn(
                    f"lora_bias=True on {name!r}, which has no bias: this adapter cannot be merged"
                )
            if self.bias == "lora_only" and getattr(base, "bias", None) is not None:
                mark_trainable(model, base, "bias")
        if self.bias == "all":
            for module in model.modules():
                if isinstance(getattr(module, "bias", None), nn.Parameter):
                    mark_trainable(model, module, "bias")
