"""The guard against silent no-ops: every attached method must take part in the forward pass and get gradients.

A method can be attached correctly and still do nothing: the task model may bypass the module it wraps
(``OPTForCausalLM`` calls ``self.model.decoder``, not ``self.model``), or its layers may be off the path to
the loss. The user would then train, or evaluate, the base model without a word. So:

* :func:`start_training` (``on_fit_start``): layers whose initial value depends on the base weights and was
  neither trained nor loaded compute it again (DoRA's magnitude ``‖W‖``, prompts started from vocabulary rows:
  the base weights may have been loaded, or materialised from the meta device, after attaching), then the
  first training forward is watched (:func:`arm`);
* :func:`check_forward` (before the first backward): every method with layers must have had at least one of
  them called, and a loss that needs no gradient at all names the methods instead of torch's "element 0 of
  tensors does not require grad";
* :func:`check_method_gradients` (after the first backward): a method none of whose tensors got a gradient is
  an error (some of them missing is a warning, see :func:`lightning_peft.distributed.check_gradients`);
* :func:`watch_first_inference` (``load_adapter``): the same forward check at the loaded model's first call.

Layers are watched with forward pre-hooks that only exist until the first check, so the model is unchanged
afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_peft.core.base_model import model_description
from lightning_peft.core.record import attached_methods, ensure_record, get_record
from lightning_peft.methods.base import PEFTLayer, PEFTMethod


def _methods(module: nn.Module) -> list[PEFTMethod]:
    return list(attached_methods(module) or [])


def layer_types(method: PEFTMethod) -> tuple[type, ...]:
    """The PEFTLayer classes that ``method`` puts into a model (exact types: DoRALinear is not LoRA's)."""
    declared = tuple(getattr(method, "layer_types", ()))
    single = getattr(method, "layer_class", None)
    return declared + ((single,) if isinstance(single, type) else ())


def layers_of(module: nn.Module, method: PEFTMethod) -> list[tuple[str, PEFTLayer]]:
    """The active layers of ``method``'s type (a switched-off adapter takes no part by design)."""
    types = layer_types(method)
    return [
        (n, m)
        for n, m in module.named_modules()
        if isinstance(m, PEFTLayer) and type(m) in types and m.active
    ]


class _MarkCalled:
    """Forward pre-hook: the layer ran. An object, not a closure, so the model still pickles (ddp_spawn)."""

    def __init__(self) -> None:
        self.called = False

    def __call__(self, layer: nn.Module, args: Any) -> None:
        self.called = True


def arm(module: nn.Module) -> None:
    """Watch every PEFT layer of ``module`` until the next :func:`check_forward`."""
    disarm(module)
    watched = []
    for _, layer in _all_layers(module):
        marker = _MarkCalled()
        watched.append((layer, marker, layer.register_forward_pre_hook(marker)))
    ensure_record(module).watched = watched


def disarm(module: nn.Module) -> list[tuple[nn.Module, Any, Any]] | None:
    """Stop watching; returns what was watched (``None`` when nothing was)."""
    record = get_record(module)
    watched = record.watched if record is not None else None
    if record is not None:
        record.watched = None
    for _, _, handle in watched or ():
        handle.remove()
    return watched


def _all_layers(module: nn.Module) -> Iterable[tuple[str, PEFTLayer]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, PEFTLayer)]


def start_training(module: nn.Module) -> None:
    """``on_fit_start``: finish base-dependent initial values, then watch the first training forward."""
    for _, layer in _all_layers(module):
        if layer.init_pending and not layer.merged:
            layer.init_from_base()
    arm(module)


def check_forward(module: nn.Module, loss: Any = None) -> None:
    """After the first watched forward: raise when an attached method took no part in it."""
    watched = disarm(module)
    if watched is None:
        return
    called = {id(layer) for layer, marker, _ in watched if marker.called}
    described = model_description(module)
    for method in _methods(module):
        layers = layers_of(module, method)
        if layers and not any(id(m) in called for _, m in layers):
            names = [n for n, _ in layers]
            raise RuntimeError(
                f"lightning-peft: {type(method).__name__} is attached to {described}, but none of its "
                f"{len(names)} layers ({', '.join(names[:3])}) ran in the forward pass, so the method does "
                f"nothing: {type(module).__name__}'s forward reaches the model without passing through "
                f"them (for example a task model that calls an inner module directly, bypassing the wrapped "
                f"{type(layers[0][1].base_layer).__name__})."
            )
    if isinstance(loss, torch.Tensor) and torch.is_grad_enabled() and not loss.requires_grad:
        names = " + ".join(type(m).__name__ for m in _methods(module))
        raise RuntimeError(
            f"lightning-peft: the training loss of {described} does not depend on any trainable tensor of "
            f"{names}: the adapter is not on the path from the inputs to the loss, so training would change "
            "nothing. Check that training_step calls the model that holds the adapter."
        )


def check_method_gradients(module: nn.Module, missing: list[str]) -> None:
    """After the first backward (``missing``: trainable parameter names whose ``.grad`` is None): raise when
    every tensor of one method got no gradient."""
    from lightning_peft.ops.parameters import trainable_parameter_names

    missing_set = set(missing)
    trainable = set(trainable_parameter_names(module))
    owned: set[str] = set()
    for method in _methods(module):
        names = []
        for layer_name, layer in layers_of(module, method):
            prefix = f"{layer_name}." if layer_name else ""
            names += [prefix + local for local in layer.peft_parameter_names() if prefix + local in trainable]
        owned.update(names)
        if layers_of(module, method) and names and all(n in missing_set for n in names):
            _raise_no_gradient(module, method, names)
    # methods without layers (BitFit): their tensors are the remaining trainable ones
    rest = sorted(n for n in trainable if n not in owned)
    for method in _methods(module):
        if not layers_of(module, method) and rest and all(n in missing_set for n in rest):
            _raise_no_gradient(module, method, rest)


def _raise_no_gradient(module: nn.Module, method: PEFTMethod, names: list[str]) -> None:
    raise RuntimeError(
        f"lightning-peft: none of the {len(names)} tensors of {type(method).__name__} on "
        f"{model_description(module)} received a gradient in the first training step ({', '.join(names[:3])}"
        f"{', ...' if len(names) > 3 else ''}): the method is not on the path from the inputs to the loss, so "
        "training would leave it unchanged."
    )


class _FirstInference:
    """Forward hook on the root of a model given to ``load_adapter``: checks its first call, then goes."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        record = get_record(module)
        if record is not None and record.first_inference is not None:
            record.first_inference.remove()
            record.first_inference = None
        check_forward(module)


def watch_first_inference(model: nn.Module) -> None:
    """``load_adapter``: the first forward of ``model`` checks that every method took part."""
    arm(model)
    record = ensure_record(model)
    if record.first_inference is not None:
        record.first_inference.remove()
    record.first_inference = model.register_forward_hook(_FirstInference())
