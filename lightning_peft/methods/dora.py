"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation",
arXiv:2402.09353).

DoRA splits a frozen weight ``W`` (out × in) into a per-row magnitude and a direction, adapts the direction
with LoRA and learns the magnitude ``m`` (one scalar per output row):

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖,     ‖·‖ = L2 norm of each output row (dim 1 of the (out, in) weight)

``m`` starts as the row norms of ``W`` and ``B`` at zero, so the model is unchanged at init. Following §4.3 of
the paper the norm is treated as a constant in backward (detached), which saves memory and time. The forward
never forms ``W'``; with ``n = ‖W + s·B A‖`` (detached) it computes

    y = (m / n) ⊙ (W x + s·B A x) + b
      = W x + b + (m / n − 1) ⊙ W x + (m / n) ⊙ s·B A x

Dropout on the adapter input (``dropout > 0``, training only) follows HF PEFT: the base path keeps the clean
input and only the DoRA correction sees ``x̃ = dropout(x)``,

    y = W x + b + (m / n − 1) ⊙ W x̃ + (m / n) ⊙ s·B A x̃

which costs one extra ``W x̃``. In eval mode (or with ``dropout = 0``) ``x̃ = x`` and both forms are equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.core.targeting import innermost
from lightning_peft.methods.base import EXACT_UNMERGE_EPS
from lightning_peft.methods.lora import LoRA, LoRALinear, weight_as_out_in
from lightning_peft.methods.registry import register_method


def set_weight_out_in(layer: nn.Module, weight_out_in: torch.Tensor) -> None:
    """Write an (out, in) matrix into an ``nn.Linear`` or a GPT-2 ``Conv1D`` (which stores (in, out))."""
    inner = innermost(layer)
    target = inner.weight
    value = weight_out_in if isinstance(inner, nn.Linear) else weight_out_in.T
    target.data.copy_(value.to(target.dtype))


