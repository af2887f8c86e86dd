"""The ground floor: one typed record per model holding everything lightning-peft knows about its adapters.

A model carries at most one :class:`AdapterRecord`, under a single attribute of its ``__dict__``. Every other
module reads and writes adapter state through the functions here, so no private key is spread over modules.
This module imports nothing from the rest of the package (the PEFT method base class only for types).

Life of a record: the callback may create it empty at ``setup`` (installed instance hooks, a pending attach
waiting for ``configure_model``); :func:`lightning_peft.apply_peft` adds the ``"default"`` adapter;
:func:`lightning_peft.remove_peft` / :func:`lightning_peft.merge_and_unload` delete it, restoring the module
attributes it replaced (hooks, ``strict_loading``) and the parameters' ``requires_grad`` flags.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from lightning_peft.methods.base import PEFTMethod

#: the name of the adapter that single-adapter APIs create and use
DEFAULT_ADAPTER_NAME = "default"
#: the only attribute lightning-peft adds to a module's ``__dict__``
_RECORD_KEY = "_lightning_peft"
#: marks an attribute that did not exist on the instance before a hook replaced it
_ABSENT = object()


@dataclass
class AdapterEntry:
    """One named adapter: its method configurations and the existing parameters it trains."""

    methods: list[PEFTMethod]
    #: existing modules whose named local parameters the adapter trains and saves (BitFit's biases, norms)
    trained: dict[nn.Module, set[str]] = field(default_factory=dict)
    #: modules trained in full and saved with the adapter (``modules_to_save``)
    saved: list[nn.Module] = field(default_factory=list)


@dataclass
class AdapterRecord:
    """Everything lightning-peft knows about one model's adapters."""

    #: the attached adapters by name, in the order they were added (``"default"`` for single-adapter use)
    adapters: dict[str, AdapterEntry] = field(default_factory=dict)
    #: the adapters that run in ``forward`` and train
    active: list[str] = field(default_factory=list)
    #: the adapter whose ``inject`` is running (where :func:`mark_trainable` records)
    attaching: str | None = None
    #: forward hooks on the model (per-sample adapter routing), removed with the adapters
    handles: list[Any] = field(default_factory=list)
    #: ``requires_grad`` of every parameter (by ``named_parameters`` name) before the first attach
    flags: dict[str, bool] | None = None
    #: method configurations waiting for ``configure_model`` to build their target layers
    pending: list[PEFTMethod] | None = None
    #: a validate/test/predict stage that attached an adapter which no checkpoint has filled yet
    fresh_stage: str | None = None
    #: whether the first backward of this fit should check that every adapter tensor got a gradient
    check_grads: bool = False
    #: instance attributes replaced on the module (hooks, ``_strict_loading``) -> value before, or _ABSENT
    replaced: dict[str, Any] = field(default_factory=dict)
    #: the PEFT layers watched until the first forward is checked: (layer, its pre-hook, the hook's handle),
    #: and the root's forward-hook handle for ``load_adapter``'s first inference (participation.py)
    watched: list[tuple[nn.Module, Any, Any]] | None = None
    first_inference: Any = None

    @property
    def methods(self) -> list[PEFTMethod]:
        return [m for entry in self.adapters.values() for m in entry.methods]


#: modules seen holding a record, weakly (issue 20: lightning_peft/ops/resolve.py finds a submodule's record)
_HOLDERS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def get_record(model: nn.Module) -> AdapterRecord | None:
    record = model.__dict__.get(_RECORD_KEY)
    if record is not None:
        _HOLDERS.add(model)  # also copies and unpickled modules, which no ensure_record call created
    return record


def ensure_record(model: nn.Module) -> AdapterRecord:
    record = get_record(model)
    if record is None:
        record = model.__dict__[_RECORD_KEY] = AdapterRecord()
        _HOLDERS.add(model)
    return record


def record_holders() -> list[nn.Module]:
    """The live modules seen holding a record (some may have dropped theirs since)."""
    return list(_HOLDERS)


def drop_record(model: nn.Module) -> None:
    """Delete the record and put back every instance attribute it replaced."""
    record = model.__dict__.pop(_RECORD_KEY, None)
    if record is None:
        return
    for handle in record.handles:
        handle.remove()
    for name, before in record.replaced.items():
        if before is _ABSENT:
            model.__dict__.pop(name, None)
        else:
            model.__dict__[name] = before


@contextmanager
def record_set_aside(model: nn.Module) -> Iterator[AdapterRecord | None]:
    """Inside the block ``model`` carries no record; the same record is put back afterwards. Unlike
    :func:`drop_record`, nothing the record replaced is restored: the model only looks unadapted meanwhile."""
    record = model.__dict__.pop(_RECORD_KEY, None)
    try:
        yield record
    finally:
        if record is not None:
            model.__dict__[_RECORD_KEY] = record


def replace_attribute(model: nn.Module, name: str, value: Any) -> None:
    """Set an instance attribute of ``model``, remembering what was there so that :func:`drop_record` can
    restore it (hooks installed on a LightningModule instance, ``_strict_loading``)."""
    record = ensure_record(model)
    record.replaced.setdefault(name, model.__dict__.get(name, _ABSENT))
    model.__dict__[name] = value


def attached_methods(model: nn.Module) -> list[PEFTMethod] | None:
    """The methods attached to ``model`` (or ``None``)."""
    record = get_record(model)
    return record.methods if record is not None and record.adapters else None


def is_attached(model: nn.Module) -> bool:
    return attached_methods(model) is not None


def mark_trainable(model: nn.Module, module: nn.Module, *local_names: str) -> None:
    """Declare existing parameters of ``module`` (a submodule of ``model``, e.g. its ``"bias"``) as trained
    and saved by the adapter being attached to ``model``."""
    entry = _attaching(model)
    entry.trained.setdefault(module, set()).update(local_names)


def mark_saved(model: nn.Module, module: nn.Module) -> None:
    """Declare ``module`` (``modules_to_save``) as trained in full and saved with the adapter."""
    entry = _attaching(model)
    if not any(m is module for m in entry.saved):
        entry.saved.append(module)


def _attaching(model: nn.Module) -> AdapterEntry:
    # methods mark parameters inside inject(); apply_peft opens the entry before injecting
    record = ensure_record(model)
    return record.adapters.setdefault(record.attaching or DEFAULT_ADAPTER_NAME, AdapterEntry(methods=[]))


def marked_parameter_names(model: nn.Module) -> set[str]:
    """Names (``named_parameters`` spelling) of the existing parameters that the adapters train."""
    record = get_record(model)
    if record is None:
        return set()
    names = {id(m): name for name, m in model.named_modules()}
    wanted: set[str] = set()
    for entry in (record.adapters[a] for a in record.active if a in record.adapters):
        for module, locals_ in entry.trained.items():
            if id(module) in names:
                prefix = f"{names[id(module)]}." if names[id(module)] else ""
                wanted.update(prefix + local for local in locals_)
        for module in entry.saved:
            if id(module) in names:
                prefix = f"{names[id(module)]}." if names[id(module)] else ""
                wanted.update(prefix + local for local, _ in module.named_parameters())
    return wanted


def saved_module_names(model: nn.Module) -> list[str]:
    """Names of the ``modules_to_save`` modules of every adapter."""
    record = get_record(model)
    if record is None:
        return []
    saved = {id(m) for entry in record.adapters.values() for m in entry.saved}
    return [name for name, m in model.named_modules() if id(m) in saved]
