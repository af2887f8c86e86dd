"""Model-level operations shared by every method: attach, freeze, count, merge, unload, adapter state."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_peft.methods.base import PEFTLayer, PEFTMethod
from lightning_peft.quantized import dequantize_model, parameter_numel, quantized_merge
from lightning_peft.targeting import ModuleTargets, replace_module, resolve_modules

#: attribute on the root module holding the attached method configurations
METHODS_ATTR = "_lightning_peft_methods"
#: attribute on any module: set of local parameter names that the adapter trains (e.g. BitFit biases)
TRAIN_ATTR = "_lightning_peft_train"
#: attribute on a module listed in ``modules_to_save``: train and save all of its parameters
SAVE_ATTR = "_lightning_peft_save"
#: attribute on the root module: requires_grad of every parameter before attaching, for remove_peft
FLAGS_ATTR = "_lightning_peft_flags"
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
    items = [methods] if isinstance(methods, PEFTMethod) else list(methods)
    if not items:
        raise ValueError("method must be a PEFT method configuration or a non-empty list of them, got []")
    for item in items:
        if not isinstance(item, PEFTMethod):
            from lightning_peft.methods import available_methods

            raise TypeError(
                f"method must be a PEFT method configuration ({', '.join(available_methods())}), "
                f"got {type(item).__name__}: {item!r}"
            )
    return items


def attached_methods(model: nn.Module) -> list[PEFTMethod] | None:
    """The methods attached to ``model`` (or ``None``)."""
    return model.__dict__.get(METHODS_ATTR)


def is_attached(model: nn.Module) -> bool:
    return attached_methods(model) is not None


def peft_layers(model: nn.Module) -> Iterator[tuple[str, PEFTLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, PEFTLayer):
            yield name, module


def mark_trainable(module: nn.Module, *local_names: str) -> None:
    """Declare existing parameters of ``module`` (e.g. ``"bias"``) as trained and saved by the adapter."""
    current = set(module.__dict__.get(TRAIN_ATTR, ()))
    module.__dict__[TRAIN_ATTR] = current | set(local_names)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of all parameters the adapter owns, in ``model.named_parameters()`` order."""
    wanted: set[str] = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, PEFTLayer):
            wanted.update(prefix + local for local in module.peft_parameter_names())
        for local in module.__dict__.get(TRAIN_ATTR, ()):
            wanted.add(prefix + local)
        if module.__dict__.get(SAVE_ATTR, False):
            wanted.update(prefix + local for local, _ in module.named_parameters())
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


def plan_methods(model: nn.Module, methods: Sequence[PEFTMethod]) -> tuple[list[ModuleTargets], list[str]]:
    """Validate every method against ``model`` without touching it; returns the targets and modules to save."""
    if is_attached(model):
        names = [type(m).__name__ for m in attached_methods(model) or []]
        raise ValueError(
            f"PEFT methods {names} are already attached to this {type(model).__name__}; attaching twice is not "
            "allowed. Call merge_and_unload(model) first, or load a fresh base model."
        )
    if any(True for _ in peft_layers(model)):
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


def apply_peft(model: nn.Module, methods: PEFTMethod | Sequence[PEFTMethod]) -> ParameterCount:
    """Freeze ``model``, attach ``methods`` and make exactly the adapter's parameters trainable.

    Everything is validated first: on error nothing in the model has changed.
    """
    method_list = as_method_list(methods)
    plans, save = plan_methods(model, method_list)
    flags = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}
    try:
        for method, targets in zip(method_list, plans):
            method.inject(model, targets)
        for name in save:
            model.get_submodule(name).__dict__[SAVE_ATTR] = True
        model.__dict__[METHODS_ATTR] = method_list
        model.__dict__[FLAGS_ATTR] = flags
        refresh_requires_grad(model)
    except BaseException:
        # plan() should have caught every problem; if inject still fails, leave the model as it was
        model.__dict__[FLAGS_ATTR] = flags
        remove_peft(model)
        raise
    return count_parameters(model)


def remove_peft(model: nn.Module) -> nn.Module:
    """Take every adapter out without merging: the base model as it was before :func:`apply_peft`,
    with the parameters' original ``requires_grad`` flags (BitFit/modules_to_save changes stay)."""
    for name, layer in sorted(peft_layers(model), key=lambda item: -item[0].count(".")):
        if layer.merged:
            with torch.no_grad(), quantized_merge(layer, merge=False):
                layer.unmerge()
        replace_module(model, name, layer.unload())
    _restore_flags(model)
    _clear_marks(model)
    return model


def _restore_flags(model: nn.Module) -> None:
    flags = model.__dict__.pop(FLAGS_ATTR, {})
    for name, param in model.named_parameters(remove_duplicate=False):
        param.requires_grad_(flags.get(name, param.requires_grad))


def _clear_marks(model: nn.Module) -> None:
    for module in model.modules():
        module.__dict__.pop(TRAIN_ATTR, None)
        module.__dict__.pop(SAVE_ATTR, None)
    model.__dict__.pop(METHODS_ATTR, None)
    model.__dict__.pop(FLAGS_ATTR, None)


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
    layers = list(peft_layers(model))
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
    # innermost first, so that nested replacements see their parents intact
    for name, layer in sorted(layers, key=lambda item: -item[0].count(".")):
        replace_module(model, name, layer.unload())
    _restore_flags(model)
    _clear_marks(model)
    return model
