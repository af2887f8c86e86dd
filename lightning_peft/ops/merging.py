"""Folding adapters into the base weights and back (also for bitsandbytes bases), and ``merge_and_unload``."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_peft.core.quantized import dequantize_model, quantized_merge, standard_layout_everywhere
from lightning_peft.core.record import (
    drop_record,
)
from lightning_peft.ops.attach import take_out_adapters
from lightning_peft.ops.parameters import peft_layers
from lightning_peft.ops.resolve import accepts_inner_model


def _set_merged(model: nn.Module, merge: bool) -> None:
    # only the active adapters fold in (a switched-off one must stay out of the weights). Layers stacked on one
    # base (named adapters) merge innermost first and unmerge outermost first, so each undoes exactly its own
    # step even when a step is not additive (DoRA rescales the merged weight)
    layers = sorted(
        (item for item in peft_layers(model) if item[1].active or item[1].merged),
        key=lambda item: item[0].count("."),
        reverse=merge,
    )
    blocked = sorted({type(layer).__name__ for _, layer in layers if not layer.mergeable})
    if blocked:
        raise TypeError(
            f"{' and '.join(blocked)} cannot be merged into the base weights; only LoRA, DoRA and IA3 layers "
            "(and BitFit, which changes the base biases in place) can. Keep the adapter attached for inference, "
            "or call remove_peft(model) to take it out without merging"
        )
    standard_layout_everywhere(model)  # bitsandbytes 4-bit weights repacked for the CPU kernel go back first
    changed = 0
    for _name, layer in layers:
        if layer.merged == merge:
            continue
        with quantized_merge(layer, merge):  # dequantize, merge, requantize for bitsandbytes base layers
            layer.merge() if merge else layer.unmerge()
        changed += 1
    if layers and not changed:
        rank_zero_warn(f"the adapter is already {'merged' if merge else 'unmerged'}; nothing changed")


@accepts_inner_model  # issue 20: also given a module inside the one PEFT was attached to
def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every mergeable adapter into its base weights (inference then costs what the base model costs)."""
    with torch.no_grad():
        _set_merged(model, True)
    return model


@accepts_inner_model  # issue 20: also given a module inside the one PEFT was attached to
def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapter`."""
    with torch.no_grad():
        _set_merged(model, False)
    return model


@accepts_inner_model  # issue 20: also given a module inside the one PEFT was attached to
def merge_and_unload(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge the adapter and give back the plain model: original module types, no adapter modules left.

    ``dequantize=True`` first turns bitsandbytes 4-bit/8-bit layers into plain float ``nn.Linear`` layers,
    so the merge is exact and the model comes back in full precision; otherwise merging into a quantized
    layer rounds the merged weight to its quantisation grid (with a warning)."""
    if dequantize:
        if any(layer.merged for _, layer in peft_layers(model)):
            unmerge_adapter(model)  # puts quantized weights back exactly, so that the float merge is exact
        dequantize_model(model)
    layers = list(peft_layers(model))
    if layers and any(not layer.merged for _, layer in layers):
        merge_adapter(model)
    take_out_adapters(model, merged_ok=True)
    drop_record(model)
    return model
