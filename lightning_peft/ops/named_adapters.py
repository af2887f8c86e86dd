"""Many named adapters on one base model: add, switch, disable, delete, and isolate one for saving or loading.

Every adapter is a set of :class:`~lightning_peft.PEFTLayer` modules tagged with its name. A second adapter on
a layer that already has one wraps the first (``query`` → ``LoRALinear(b)`` → ``LoRALinear(a)`` → ``Linear``);
a switched-off layer passes its input straight to what it wraps, so each adapter computes exactly what it
would compute alone. The record keeps the adapters' configurations and which of them are active: the active
ones run in ``forward`` and train, the others are frozen.

Additional adapters may be LoRA, DoRA, (IA)³ or bottleneck adapters without ``modules_to_save``: BitFit and
``modules_to_save`` change base tensors in place, and prompt/prefix tuning change the sequence, none of which
can be switched off per adapter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_peft.core.record import AdapterRecord, get_record, record_set_aside
from lightning_peft.methods.base import PEFTLayer, PEFTMethod
from lightning_peft.ops.attach import apply_peft, as_method_list, remove_peft
from lightning_peft.ops.parameters import ParameterCount, peft_layers, refresh_requires_grad
from lightning_peft.ops.resolve import accepts_inner_model
from lightning_peft.ops.routing import BASE_NAME

#: methods that can be one of several named adapters (see the module docstring)
STACKABLE = ("lora", "dora", "ia3", "adapter", "adapter_fusion")
#: methods that may be active together: their updates add up, so the order of the layers does not matter
ADDITIVE = ("lora",)


def _record(model: nn.Module) -> AdapterRecord:
    record = get_record(model)
    if record is None or not record.adapters:
        raise ValueError(
            f"no adapter is attached to this {type(model).__name__}; use add_adapter or apply_peft"
        )
    return record


def _check_names(record: AdapterRecord, names: Sequence[str], argument: str) -> None:
    unknown = [n for n in names if n not in record.adapters]
    if unknown:
        raise ValueError(
            f"{argument}: unknown adapter(s) {unknown}; loaded adapters are {list(record.adapters)}"
        )


@accepts_inner_model  # issue 20: also given a module inside the one PEFT was attached to
def list_adapters(model: nn.Module) -> list[str]:
    """The names of every adapter loaded on ``model``, in the order they were added."""
    record = get_record(model)
    return list(record.adapters) if record is not None else []


@accepts_inner_model  # issue 20: also given a module inside the one PEFT was attached to
def active_adapters(model: nn.Module) -> list[str]:
    """The adapters that run in ``forward`` and train."""
    record = get_record(model)
    return list(record.active) if record is not None else []


@accepts_inner_model  # issue 20: also given a module inside the one PEFT was attached to
def add_adapter(
    model: nn.Module, method: PEFTMethod | Sequence[PEFTMethod], adapter_name: str
) -> ParameterCount:
    """Attach ``method`` as a new adapter named ``adapter_name``. The base stays frozen. The first adapter of a
    model becomes active; later ones are added switched off (call :func:`set_adapter`), as in HF PEFT."""
    methods = as_method_list(method)
    if (
        not isinstance(adapter_name, str)
        or not adapter_name
        or adapter_name == BASE_NAME
        or "/" in adapter_name
    ):
        raise ValueError(
            f"adapter_name must be a non-empty string without '/', other than {BASE_NAME!r}, got {adapter_name!r}"
        )
    record = get_record(model)
    if record is None or not record.adapters:
        return apply_peft(model, methods, adapter_name)
    for m in [*methods, *record.methods]:
        if m.method_name not in STACKABLE or m.modules_to_save:
            raise ValueError(
                f"add_adapter({adapter_name!r}): {type(m).__name__}"
                + (f" with modules_to_save={m.modules_to_save}" if m.modules_to_save else "")
                + f" cannot share {type(model).__name__} with other named adapters: it changes base tensors in "
                f"place or the input sequence, so it cannot be switched off per adapter. Adapters that can: "
                f"{list(STACKABLE)} without modules_to_save"
            )
    if any(layer.merged for _, layer in peft_layers(model)):
        raise RuntimeError(
            f"add_adapter({adapter_name!r}): unmerge the merged adapters first (unmerge_adapter)"
        )
    return apply_peft(model, methods, adapter_name, activate=False)


@accepts_inner_model  # issue 20: also given a module inside the one PEFT was attached to
def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> None:
    """Make ``adapter_name`` (or a list of names) the adapters that run in ``forward`` and train; every other
    adapter is switched off and frozen. Several adapters may be active together when all are LoRA."""
    record = _record(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    _check_names(record, names, "set_adapter")
    if len(names) > 1:
        kinds = {m.method_name for n in names for m in record.adapters[n].methods}
        if not kinds <= set(ADDITIVE):
            raise ValueError(
                f"set_adapter({names}): only LoRA adapters can be active together (their updates add up); "
                f"these use {sorted(kinds)}. Activate one, or combine them with combine_adapters"
            )
    if any(layer.merged for _, layer in peft_layers(model)):
        raise RuntimeError("set_adapter: unmerge the merged adapters first (unmerge_adapter)")
    for _, layer in peft_layers(model):
        layer.active = layer.adapter_name in names
    record.active = names
    refresh_requires_grad(model)


@accepts_inner_model  # issue 20: also given a module inside the one PEFT was attached to
@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block, ``model`` computes the base model's outputs (every adapter switched off)."""
    record = _record(model)
    layers = [layer for _, layer in peft_layers(model)]
    if any(layer.merged for layer in layers):
        raise RuntimeError(
            "disable_adapters: an adapter is merged into the base weights; call unmerge_adapter first"
        )
    in_place = [m for m in record.methods if m.method_name == "bitfit" or m.modules_to_save]
    if in_place:
        rank_zero_warn(
            f"disable_adapters: {[type(m).__name__ for m in in_place]} trained base tensors in place (BitFit "
            "biases, modules_to_save); those stay as trained inside the block"
        )
    before = [layer.active for layer in layers]
    for layer in layers:
        layer.active = False
    try:
        yield
    finally:
        for layer, active in zip(layers, before):
            layer.active = active


