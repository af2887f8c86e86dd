"""(IA)³: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", arXiv:2205.05638).

(IA)³ learns one vector per target layer that rescales activations elementwise, initialised to ones so that
the model is unchanged at init. As in the paper (keys, values, and the inner activation of the feed-forward
block) and in HF PEFT:

* attention targets (keys, values) scale the layer's output:   y = l ⊙ (W x + b),   l of shape (out, 1)
* feed-forward targets scale the layer's input:                y = W (l ⊙ x) + b,   l of shape (1, in)

Scaling the input of the FFN's second linear is the paper's ``l_ff ⊙ γ(W₁ x)``. Both forms fold into the
weights: output-side scales the rows of ``W`` and ``b``, input-side scales the columns of ``W``.

GPT-2's ``c_attn`` is one fused q/k/v ``Conv1D``: like HF PEFT, (IA)³ scales all of its output (queries
included), i.e. one vector of size 3·hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_peft.core.base_model import default_targets, model_type_of
from lightning_peft.core.default_targets import IA3_FEEDFORWARD, IA3_TARGETS
from lightning_peft.core.targeting import ModuleTargets, find_targets, linear_dims, matches_any, wrap_target
from lightning_peft.methods.base import EXACT_UNMERGE_EPS, PEFTLayer, PEFTMethod, _as_str_list
from lightning_peft.methods.lora import is_lora_target
from lightning_peft.methods.lora_patterns import inside_modules_to_save
from lightning_peft.methods.peft_interop import (
    modules_to_save_from_peft,
    peft_common_config,
    peft_module_list,
)
from lightning_peft.methods.registry import register_method


class IA3Layer(PEFTLayer):
    """A frozen linear (or GPT-2 Conv1D) layer whose output (or, for feed-forward layers, input) is scaled by a
    learned vector ``ia3_l``."""

    mergeable = True
    routes_rows = True
    peft_names: ClassVar[dict[str, str]] = {"ia3_l": "ia3_l"}

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_dims(base_layer)
        self.is_feedforward = is_feedforward
        # Conv1D keeps its weight as (in, out); merging must transpose the scale
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        weight = base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        # the same shapes as HF PEFT's files: (1, in) scales the columns of the (out, in) weight, (out, 1) its rows
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=weight.device, dtype=dtype))
        # a copy of the base weight/bias, kept by merge() only when l has (near) zeros that cannot be divided out
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.register_buffer("_unmerged_bias", None, persistent=False)

    def reset_parameters(self) -> None:
        """l = 1: the identity."""
        if self.ia3_l.device.type != "meta":
            with torch.no_grad():
                self.ia3_l.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.routed_rows(x)
        if rows is not None:
            return self.mixed_forward(x, rows)
        if self.merged:
            return self.base_layer(x)
        scale = self.ia3_l.view(-1)  # (in,) or (out,)
        if self.is_feedforward:
            return self.base_layer(x * scale.to(x.dtype))  # (..., in) -> (..., out)
        result = self.base_layer(x)  # (..., out)
        return result * scale.to(result.dtype)

    def mixed_input(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Feed-forward targets: x_i ← l ⊙ x_i for this adapter's rows (a copy; the caller's ``x`` stays)."""
        if not self.is_feedforward:
            return x
        own = x.index_select(0, rows) * self.ia3_l.view(-1).to(x.dtype)  # (n, ..., in)
        return x.index_copy(0, rows, own)  # (batch, ..., in)

    def mixed_output(self, x: torch.Tensor, result: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Attention targets: y_i ← l ⊙ y_i for this adapter's rows (feed-forward targets scaled the input)."""
        if self.is_feedforward:
            return result
        own = result.index_select(0, rows) * self.ia3_l.view(-1).to(result.dtype)  # (n, ..., out)
        return result.index_copy_(0, rows, own)  # (batch, ..., out)

    def _weight_factor(self) -> torch.Tensor:
        """``ia3_l`` shaped to multiply the base weight as it is stored."""
        factor = self.ia3_l.detach()
        return factor.T if self.fan_in_fan_out else factor

    def _scales_bias(self) -> bool:
        return not self.is_feedforward and getattr(self.base_layer, "bias", None) is not None

    def merge(self) -> None:
        weight = self.base_layer.weight
        if bool((self.ia3_l.detach().abs() < EXACT_UNMERGE_EPS).any()):
            self._unmerged_weight = weight.detach().clone()
            if self._scales_bias():
                self._unmerged_bias = self.base_layer.bias.detach().clone()
        weight.data.mul_(self._weight_factor().to(weight.dtype))
        if self._scales_bias():
            bias = self.base_layer.bias
            bias.data.mul_(self.ia3_l.detach().view(-1).to(bias.dtype))
        self.merged = True

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        if self._unmerged_weight is not None:
            weight.data.copy_(self._unmerged_weight)
            if self._unmerged_bias is not None:
                self.base_layer.bias.data.copy_(self._unmerged_bias)
        else:
            weight.data.div_(self._weight_factor().to(weight.dtype))
            if self._scales_bias():
                bias = self.base_layer.bias
                bias.data.div_(self.ia3_l.detach().view(-1).to(bias.dtype))
        self._unmerged_weight = None
        self._unmerged_bias = None
        self.merged = False

    def unload(self) -> nn.Module:
        return self.base_layer

    def extra_repr(self) -> str:
        return f"feedforward={self.is_feedforward}, size={self.ia3_l.numel()}"


@register_method
@dataclass
class IA3(PEFTMethod):
    """(IA)³ (Liu et al. 2022): ``y = l ⊙ (W x + b)`` on attention targets and ``y = W (l ⊙ x) + b`` on
    feed-forward targets, with ``l`` a trained vector initialised to ones."""

    method_name: ClassVar[str] = "ia3"
    #: the layers this method puts into a model (the participation check finds them by type)
    layer_types: ClassVar[tuple[type, ...]] = (IA3Layer,)
    mergeable: ClassVar[bool] = True

    target_modules: list[str] | str | None = None
    """Layers to scale: names or dotted suffixes (["key", "value"]) or a regex string. None uses the
    architecture's default: BERT/RoBERTa key, value and the FFN output layer.N.output.dense (not
    attention.output.dense); GPT-2 c_attn, mlp.c_proj; Llama/Mistral/Qwen2 k_proj, v_proj, down_proj."""
    feedforward_modules: list[str] | str | None = None
    """Which targets are feed-forward layers (their input is scaled instead of their output); same syntax.
    None uses the architecture's default (the FFN layers above), or none for models without a default."""
    exclude_modules: list[str] | str | None = None
    """Layers to leave alone even if target_modules matches them (same syntax)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter, e.g. ["classifier"] for a new head."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for argument in ("target_modules", "feedforward_modules", "exclude_modules"):
            value = getattr(self, argument)
            if value is not None and not isinstance(value, str):
                setattr(self, argument, _as_str_list(value, argument))

    def resolved_targets(self, model: nn.Module) -> list[str] | str:
        if self.target_modules is None:
            return default_targets(model, IA3_TARGETS, type(self).__name__)
        return self.target_modules

    def resolved_feedforward(self, model: nn.Module) -> list[str] | str:
        if self.feedforward_modules is not None:
            return self.feedforward_modules
        return list(IA3_FEEDFORWARD.get(model_type_of(model) or "", []))

    def feedforward_targets(self, model: nn.Module, targets: ModuleTargets) -> list[str]:
        """The subset of ``targets`` that get input-side scaling; an explicit feedforward_modules entry that
        selects none of the targets is an error (a typo would otherwise silently scale the output)."""
        patterns = self.resolved_feedforward(model)
        chosen = [n for n in targets if matches_any(n, patterns)]
        if self.feedforward_modules is not None:
            entries = [patterns] if isinstance(patterns, str) else patterns
            for entry in entries:
                if not any(matches_any(n, entry if isinstance(patterns, str) else [entry]) for n in targets):
                    raise ValueError(
                        f"feedforward_modules entry {entry!r} matches none of the IA3 targets; it must select "
                        f"a subset of target_modules. Targets: {targets[:20]}"
                    )
        return chosen

    def plan(self, model: nn.Module) -> ModuleTargets:
        targets = find_targets(
            model,
            self.resolved_targets(model),
            self.exclude_modules,
            supported=is_lora_target,
            method=type(self).__name__,
            skip=lambda name, _module: inside_modules_to_save(name, self.modules_to_save),
        )
        self.feedforward_targets(model, targets)
        return targets

    def inject(self, model: nn.Module, targets: ModuleTargets) -> None:
        feedforward = set(self.feedforward_targets(model, targets))
        for name in targets:
            wrap_target(model, name, lambda base, ff=name in feedforward: IA3Layer(base, is_feedforward=ff))

    # -- HF PEFT interop -------------------------------------------------------------------------------
    def peft_config(self, model: nn.Module) -> dict[str, Any] | None:
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Layer)]
        wrapped = [n for n, _ in layers]
        targets, exclude = peft_module_list(
            model, wrapped, self.resolved_targets(model), self.exclude_modules
        )
        feedforward, _ = peft_module_list(
            model, [n for n, m in layers if m.is_feedforward], self.resolved_feedforward(model)
        )
        if (
            isinstance(targets, list)
            and isinstance(feedforward, list)
            and not set(feedforward) <= set(targets)
        ):
            # PEFT requires feedforward_modules ⊆ target_modules as lists of names; explicit paths always are
            targets, exclude = peft_module_list(model, wrapped, None)
            feedforward, _ = peft_module_list(model, [n for n, m in layers if m.is_feedforward], None)
        return {
            **peft_common_config(model, "IA3"),
            "target_modules": targets,
            "feedforward_modules": feedforward,
            "exclude_modules": exclude,
            "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers),
            "init_ia3_weights": True,
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> PEFTMethod | None:
        if config.get("peft_type") != "IA3":
            return None
        # init_ia3_weights only says where training started (ones, or random): it never blocks a load
        return cls(
            target_modules=config.get("target_modules"),
            feedforward_modules=config.get("feedforward_modules") or [],
            exclude_modules=config.get("exclude_modules"),
            modules_to_save=modules_to_save_from_peft(config.get("modules_to_save")),
        )
