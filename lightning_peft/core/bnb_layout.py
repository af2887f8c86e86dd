"""Keeping bitsandbytes 4-bit weights in their standard layout while lightning-peft manages a model.

bitsandbytes 0.50 (``Linear4bit.forward``), on a CPU with AVX512-BF16, repacks a 4-bit weight **in place** at
the first forward in eval mode whose input does not require grad: ``_convert_weight_packed_for_cpu`` turns the
``(n/2, 1)`` packed codes into an ``(out, in/2)`` tile layout, folds double quantization into the block
statistics and rounds them to bfloat16 (``quant_state.packing_format_for_cpu = True``). Every later forward,
training included, then goes through the inference-only ``gemv_4bit`` kernel, which computes in bfloat16, has
no backward and crashes once its input requires grad. Only ``state_dict()`` converts back, and the way back is
lossy (the bfloat16 statistics stay rounded; double quantization is redone from them) and, without double
quantization, wrong (:func:`standard_layout` does it right).

Design: lightning-peft never lets a 4-bit layer of a model it manages pack. :func:`hold_standard_layout`
(called by ``apply_peft``, so by every attach and load path) brings each 4-bit layer of the model back to the
standard layout, switches bitsandbytes' packing off on it (``support_avx512bf16_for_cpu = False``) and adds a
forward pre-hook that restores the standard layout should anything pack it later. Every layer then computes
exactly as on a CPU without AVX512-BF16, bit for bit, in training and in evaluation. Removing the adapters
(``remove_peft``, ``merge_and_unload``) gives each layer its own setting back.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

#: the bitsandbytes ``Linear4bit`` attribute that allows the CPU packing (absent before bitsandbytes 0.49)
PACKING_FLAG = "support_avx512bf16_for_cpu"


def _params4bit() -> type | None:
    bnb = sys.modules.get("bitsandbytes")
    return None if bnb is None else bnb.nn.Params4bit


def is_packed(weight: Any) -> bool:
    """Whether a bitsandbytes 4-bit weight is in the CPU packing layout (``packing_format_for_cpu``)."""
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def standard_layout(weight: Any, name: str | None = None) -> bool:
    """Convert a 4-bit weight packed for the CPU kernel back to bitsandbytes' standard layout, in place (the
    layer shares the ``QuantState`` object, which is updated in place), with a warning that names ``name``.
    Returns whether anything was converted.

    bitsandbytes' own inverse (``_convert_weight_packed_for_cpu_inverse``, used by its ``state_dict()``) leaves
    the block statistics of a weight without double quantization as packed: transposed to (in/blocksize, out)
    and in bfloat16, so that dequantizing afterwards reads them in the wrong order (errors of the order of the
    weights themselves). Here they are put back in block order as float32 (the values keep their bfloat16
    rounding, which the packing made)."""
    if not is_packed(weight):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    nested = bool(getattr(weight.quant_state, "original_nested", weight.quant_state.nested))
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    if not nested and state.absmax.dim() == 2:
        state.absmax = state.absmax.T.reshape(-1).to(torch.float32).contiguous()  # (blocks,) in block order
    weight.data, weight.quant_state = data, state
    if name is not None:
        _warn_repacked([name or "a 4-bit layer"])
    return True


def four_bit_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module of ``model`` whose own ``weight`` is a quantized bitsandbytes 4-bit parameter."""
    params4bit = _params4bit()
    if params4bit is None:
        return []
    found = []
    for name, module in model.named_modules():
        weight = module.__dict__.get("_parameters", {}).get("weight")
        if isinstance(weight, params4bit) and weight.quant_state is not None:
            found.append((name, module))
    return found


def _warn_repacked(names: list[str]) -> None:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    rank_zero_warn(
        f"lightning-peft: bitsandbytes had repacked the 4-bit weight of {shown} for its AVX512-BF16 CPU kernel "
        "(an eval-mode forward); lightning-peft converts it back to the standard layout. bitsandbytes' packing "
        "rounds the block statistics to bfloat16, so these layers now differ slightly from the checkpoint. To "
        "keep them exact, call lightning_peft.core.quantized.hold_standard_layout(model) right after loading, "
        "before any evaluation, or attach the adapter first."
    )


class StandardLayoutHook:
    """Forward pre-hook of a held 4-bit layer: restores the standard layout if anything packed the weight
    (a picklable object, not a closure, so that the model can still be copied and sent to other processes)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, args: Any) -> None:
        standard_layout(module._parameters["weight"], self.name or type(module).__name__)


class StandardLayoutStateHook(StandardLayoutHook):
    """State-dict pre-hook of a held 4-bit layer: runs before bitsandbytes' ``_save_to_state_dict``, whose own
    conversion back is wrong without double quantization (see :func:`standard_layout`)."""

    def __call__(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:  # type: ignore[override]
        standard_layout(module._parameters["weight"], self.name or type(module).__name__)


class LayoutHold:
    """What :func:`hold_standard_layout` changed on one layer; ``remove()`` undoes it (a hook handle)."""

    def __init__(self, module: nn.Module, handles: list[Any], flag: Any) -> None:
        self.module, self.handles, self.flag = module, handles, flag

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        if self.flag is not None:
            setattr(self.module, PACKING_FLAG, self.flag)


def is_held(module: nn.Module) -> bool:
    return any(isinstance(hook, StandardLayoutHook) for hook in module._forward_pre_hooks.values())


def hold_standard_layout(model: nn.Module) -> list[LayoutHold]:
    """Keep every bitsandbytes 4-bit layer of ``model`` (adapted or not) in the standard layout: convert packed
    weights back (with a warning, as that conversion is not exact), switch bitsandbytes' CPU packing off and add
    the pre-hook. Layers already held are left alone. Returns one removable handle per newly held layer."""
    holds: list[LayoutHold] = []
    repacked: list[str] = []
    for name, module in four_bit_layers(model):
        if standard_layout(module._parameters["weight"]):
            repacked.append(name)
        if is_held(module):
            continue
        flag = getattr(module, PACKING_FLAG, None)
        if flag is not None:
            setattr(module, PACKING_FLAG, False)
        handles = [
            module.register_forward_pre_hook(StandardLayoutHook(name)),
            module.register_state_dict_pre_hook(StandardLayoutStateHook(name)),
        ]
        holds.append(LayoutHold(module, handles, flag))
    if repacked:
        _warn_repacked(repacked)
    return holds


def standard_layout_everywhere(model: nn.Module) -> list[str]:
    """Convert every packed 4-bit weight of ``model`` back (with the warning); returns the layers converted."""
    converted = [name for name, m in four_bit_layers(model) if standard_layout(m._parameters["weight"])]
    if converted:
        _warn_repacked(converted)
    return converted


def unpacked_numel(param: torch.Tensor) -> int | None:
    """The number of values of a 4-bit parameter (from its quantisation state), or ``None`` for any other."""
    params4bit = _params4bit()
    if params4bit is None or not isinstance(param, params4bit) or param.quant_state is None:
        return None
    return int(torch.Size(param.quant_state.shape).numel())
