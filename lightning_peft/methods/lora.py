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
from torch import nn

from lightning_peft.hf import default_targets
from lightning_peft.hf_targets import LORA_TARGETS
from lightning_peft.methods.base import (
    PEFTLayer,
    PEFTMethod,
    _as_str_list,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_probability,
)
from lightning_peft.methods.peft_interop import lora_kwargs_from_peft_config, lora_peft_config
from lightning_peft.methods.registry import register_method
from lightning_peft.quantized import float_weight
from lightning_peft.record import mark_trainable
from lightning_peft.targeting import (
    ModuleTargets,
    conv1d_type,
    find_targets,
    innermost,
    linear_dims,
    wrap_target,
)


def weight_as_out_in(layer: nn.Module) -> torch.Tensor:
    """The base weight as (out, in), whether it is an ``nn.Linear`` (dequantized when it is a bitsandbytes
    4-bit/8-bit layer) or a GPT-2 ``Conv1D`` (stored (in, out)), also through the adapter layers of other named
    adapters that wrap it."""
    inner = innermost(layer)
    return float_weight(inner) if isinstance(inner, nn.Linear) else inner.weight.T


class LoRALinear(PEFTLayer):
    """A frozen linear (or GPT-2 Conv1D) layer plus a trainable low-rank update."""

    mergeable = True
    #: keys of these tensors in HF PEFT's adapter_model.safetensors
    peft_names: ClassVar[dict[str, str]] = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
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
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """s · B A as an (out, in) matrix."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., r) -> (..., out); scaling the r-wide intermediate costs r/out of scaling the output
        x = self.lora_dropout(x).to(self.lora_A.dtype)
        return F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out)
        if self.merged:
            return result
        return result + self.lora_forward(x).to(result.dtype)

    def _base_weight_update(self, delta: torch.Tensor, sign: float) -> None:
        weight = self.base_layer.weight
        delta = delta.T if self.fan_in_fan_out else delta
        weight.data.add_(delta.to(weight.dtype), alpha=sign)

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

    def resolved_targets(self, model: nn.Module) -> list[str] | str:
        if self.target_modules is None:
            return default_targets(model, LORA_TARGETS, type(self).__name__)
        return self.target_modules

    def plan(self, model: nn.Module) -> ModuleTargets:
        return find_targets(
            model,
            self.resolved_targets(model),
            self.exclude_modules,
            supported=is_lora_target,
            method=type(self).__name__,
        )

    def peft_config(self, model: nn.Module) -> dict[str, Any] | None:
        return lora_peft_config(self, model, use_dora=self.peft_use_dora)

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> PEFTMethod | None:
        if config.get("peft_type") != "LORA" or bool(config.get("use_dora", False)) != cls.peft_use_dora:
            return None
        return cls(**lora_kwargs_from_peft_config(config))

    def make_layer(self, base: nn.Module) -> LoRALinear:
        return self.layer_class(base, self.r, self.alpha, self.dropout, self.use_rslora)

    def inject(self, model: nn.Module, targets: ModuleTargets) -> None:
        for name in targets:
            base = innermost(model.get_submodule(name))
            wrap_target(model, name, self.make_layer)
            if self.bias == "lora_only" and getattr(base, "bias", None) is not None:
                mark_trainable(model, base, "bias")
        if self.bias == "all":
            for module in model.modules():
                if isinstance(getattr(module, "bias", None), nn.Parameter):
                    mark_trainable(model, module, "bias")
