"""Model-level operations shared by every method: attach, freeze, count, merge, unload, adapter state."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_peft.methods.base import PEFTLayer, PEFTMethod
from lightning_peft.methods.registry import available_methods
from lightning_peft.ops.mixed_batch import BASE_NAME, routing_hooks
from lightning_peft.quantized import dequantize_model, parameter_numel, quantized_merge
from lightning_peft.record import (
    DEFAULT_ADAPTER,
    AdapterEntry,
    attached_methods,
    drop_record,
    ensure_record,
    get_record,
    is_attached,
    mark_saved,
    marked_parameter_names,
)
from lightning_peft.targeting import ModuleTargets, replace_module, resolve_modules

__all__ = ["BASE_NAME", "attached_methods", "is_attached"]  # re-exported: the record's view of a model

#: infixes that wrappers (FSDP1, activation checkpointing) add to ``named_parameters()`` names but that
#: ``state_dict()`` keys do not have
WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def state_dict_key(name: str) -> str:
    """A ``named_parameters()`` name as ``state_dict()`` keys (and checkpoints, adapter files) spell it."""
    for infix in WRAPPER_INFIXES:
        name = name.replace(infix, "")
    return name


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


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


def peft_layers(model: nn.Module) -> Iterator[tuple[str, PEFTLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, PEFTLayer):
            yield name, module


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters the active adapter(s) own: what trains and what checkpoints hold, in
    ``model.named_parameters()`` order."""
    wanted = marked_parameter_names(model)
    for name, layer in peft_layers(model):
        if not layer.active:
            continue
        prefix = f"{name}." if name else ""
        wanted.update(prefix + local for local in layer.peft_parameter_names())
    return [n for n, _ in model.named_parameters(remove_duplicate=False) if n in wanted]


def count_parameters(model: nn.Module) -> ParameterCount:
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = parameter_numel(p)  # a packed 4-bit weight counts its values, not its bytes
        total += n
        if p.requires_grad:
            trainable += n
    return ParameterCount(trainable, total)


def plan_methods(
    model: nn.Module, methods: Sequence[PEFTMethod], adapter_name: str = DEFAULT_ADAPTER
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
    adapter_name: str = DEFAULT_ADAPTER,
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
        refresh_requires_grad(model)
    except BaseException:
        # plan() should have caught every problem; if inject still fails, leave the model as it was
        if first:
            _take_out_adapters(model, merged_ok=False)
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


def remove_peft(model: nn.Module) -> nn.Module:
    """Take every adapter out without merging: the base model as it was before :func:`apply_peft`,
    with the parameters' original ``requires_grad`` flags (BitFit/modules_to_save changes stay), and no
    lightning-peft state or hook left on the module."""
    _take_out_adapters(model, merged_ok=False)
    drop_record(model)
    return model


def _take_out_adapters(model: nn.Module, merged_ok: bool) -> None:
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


def install_routing(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])`` choose an adapter per
    sample (``"__base__"``: none; see :mod:`lightning_peft.ops.mixed_batch`). The handles live in the record, so
    removing the adapters removes them."""
    record = ensure_record(model)
    if record.handles:
        return
    record.handles = routing_hooks(model)


def refresh_requires_grad(model: nn.Module) -> None:
    """requires_grad=True for the adapter's parameters and False for every other one."""
    trainable = set(trainable_parameter_names(model))
    for name, param in model.named_parameters(remove_duplicate=False):
        param.requires_grad_(name in trainable)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed by their names in ``model.state_dict()``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {state_dict_key(name): params[name].detach() for name in trainable_parameter_names(model)}


def check_adapter_state(model: nn.Module, state: dict[str, Any], source: str) -> None:
    """Raise when ``state`` lacks an adapter tensor of ``model`` or holds one of the wrong shape."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in trainable_parameter_names(model):
        key = state_dict_key(name)  # ``state`` is keyed like state_dict(), without wrapper infixes
        if key not in state:
            raise ValueError(f"{source} has no tensor {key!r}, which the attached adapter needs")
        expected = tuple(params[name].shape)  # a DTensor (FSDP2) reports its global shape
        got = tuple(state[key].shape)
        if expected != got:
            raise ValueError(f"{source}: tensor {key!r} has shape {got} but the model expects {expected}")


def load_adapter_state(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter state"
) -> None:
    check_adapter_state(model, state, source)
    names = [state_dict_key(n) for n in trainable_parameter_names(model)]
    model.load_state_dict({n: state[n] for n in names}, strict=False)


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
    changed = 0
    for _name, layer in layers:
        if layer.merged == merge:
            continue
        with quantized_merge(layer, merge):  # dequantize, merge, requantize for bitsandbytes base layers
            layer.merge() if merge else layer.unmerge()
        changed += 1
    if layers and not changed:
        rank_zero_warn(f"the adapter is already {'merged' if merge else 'unmerged'}; nothing changed")


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every mergeable adapter into its base weights (inference then costs what the base model costs)."""
    with torch.no_grad():
        _set_merged(model, True)
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapter`."""
    with torch.no_grad():
        _set_merged(model, False)
    return model


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
    _take_out_adapters(model, merged_ok=True)
    drop_record(model)
    return model
