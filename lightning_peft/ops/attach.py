"""Attaching adapters to a model and taking them out: validate every method first (nothing half-applied), freeze the
base, inject, roll back on failure; remove restores the model as it was."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_peft.core.quantized import hold_standard_layout, quantized_merge
from lightning_peft.core.record import (
    DEFAULT_ADAPTER_NAME,
    AdapterEntry,
    drop_record,
    ensure_record,
    get_record,
    is_attached,
    mark_saved,
)
from lightning_peft.core.targeting import ModuleTargets, replace_module, resolve_modules
from lightning_peft.methods.base import PEFTMethod
from lightning_peft.methods.registry import available_methods
from lightning_peft.ops.parameters import ParameterCount, count_parameters, peft_layers, refresh_requires_grad
from lightning_peft.ops.resolve import accepts_inner_model
from lightning_peft.ops.routing import install_routing


def as_method_list(methods: PEFTMethod | Sequence[PEFTMethod]) -> list[PEFTMethod]:
    # a string or a dict is one (wrong) item, not a sequence of them
    single = isinstance(methods, (PEFTMethod, str, bytes, dict)) or not isinstance(methods, Sequence)
    items = [methods] if single else list(methods)
    if not items:
        raise ValueError("method must be a PEFT method configuration or a non-empty list of them, got []")
    for item in items:
        if not isinstance(item, PEFTMethod):
            raise TypeError(
                f"method must be a PEFT method configuration ({', '.join(available_methods())}), "
                f"got {type(item).__name__}: {item!r}"
            )
    return items


def plan_methods(
    model: nn.Module, methods: Sequence[PEFTMethod], adapter_name: str = DEFAULT_ADAPTER_NAME
) -> tuple[list[ModuleTargets], list[str]]:
    """Validate every method against ``model`` without touching it; returns the targets and modules to save."""
    record = get_record(model)
    if record is not None and adapter_name in record.adapters:
        names = [type(m).__name__ for m in record.adapters[adapter_name].methods]
        raise ValueError(
            f"PEFT methods {names} are already attached to this {type(model).__name__} as adapter "
            f"{adapter_name!r}; attaching twice is not allowed. Call merge_and_unload(model) first, load a fresh "
            "base model, or add another adapter under a new name with add_adapter(model, method, name)."
        )
    if not is_attached(model) and any(True for _ in peft_layers(model)):
        raise ValueError(
            f"this {type(model).__name__} already contains PEFT layers; attaching twice is not allowed"
        )
    plans = [m.plan(model) for m in methods]
    owner: dict[str, str] = {}
    for method, targets in zip(methods, plans):
        for name in targets:
            if name in owner:
                raise ValueError(
                    f"methods {owner[name]} and {type(method).__name__} both target module {name!r}; two methods "
                    "cannot wrap the same layer. Use exclude_modules on one of them."
                )
            owner[name] = type(method).__name__
    save = resolve_modules(model, [p for m in methods for p in m.modules_to_save], "modules_to_save")
    return plans, save


def apply_peft(
    model: nn.Module,
    methods: PEFTMethod | Sequence[PEFTMethod],
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    activate: bool = True,
) -> ParameterCount:
    """Freeze ``model``, attach ``methods`` (as the adapter ``adapter_name``) and make exactly the active
    adapters' parameters trainable. ``activate=False`` attaches the adapter switched off (see
    :func:`lightning_peft.add_adapter`).

    Everything is validated first: on error nothing in the model has changed.
    """
    method_list = as_method_list(methods)
    plans, save = plan_methods(model, method_list, adapter_name)
    created = get_record(model) is None
    record = ensure_record(model)
    first = not record.adapters
    if first:
        record.flags = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}
        record.active = []
    existing = {id(layer) for _, layer in peft_layers(model)}
    holds = hold_standard_layout(model)  # bitsandbytes 4-bit: no AVX512-BF16 CPU packing (core/quantized.py)
    record.adapters[adapter_name] = AdapterEntry(methods=[])
    record.attaching = adapter_name
    try:
        for method, targets in zip(method_list, plans):
            method.inject(model, targets)
        for name in save:
            mark_saved(model, model.get_submodule(name))
        for _, layer in peft_layers(model):
            if id(layer) not in existing:
                layer.adapter_name, layer.active = adapter_name, activate
        record.adapters[adapter_name].methods = method_list
        if activate:
            record.active.append(adapter_name)
        install_routing(model)
        record.handles.extend(holds)  # removed with the adapters, like the routing hooks
        refresh_requires_grad(model)
    except BaseException:
        for hold in holds:
            hold.remove()
        # plan() should have caught every problem; if inject still fails, leave the model as it was
        if first:
            take_out_adapters(model, merged_ok=False)
        else:  # only the layers of this attach go; the other adapters stay
            for path, layer in sorted(peft_layers(model), key=lambda item: -item[0].count(".")):
                if id(layer) not in existing:
                    replace_module(model, path, layer.base_layer)
            record.adapters.pop(adapter_name, None)
            refresh_requires_grad(model)
        if created:
            drop_record(model)
        raise
    finally:
        record.attaching = None
    return count_parameters(model)


@accepts_inner_model  # issue 20: also given a module inside the one PEFT was attached to
def remove_peft(model: nn.Module) -> nn.Module:
    """Take every adapter out without merging: the base model as it was before :func:`apply_peft`,
    with the parameters' original ``requires_grad`` flags (BitFit/modules_to_save changes stay), and no
    lightning-peft state or hook left on the module."""
    take_out_adapters(model, merged_ok=False)
    drop_record(model)
    return model


def take_out_adapters(model: nn.Module, merged_ok: bool) -> None:
    """Replace every PEFT layer by what it wraps (unmerging first unless ``merged_ok``), restore the
    ``requires_grad`` flags and forget the adapters; the rest of the record (hooks) stays."""
    # innermost first, so that nested replacements see their parents intact
    for name, layer in sorted(peft_layers(model), key=lambda item: -item[0].count(".")):
        if layer.merged and not merged_ok:
            with torch.no_grad(), quantized_merge(layer, merge=False):
                layer.unmerge()
        replace_module(model, name, layer.unload())
    record = get_record(model)
    if record is None:
        return
    flags = record.flags or {}
    for name, param in model.named_parameters(remove_duplicate=False):
        param.requires_grad_(flags.get(name, param.requires_grad))
    record.adapters.clear()
    record.active = []
    record.flags = None
    for handle in record.handles:
        handle.remove()
    record.handles.clear()
