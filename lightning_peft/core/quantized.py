"""Quantized base layers: bitsandbytes ``Linear4bit`` (NF4/FP4, with or without double quantization) and
``Linear8bitLt`` (LLM.int8()), as transformers' ``BitsAndBytesConfig`` loads them.

Everything here is a no-op for ordinary models. bitsandbytes is never imported by this module: a model that
holds bitsandbytes layers has already imported it, so ``sys.modules`` tells whether any can exist.

* counting: a 4-bit weight is stored packed (two values per byte, shape ``(n/2, 1)``); its real number of
  elements is the shape recorded in its quantisation state;
* reading: :func:`dequantized_weight` gives the (out, in) floating-point weight the layer computes with
  (DoRA's norm needs it);
* merging: the adapter is added to the dequantized weight, which is quantized again with the layer's own
  settings. That rounds the merged weight to the 4-bit (8-bit) grid: :func:`merge_error_bound` is the
  per-element bound, and a warning reports the error actually measured. The original packed tensors are kept
  so that unmerging restores them bit for bit;
* :func:`dequantize_model` swaps every quantized layer for a plain ``nn.Linear`` (``merge_and_unload(model,
  dequantize=True)``);
* layout: :func:`hold_standard_layout` (``apply_peft`` calls it) keeps every 4-bit layer of an adapted model
  in bitsandbytes' standard layout, switching off its AVX512-BF16 CPU packing (``core/bnb_layout.py``); every
  function here first converts a packed weight back;

The FSDP check on 4-bit storage lives in :mod:`lightning_peft.distributed.strategies`, the guard for Lightning's
``BitsandbytesPrecision`` plugin in :mod:`lightning_peft.lightning.precision`.
"""

from __future__ import annotations

import copy
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_peft.core.bnb_layout import (  # noqa: F401 (re-exported: the public home of these is here)
    hold_standard_layout,
    is_packed,
    standard_layout,
    standard_layout_everywhere,
    unpacked_numel,
)

#: largest value of the row statistics that LLM.int8() divides by
_INT8_MAX = 127.0


def _bnb() -> Any:
    return sys.modules.get("bitsandbytes")


def quantization_of(module: nn.Module) -> str | None:
    """``"4bit"``, ``"8bit"`` or ``None``: whether ``module``'s weight is a quantized bitsandbytes tensor."""
    bnb = _bnb()
    if bnb is None:
        return None
    # the module's own parameter: adapter layers forward ``.weight`` to the layer they wrap
    weight = module.__dict__.get("_parameters", {}).get("weight")
    if isinstance(weight, bnb.nn.Params4bit) and weight.quant_state is not None:
        return "4bit"
    if isinstance(weight, bnb.nn.Int8Params) and weight.dtype == torch.int8:
        return "8bit"
    return None


def is_quantized(module: nn.Module) -> bool:
    return quantization_of(module) is not None


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    if _bnb() is None:
        return
    for name, module in model.named_modules():
        if is_quantized(module):
            yield name, module


def parameter_numel(param: torch.Tensor) -> int:
    """The number of values ``param`` holds: for a packed 4-bit weight the unpacked count (not bytes). A weight
    that bitsandbytes repacked for its CPU kernel is first brought back to the standard layout."""
    numel = unpacked_numel(param)
    if numel is None:
        return param.numel()
    standard_layout(param, "a 4-bit layer")
    return numel


def quantization_state_keys(model: nn.Module) -> set[str]:
    """``state_dict()`` keys that hold quantisation statistics rather than parameters (``...weight.absmax``,
    ``...weight.quant_state.bitsandbytes__nf4``, ``...SCB``, ``...weight_format``). A layer keeps its own; loading
    them back is neither needed nor always possible (an 8-bit layer that has run refuses its ``SCB``)."""
    keys: set[str] = set()
    standard_layout_everywhere(model)  # (bitsandbytes' state_dict() would convert back too, silently)
    for name, module in quantized_modules(model):
        own = {n for n, _ in module.named_parameters(recurse=False)} | {
            n for n, _ in module.named_buffers(recurse=False)
        }
        prefix = f"{name}." if name else ""
        keys |= {prefix + k for k in module.state_dict() if k not in own}
    return keys


