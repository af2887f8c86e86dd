"""Find the module that records a model's adapters, so that every adapter function accepts either the module
PEFT was attached to or a module inside it (or around it).

After training with :class:`~lightning_peft.PEFTCallback`, the adapter record lives on the LightningModule
while the PEFT layers sit inside ``module.model``, the transformers model. ``save_adapter(module.model, ...)``,
``merge_and_unload(module.model)`` and the other public functions call :func:`resolve_owner` first:

* a module that holds a record is its own owner (the fast path: nothing is scanned);
* a module without one, inside a module that records adapters (``module.model``), is served by that holder,
  provided it contains *every* PEFT layer and every tensor the holder's adapters train or save (otherwise
  acting on the holder would touch things outside the module the caller gave, and the call is refused,
  naming what lies outside);
* a module around exactly one holder (a wrapper around a model PEFT was attached to) is served by it.

Holders are remembered weakly by :mod:`lightning_peft.core.record` whenever a record is created or read, so
nothing is ever stored on the inner model and deep copies, pickles and ``torch.save`` are unaffected.
Functions that return names (:func:`~lightning_peft.trainable_parameter_names`,
:func:`~lightning_peft.adapter_state_dict`) give them relative to the module the caller passed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

from torch import nn

from lightning_peft.core.record import get_record, record_holders
from lightning_peft.methods.base import PEFTLayer

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M", bound=nn.Module)
#: wrapper infixes in parameter names that state_dict keys lack (as in lightning_peft.ops.state_dict.WRAPPER_INFIXES)
WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _name_in(outer: nn.Module, inner: nn.Module) -> str:
    return next(name for name, m in outer.named_modules(remove_duplicate=False) if m is inner)


def _without_infixes(name: str) -> str:
    for infix in WRAPPER_INFIXES:
        name = name.replace(infix, "").replace(infix[:-1], "")
    return name.strip(".").replace("..", ".")


def _holders() -> list[nn.Module]:
    # only modules whose record still describes adapters (a removed adapter leaves no record)
    return [h for h in record_holders() if (r := get_record(h)) is not None and r.adapters]


def resolve_owner(model: nn.Module) -> nn.Module:
    """The module whose record describes the adapters of ``model``: ``model`` itself when it holds a record,
    else the holder around it (``model`` must contain all of that holder's adapter layers and trained
    tensors), else the one holder inside it; ``model`` unchanged when no adapter is attached anywhere near."""
    if get_record(model) is not None:
        return model
    holders = _holders()
    around = [h for h in holders if h is not model and _contains(h, model)]
    if around:
        # the innermost holder around model: the one the others (if any) contain
        owner = min(around, key=lambda h: sum(1 for _ in h.modules()))
        _check_inside(owner, model)
        return owner
    inside = [h for h in holders if _contains(model, h)]
    if len(inside) > 1:
        names = sorted(_name_in(model, h) for h in inside)
        raise ValueError(
            f"this {type(model).__name__} holds {len(inside)} modules with their own adapters, at {names}; "
            "pass the one you mean"
        )
    return inside[0] if inside else model


def _check_inside(owner: nn.Module, model: nn.Module) -> None:
    """Raise unless every PEFT layer and every trained/saved module of ``owner``'s adapters is in ``model``."""
    record = get_record(owner)
    assert record is not None  # a holder has a record
    mine = {id(m) for m in model.modules()}
    outside = [n for n, m in owner.named_modules() if isinstance(m, PEFTLayer) and id(m) not in mine]
    names = {id(m): n for n, m in owner.named_modules()}
    for entry in record.adapters.values():
        for module in [*entry.trained, *entry.saved]:
            if id(module) not in mine:
                outside.append(names.get(id(module), type(module).__name__))
    if outside:
        raise ValueError(
            f"this {type(model).__name__} is part of a {type(owner).__name__} whose adapters also reach outside "
            f"it ({len(outside)} adapter modules, e.g. {sorted(outside)[:3]}); pass the "
            f"{type(owner).__name__} (the module PEFT was attached to) instead"
        )


def accepts_inner_model(function: Callable[Concatenate[M, P], R]) -> Callable[Concatenate[M, P], R]:
    """Let ``function(model, ...)`` be called with the module PEFT was attached to or a module inside it:
    it runs on :func:`resolve_owner`'s module, and a result that is that module is returned as ``model``."""

    @functools.wraps(function)
    def wrapper(model: M, *args: P.args, **kwargs: P.kwargs) -> R:
        owner = resolve_owner(model)
        if owner is model:
            return function(model, *args, **kwargs)
        result = function(owner, *args, **kwargs)  # type: ignore[arg-type]
        return model if result is owner else result  # type: ignore[return-value]

    return wrapper


def relative_names(function: Callable[Concatenate[M, P], R]) -> Callable[Concatenate[M, P], R]:
    """Like :func:`accepts_inner_model` for functions that return parameter names (a list, or a dict keyed by
    them): the names are given relative to the module the caller passed."""

    @functools.wraps(function)
    def wrapper(model: M, *args: P.args, **kwargs: P.kwargs) -> R:
        owner = resolve_owner(model)
        if owner is model:
            return function(model, *args, **kwargs)
        result = function(owner, *args, **kwargs)  # type: ignore[arg-type]
        rename = _renamer(owner, model)
        if isinstance(result, dict):
            return {new: v for k, v in result.items() if (new := rename(k)) is not None}  # type: ignore[return-value]
        return [new for k in result if (new := rename(k)) is not None]  # type: ignore[union-attr,return-value]

    return wrapper


def _renamer(owner: nn.Module, model: nn.Module) -> Callable[[str], str | None]:
    """owner-relative name -> ``model``-relative name (``None`` for a name outside ``model``)."""
    if _contains(owner, model):
        name = _name_in(owner, model)
        # parameter names may carry wrapper infixes (activation checkpointing) that state_dict keys drop
        prefixes = {f"{p}." for p in (name, _without_infixes(name)) if p}

        def strip(key: str) -> str | None:
            if not prefixes:
                return key
            return next((key[len(p) :] for p in prefixes if key.startswith(p)), None)

        return strip
    prefix = _name_in(model, owner)
    prefix = f"{prefix}." if prefix else ""
    return lambda name: prefix + name


__all__ = ["accepts_inner_model", "relative_names", "resolve_owner"]