class DoRALinear(LoRALinear):
    """A frozen linear (or GPT-2 Conv1D) layer with a LoRA direction update and a learned magnitude."""

    mergeable = True
    #: keys in HF PEFT's adapter_model.safetensors; the magnitude has no ``.weight`` suffix there
    peft_names: ClassVar[dict[str, str]] = {
        "lora_A": "lora_A.weight",
        "lora_B": "lora_B.weight",
        "lora_magnitude_vector": "lora_magnitude_vector",
    }

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        self.lora_magnitude_vector = nn.Parameter(
            torch.empty(self.out_features, device=self.lora_B.device, dtype=self.lora_B.dtype)
        )
        # state needed by unmerge; non-persistent so that state_dict keys do not depend on merge state
        self.register_buffer("_merged_norm", None, persistent=False)
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.reset_magnitude()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "lora_magnitude_vector" in self._parameters:  # LoRALinear.__init__ calls this before m exists
            self.reset_magnitude()
        # m depends on W, which may change before training: Lightning materialises a meta-device model by
        # resetting this layer *before* its base layer, and FSDP flows load the base weights afterwards
        self.init_pending = True

    def init_from_base(self) -> None:
        """m ← ‖W + s·B A‖ of the base weights as they are now (called once at the start of training while
        the magnitude has been neither trained nor loaded)."""
        self.reset_magnitude()
        super().init_from_base()

    def reset_magnitude(self) -> None:
        """m ← ‖W + s·B A‖ (= ‖W‖ while B is zero), so that W' = W."""
        if self.lora_magnitude_vector.device.type == "meta":
            return
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.weight_norm())

    def weight_norm(self) -> torch.Tensor:
        """‖W + s·B A‖ per output row as an (out,) tensor, outside the autograd graph (paper §4.3)."""
        with torch.no_grad():
            weight = weight_as_out_in(self.base_layer)  # (out, in)
            combined = weight + self.delta_weight().to(weight.dtype)  # (out, in)
            norm = torch.linalg.vector_norm(combined.float(), dim=1)  # (out,)
        return norm.to(self.lora_magnitude_vector.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.routed_rows(x)
        if rows is not None:
            return self.mixed_forward(x, rows)
        result = self.base_layer(x)  # (..., out) = W x + b
        if self.merged:
            return result
        return self.dora_output(x, result)

    def mixed_output(self, x: torch.Tensor, result: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """y_i ← (m / n) ⊙ (W x_i + s·B A x_i) + b for the rows i of this adapter only: the magnitude scales
        its own rows, the other rows keep the base output."""
        own = self.dora_output(x.index_select(0, rows), result.index_select(0, rows))  # (n, ..., out)
        return result.index_copy_(0, rows, own)  # (batch, ..., out)

    def dora_output(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The DoRA output from the input ``x`` (..., in) and the base output ``result`` = W x + b (..., out)."""
        scale = (self.lora_magnitude_vector / self.weight_norm()).to(result.dtype)  # (out,)
        dropped = self.lora_dropout(x)  # (..., in)
        lora = F.linear(F.linear(dropped.to(self.lora_A.dtype), self.lora_A), self.lora_B)  # (..., out)
        lora = lora.to(result.dtype)
        if not self.training or isinstance(self.lora_dropout, nn.Identity):
            # y = (m / n) ⊙ (W x + s·B A x) + b: three elementwise passes over (..., out) instead of six
            # (the base matmul is reused; b is taken out and put back)
            bias = getattr(self.base_layer, "bias", None)
            direction = torch.add(result if bias is None else result - bias, lora, alpha=self.scaling)
            return (
                direction * scale if bias is None else torch.addcmul(bias.to(result.dtype), direction, scale)
            )
        # training with dropout: the correction sees x̃ = dropout(x), the base path the clean x
        weight = weight_as_out_in(self.base_layer)
        base = F.linear(dropped.to(weight.dtype), weight).to(result.dtype)  # (..., out) = W x̃
        direction = torch.add(base, lora, alpha=self.scaling)  # W x̃ + s·B A x̃
        return result + torch.addcmul(-base, direction, scale)  # + (m/n − 1) ⊙ W x̃ + (m/n) ⊙ s·B A x̃

    def merge(self) -> None:
        weight = weight_as_out_in(self.base_layer)  # (out, in)
        combined = weight + self.delta_weight().to(weight.dtype)
        norm = self.weight_norm()  # (out,), of the unmerged weight: unmerge needs it
        factor = self.lora_magnitude_vector.detach() / norm  # (out,)
        if bool((factor.abs() < EXACT_UNMERGE_EPS).any()):
            # dividing by a (near) zero factor would not give W back: keep a copy instead
            self._unmerged_weight = self.base_layer.weight.detach().clone()
        self._merged_norm = norm
        set_weight_out_in(self.base_layer, factor[:, None].to(weight.dtype) * combined.detach())
        self.merged = True

    def unmerge(self) -> None:
        if self._unmerged_weight is not None:
            self.base_layer.weight.data.copy_(self._unmerged_weight)
        else:
            # W = W' / (m / n) − s·B A, with the norm n of the unmerged weight kept by merge()
            factor = (self.lora_magnitude_vector / self._merged_norm).detach()  # (out,)
            weight = weight_as_out_in(self.base_layer)  # (out, in)
            delta = self.delta_weight().to(weight.dtype)
            set_weight_out_in(self.base_layer, weight / factor[:, None].to(weight.dtype) - delta)
        self._merged_norm = None
        self._unmerged_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, dora=True"


@register_method
@dataclass
class DoRA(LoRA):
    """DoRA (Liu et al. 2024): ``W' = m ⊙ (W + (alpha / r)·B A) / ‖W + (alpha / r)·B A‖`` (row-wise norm,
    detached in backward) on the target linear layers; ``m`` starts at ``‖W‖`` and trains with A and B.

    Same options as :class:`~lightning_peft.methods.lora.LoRA`; saved as an HF PEFT LoRA adapter with
    ``use_dora=True``."""

    method_name: ClassVar[str] = "dora"
    mergeable: ClassVar[bool] = True
    layer_class: ClassVar[type[LoRALinear]] = DoRALinear

    peft_use_dora: ClassVar[bool] = True