# -- reading and writing the weight ------------------------------------------------------------------------
def _standard_layout(module: nn.Module) -> None:
    """Before reading or writing a 4-bit weight: undo bitsandbytes' CPU packing (``core/bnb_layout.py``)."""
    standard_layout(module.weight, type(module).__name__)


def _int8_scales(module: nn.Module) -> torch.Tensor:
    # row scales live on the weight until the first forward moves them to the layer's matmul state
    scales = getattr(module.weight, "SCB", None)
    return scales if scales is not None else module.state.SCB


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) floating-point weight of a quantized layer (a new tensor, outside autograd)."""
    import bitsandbytes.functional as F

    kind = quantization_of(module)
    with torch.no_grad():
        if kind == "4bit":
            _standard_layout(module)
            return F.dequantize_4bit(module.weight.data, module.weight.quant_state)
        if kind == "8bit":
            return F.int8_vectorwise_dequant(module.weight.data, _int8_scales(module).float())
    raise TypeError(f"{type(module).__name__} holds no bitsandbytes 4-bit or 8-bit weight")


def float_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as (out, in) floating point: dequantized for a quantized layer, as is otherwise."""
    return dequantized_weight(module) if is_quantized(module) else module.weight


def requantize(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantize the (out, in) float ``weight`` with the layer's own settings into its existing parameter."""
    import bitsandbytes.functional as F

    kind = quantization_of(module)
    param = module.weight
    with torch.no_grad():
        if kind == "4bit":
            _standard_layout(module)
            old = param.quant_state
            data, state = F.quantize_4bit(
                weight.to(device=param.device, dtype=old.dtype).contiguous(),
                blocksize=old.blocksize,
                compress_statistics=bool(old.nested),
                quant_type=old.quant_type,
                quant_storage=param.data.dtype,
            )
            param.data, param.quant_state = data, state
            if getattr(module, "quant_state", None) is not None:
                module.quant_state = state
        elif kind == "8bit":
            # LLM.int8() quantizes row-wise from float16, as bitsandbytes does when the weight is first moved
            data, scales, _ = F.int8_vectorwise_quant(weight.to(param.device, torch.float16).contiguous())
            _set_int8(module, data, scales)
        else:
            raise TypeError(f"{type(module).__name__} holds no bitsandbytes 4-bit or 8-bit weight")


def _set_int8(module: nn.Module, data: torch.Tensor, scales: torch.Tensor) -> None:
    module.weight.data = data
    if getattr(module.weight, "SCB", None) is not None:
        module.weight.CB, module.weight.SCB = data, scales
    if module.state.CB is not None or module.state.SCB is not None:
        module.state.CB, module.state.SCB = data, scales


def merge_error_bound(module: nn.Module) -> torch.Tensor:
    """Per-element bound (out, in) on ``|requantized − merged|`` for the layer's current quantisation state:
    half the widest gap between neighbouring 4-bit code values times the block's absmax (NF4: 0.152·absmax,
    FP4: 0.167·absmax over blocks of 64), or half a step of the row scale for LLM.int8() (0.5·absmax_row/127,
    plus the float16 rounding of the input, 2⁻¹¹ relative). With double quantization the stored absmax is itself
    rounded, so an element at a block's edge can exceed this slightly (1.06× measured on MiniLM)."""
    kind = quantization_of(module)
    if kind == "8bit":
        scales = _int8_scales(module).float()
        out_features, in_features = module.weight.shape
        return (0.5 * scales / _INT8_MAX)[:, None].expand(out_features, in_features)
    if kind != "4bit":
        raise TypeError(f"{type(module).__name__} holds no bitsandbytes 4-bit or 8-bit weight")
    import bitsandbytes.functional as F

    _standard_layout(module)
    state = module.weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    codes = torch.sort(state.code.float()).values
    half_gap = float((codes[1:] - codes[:-1]).max()) / 2
    per_block = half_gap * absmax.float().abs()  # (blocks,)
    shape = torch.Size(state.shape)
    return per_block.repeat_interleave(state.blocksize)[: shape.numel()].reshape(shape)


# -- merging ----------------------------------------------------------------------------------------------
@dataclass
class _Snapshot:
    data: torch.Tensor
    state: Any


#: layer -> its base layer's quantized tensors before merging, so that unmerging restores them exactly
_SNAPSHOTS: weakref.WeakKeyDictionary[nn.Module, _Snapshot] = weakref.WeakKeyDictionary()


def _snapshot(module: nn.Module) -> _Snapshot:
    if quantization_of(module) == "4bit":
        _standard_layout(module)
        return _Snapshot(module.weight.data.clone(), copy.deepcopy(module.weight.quant_state))
    return _Snapshot(module.weight.data.clone(), _int8_scales(module).clone())


def _restore(module: nn.Module, snapshot: _Snapshot) -> None:
    if quantization_of(module) == "4bit":
        _standard_layout(module)
        module.weight.data, module.weight.quant_state = snapshot.data, snapshot.state
        if getattr(module, "quant_state", None) is not None:
            module.quant_state = snapshot.state
    else:
        _set_int8(module, snapshot.data, snapshot.state)


@contextmanager
def _as_float_weight(module: nn.Module) -> Iterator[nn.Parameter]:
    """Inside the block ``module.weight`` is a plain float parameter holding the dequantized weight, so that a
    method's merge arithmetic runs unchanged; afterwards the quantized parameter is back in place."""
    original = module._parameters["weight"]
    temporary = nn.Parameter(dequantized_weight(module), requires_grad=False)
    module._parameters["weight"] = temporary
    try:
        yield temporary
    finally:
        module._parameters["weight"] = original


@contextmanager
def quantized_merge(layer: nn.Module, merge: bool) -> Iterator[None]:
    """Around a PEFT layer's ``merge()`` / ``unmerge()``: when its base layer is quantized, run the method's
    arithmetic on the dequantized weight, then quantize the merged weight again (``merge``, with a warning that
    reports the rounding error) or put the original packed tensors back bit for bit (``unmerge``)."""
    from lightning_peft.core.targeting import innermost

    base = innermost(layer)  # below the adapter layers of other named adapters too
    if base is layer or not is_quantized(base):
        yield
        return
    if merge:
        _SNAPSHOTS[layer] = _snapshot(base)
        with _as_float_weight(base) as merged:
            yield
        requantize(base, merged.data)
        bound = float(merge_error_bound(base).max())
        error = float((dequantized_weight(base) - merged.data.to(torch.float32)).abs().max())
        rank_zero_warn(
            f"lightning-peft: merging into a quantized {type(base).__name__} rounds the merged weight to its "
            f"{quantization_of(base)} grid: max |error| {error:.3g} (bound {bound:.3g}, half a "
            "quantisation step). Unmerging restores the original quantized weight exactly; for an exact merge "
            "use merge_and_unload(model, dequantize=True)."
        )
        return
    with _as_float_weight(base):
        yield
    snapshot = _SNAPSHOTS.pop(layer, None)
    if snapshot is None:
        raise RuntimeError(f"no quantized weight was kept for this merged {type(layer).__name__}")
    _restore(base, snapshot)


# -- leaving quantisation --------------------------------------------------------------------------------
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every bitsandbytes 4-bit/8-bit linear layer of ``model`` (inside PEFT layers too) by a plain
    ``nn.Linear`` holding its dequantized weight, and drop transformers' quantisation settings."""
    from lightning_peft.core.targeting import replace_module

    for name, module in list(quantized_modules(model)):
        weight = dequantized_weight(module)
        bias = module.bias
        dtype = bias.dtype if bias is not None and bias.is_floating_point() else weight.dtype
        linear = nn.Linear(
            module.in_features, module.out_features, bias=bias is not None, device=weight.device, dtype=dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        linear.weight.requires_grad_(module.weight.requires_grad)
        if bias is not None:
            linear.bias.requires_grad_(bias.requires_grad)
        linear.train(module.training)
        replace_module(model, name, linear)
    for module in model.modules():
        _forget_quantization(module)
    return model


def _forget_quantization(module: nn.Module) -> None:
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "quantization_config"):
        return
    del config.quantization_config
    for attribute in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        if attribute in module.__dict__:
            delattr(module, attribute)
    for attribute in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(module, attribute):
            setattr(module, attribute, False)