@accepts_inner_model  # issue 20: also given a module inside the one PEFT was attached to
def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove the adapter ``adapter_name``: its modules and tensors go (the memory is freed). Deleting the last
    adapter is :func:`~lightning_peft.remove_peft`."""
    record = _record(model)
    _check_names(record, [adapter_name], "delete_adapter")
    if len(record.adapters) == 1:
        remove_peft(model)
        return
    for path, layer in sorted(peft_layers(model), key=lambda item: -item[0].count(".")):
        if layer.adapter_name == adapter_name:
            if layer.merged:
                layer.unmerge()
            _put(model, path, layer.unload())
    del record.adapters[adapter_name]
    if adapter_name in record.active:
        record.active.remove(adapter_name)
        if not record.active:
            rank_zero_warn(
                f"delete_adapter: {adapter_name!r} was the active adapter; none is active now "
                f"(set_adapter(model, name) with one of {list(record.adapters)})"
            )
    refresh_requires_grad(model)


def _put(model: nn.Module, path: str, module: nn.Module | None) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@contextmanager
def only_adapter(model: nn.Module, adapter_name: str) -> Iterator[None]:
    """Inside the block ``model`` looks like a model with the single active adapter ``adapter_name``: the other
    adapters' layers are unplugged (not freed) and put back afterwards. Saving and loading one adapter of
    many use this, so that names, keys and configurations are exactly those of the adapter alone."""
    record = _record(model)
    _check_names(record, [adapter_name], "adapter_name")
    if list(record.adapters) == [adapter_name] and record.active == [adapter_name]:
        yield
        return
    own = [layer for _, layer in peft_layers(model) if layer.adapter_name == adapter_name]
    saved = (record.adapters, record.active, [layer.active for layer in own])
    with _unplugged(model, keep=adapter_name):
        record.adapters, record.active = {adapter_name: record.adapters[adapter_name]}, [adapter_name]
        for layer in own:
            layer.active = True
        try:
            yield
        finally:
            record.adapters, record.active = saved[0], saved[1]
            for layer, active in zip(own, saved[2]):
                layer.active = active


@contextmanager
def without_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block ``model`` is the plain base model: every adapter layer and the record are set aside
    (not freed) and put back afterwards."""
    _record(model)  # raises when there is no adapter
    with _unplugged(model, keep=None), record_set_aside(model):
        yield


@contextmanager
def _unplugged(model: nn.Module, keep: str | None) -> Iterator[None]:
    parents = {
        id(child): (parent, attr) for parent in model.modules() for attr, child in parent._modules.items()
    }
    unplugged: list[tuple[nn.Module, str, PEFTLayer]] = []
    for _, layer in list(peft_layers(model)):
        if layer.adapter_name == keep:
            continue
        parent, attr = parents[id(layer)]
        setattr(parent, attr, layer.base_layer)
        parents[id(layer.base_layer)] = (parent, attr)
        unplugged.append((parent, attr, layer))
    try:
        yield
    finally:
        for parent, attr, layer in reversed(unplugged):
            setattr(parent, attr, layer)
