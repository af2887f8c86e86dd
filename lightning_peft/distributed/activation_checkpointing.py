"""Gradients through activation checkpointing: input gradients for reentrant checkpointing behind a
frozen embedding, and telling whether a model checkpoints reentrantly. No function here is a collective."""

from __future__ import annotations

from torch import nn

from lightning_peft.core.base_model import outermost_models


def enable_input_grads(module: nn.Module) -> list[str]:
    """For every transformers model in ``module`` that checkpoints activations, make the input embeddings'
    output require grad (transformers' ``enable_input_require_grads``), unless that is already the case.

    Reentrant checkpointing (``use_reentrant=True``, the default before transformers 5) only back-propagates
    into a checkpointed block if one of the block's *inputs* requires grad. With a frozen embedding none
    does, and the adapter inside the blocks would silently get no gradient. Non-reentrant checkpointing does
    not need this; the hook then costs one extra small backward step into the embedding output.
    Returns the names of the models that got the hook.
    """
    changed: list[str] = []
    # enable_input_require_grads covers the models nested in the one it is called on
    for name in outermost_models(module):
        sub = module.get_submodule(name)
        if not _checkpointing(sub):
            continue
        if getattr(sub, "_require_grads_hooks", None) or hasattr(sub, "_require_grads_hook"):
            continue  # transformers (5.x does it in gradient_checkpointing_enable) or the user did it
        embeddings = sub.get_input_embeddings()
        if embeddings is None or any(p.requires_grad for p in embeddings.parameters()):
            continue
        sub.enable_input_require_grads()
        changed.append(name or type(sub).__name__)
    return changed


def _checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _reentrant_checkpointing(module: nn.Module) -> bool:
    """Whether a transformers model or a torch ``checkpoint_wrapper`` in ``module`` checkpoints reentrantly."""
    for sub in module.modules():
        if getattr(sub, "gradient_checkpointing", False) is True:
            func = getattr(sub, "_gradient_checkpointing_func", None)
            if getattr(func, "keywords", {}).get("use_reentrant", False):
                return True
        impl = getattr(sub, "checkpoint_impl", None)  # torch's CheckpointWrapper
        if impl is not None and getattr(impl, "name", "") == "REENTRANT":
            return True
    return False
