"""Multi-process training (DDP, FSDP2 through ``ModelParallelStrategy``, FSDP1 through ``FSDPStrategy``) and
training modes (gradient checkpointing) for adapter-only fine-tuning.

:class:`~lightning_peft.PEFTCallback` and :class:`~lightning_peft.PEFTMixin` call the hooks below; users only
need :func:`peft_auto_wrap_policy` (FSDP1). What happens, and when:

* ``setup`` (before any wrapper exists): :func:`configure_strategy` makes ``FSDPStrategy`` keep the original
  parameters (``use_orig_params=True``), which FSDP1 needs when frozen and trainable parameters share a unit.
* attaching: :func:`check_not_sharded` refuses to attach to a model that ``fully_shard``/FSDP already sharded,
  because adapter parameters created after sharding would be plain per-rank tensors whose gradients no one
  averages (every rank would train its own adapter).
* ``on_fit_start``: :func:`prepare_training` lets gradients reach checkpointed blocks whose inputs come from a
  frozen embedding, and checks that DDP registered exactly the trainable parameters.
* the first ``on_after_backward``: :func:`check_gradients` names adapter parameters that received no gradient.
  Under DDP (``find_unused_parameters=False``, Lightning's default) the reducer would wait for them and crash
  at the next step ("Expected to have finished reduction in the prior iteration"), after averaging only
  part of this step's gradients; we stop before the optimizer step with an error that says which module and
  what to do. (The error must not repeat DDP's wording: Lightning replaces such messages with its own.)
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_peft.model import peft_layers, state_dict_key, trainable_parameter_names
from lightning_peft.quantized import check_fsdp_quant_storage

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl
    from torch.distributed.fsdp.wrap import CustomPolicy

#: set on the root module at ``on_fit_start``; the first backward then checks which adapter tensors got grads
_CHECK_GRADS = "_lightning_peft_check_grads"


def is_global_zero() -> bool:
    """Rank 0 of the default process group, or ``True`` outside ``torch.distributed``."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# -- strategies -----------------------------------------------------------------------------------------
def _strategy_kind(trainer: pl.Trainer | None) -> str:
    if trainer is None:
        return "none"
    from lightning.pytorch.strategies import (
        DDPStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

    strategy = trainer.strategy
    if isinstance(strategy, SingleDeviceStrategy):
        return "single"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp"
    if isinstance(strategy, ModelParallelStrategy):
        return "model_parallel"
    if isinstance(strategy, DDPStrategy):
        return "ddp"
    return "other"


def configure_strategy(trainer: pl.Trainer | None) -> None:
    """Adjust the strategy's settings before it wraps the model (call from ``setup``)."""
    kind = _strategy_kind(trainer)
    if kind == "model_parallel" and getattr(trainer.strategy, "_save_distributed_checkpoint", False):
        rank_zero_warn(
            "lightning-peft: ModelParallelStrategy(save_distributed_checkpoint=True) writes sharded checkpoints, "
            "which Lightning resumes only when they hold every tensor, so they keep the frozen weights too. "
            "Pass save_distributed_checkpoint=False for single-file, adapter-only checkpoints."
        )
    if kind != "fsdp":
        return
    kwargs: dict[str, Any] = trainer.strategy.kwargs  # type: ignore[union-attr]
    if kwargs.get("use_orig_params") is False:
        raise ValueError(
            "FSDPStrategy(use_orig_params=False) cannot train an adapter: FSDP1 then flattens frozen and "
            "trainable parameters of a unit into one FlatParameter, which must have a uniform requires_grad, "
            "and the optimizer would see flat parameters instead of the adapter's. Remove use_orig_params "
            "(Lightning's default is True) or pass use_orig_params=True."
        )
    kwargs["use_orig_params"] = True


def _ddp_handles_unused(trainer: pl.Trainer) -> bool:
    kwargs: dict[str, Any] = getattr(trainer.strategy, "_ddp_kwargs", {}) or {}
    return bool(kwargs.get("find_unused_parameters") or kwargs.get("static_graph"))


def check_not_sharded(module: nn.Module) -> None:
    """Raise if ``module`` was already sharded (FSDP2 ``fully_shard``, tensor parallel or FSDP1)."""
    sharded = any(type(p).__name__ == "DTensor" for p in module.parameters())
    wrapped = any(type(m).__name__ == "FullyShardedDataParallel" for m in module.modules())
    if sharded or wrapped:
        raise RuntimeError(
            f"lightning-peft: cannot attach an adapter to this {type(module).__name__}: its parameters are "
            "already sharded. Adapter parameters created now would be per-rank tensors that FSDP does not "
            "manage, so ranks would silently train different adapters. Attach before sharding: build the "
            "layers in __init__ (PEFTCallback attaches in setup, before configure_model), or with PEFTMixin "
            "call self.apply_peft() in configure_model before fully_shard()."
        )


def check_quantized_sharding(module: nn.Module, trainer: pl.Trainer | None) -> None:
    """FSDP1/FSDP2 shard floating-point tensors only: refuse bitsandbytes weights stored as integers."""
    if _strategy_kind(trainer) in ("fsdp", "model_parallel"):
        check_fsdp_quant_storage(module)


def check_saveable(module: nn.Module) -> None:
    """:func:`~lightning_peft.save_adapter` reads parameters directly; under FSDP1 they are flat shards."""
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in module.modules()):
        raise RuntimeError(
            "save_adapter cannot read an FSDPStrategy (FSDP1) model: each rank holds flat shards of the "
            "adapter. Save a checkpoint instead (trainer.save_checkpoint or ModelCheckpoint; it holds the full "
            "adapter tensors), then in one process: save_adapter(load_peft_checkpoint(MyModule, path), folder). "
            "Under ModelParallelStrategy (FSDP2), save_adapter works when every rank calls it."
        )


# -- training -------------------------------------------------------------------------------------------
def enable_input_grads(module: nn.Module) -> list[str]:
    """For every transformers model in ``module`` that checkpoints activations, make the input embeddings'
    output require grad (transformers' ``enable_input_require_grads``), unless that is already the case.

    Reentrant checkpointing (``use_reentrant=True``, the default before transformers 5) only back-propagates
    into a checkpointed block if one of the block's *inputs* requires grad. With a frozen embedding none
    does, and the adapter inside the blocks would silently get no gradient. Non-reentrant checkpointing does
    not need this; the hook then costs one extra small backward step into the embedding output.
    Returns the names of the models that got the hook.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return []
    changed: list[str] = []
    outer: list[str] = []  # enable_input_require_grads covers the models nested in the one it is called on
    for name, sub in module.named_modules():
        if not isinstance(sub, PreTrainedModel) or any(o == "" or name.startswith(o + ".") for o in outer):
            continue
        outer.append(name)
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


def prepare_training(module: nn.Module, trainer: pl.Trainer | None) -> None:
    """Called at ``on_fit_start``, after the strategy wrapped the model and the optimizers exist."""
    enable_input_grads(module)
    kind = _strategy_kind(trainer)
    if kind == "ddp":
        _check_ddp_registration(module, trainer)  # type: ignore[arg-type]
        _check_ddp_reentrant_sharing(module, trainer)  # type: ignore[arg-type]
    # FSDP1 leaves .grad None on ranks that hold no shard of a tensor; other strategies: unknown semantics
    module.__dict__[_CHECK_GRADS] = kind in ("single", "ddp", "model_parallel")


def _check_ddp_registration(module: nn.Module, trainer: pl.Trainer) -> None:
    from torch.nn.parallel import DistributedDataParallel

    ddp = trainer.strategy.model
    if not isinstance(ddp, DistributedDataParallel):
        return
    try:
        registered = int(ddp._get_ddp_logging_data()["num_parameter_tensors"])
    except (AttributeError, KeyError, RuntimeError, ValueError):  # pragma: no cover - private API moved
        return
    # DDP's reducer holds the parameters that required grad when DDP was built: if the adapter was attached
    # later, its gradients are never averaged and every rank trains a different adapter
    trainable = len({id(p) for p in module.parameters() if p.requires_grad})
    if registered != trainable:
        raise RuntimeError(
            f"lightning-peft: DDP registered {registered} parameter tensors but the adapter trains {trainable}: "
            "the model was wrapped before the adapter was attached, so the adapter's gradients would not be "
            "averaged across processes. Attach in setup or configure_model (PEFTCallback and PEFTMixin do "
            "this when the target layers exist by then)."
        )


def _check_ddp_reentrant_sharing(module: nn.Module, trainer: pl.Trainer) -> None:
    # Reentrant checkpointing back-propagates every checkpointed layer in a backward call of its own, so a
    # parameter that several layers use (prefix tuning's prefix) receives its gradient in pieces; DDP all-reduces
    # the first piece and the ranks drift apart, silently. DDP's static_graph copes with it.
    ddp = trainer.strategy.model
    if getattr(ddp, "static_graph", True) or not _reentrant_checkpointing(module):
        return
    shared = sorted({type(layer).__name__ for _, layer in peft_layers(module) if layer.shared_across_layers})
    if shared:
        raise RuntimeError(
            f"lightning-peft: {', '.join(shared)} under DDP with reentrant gradient checkpointing "
            "(use_reentrant=True): every checkpointed layer back-propagates into the shared prefix parameters "
            "separately, and DDP would average only part of their gradient, so the processes would train "
            "different prefixes. Use non-reentrant checkpointing, gradient_checkpointing_enable("
            "gradient_checkpointing_kwargs={'use_reentrant': False}) (transformers 5's default), or "
            "Trainer(strategy=DDPStrategy(static_graph=True))."
        )


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


def check_gradients(module: nn.Module, trainer: pl.Trainer | None) -> None:
    """Called at ``on_after_backward``; checks once per fit that every adapter parameter received a gradient."""
    if not module.__dict__.pop(_CHECK_GRADS, False):
        return
    params = dict(module.named_parameters())
    missing = [n for n in trainable_parameter_names(module) if n in params and params[n].grad is None]
    if not missing:
        return
    owners = sorted({state_dict_key(n).rsplit(".", 1)[0] for n in missing})
    listed = ", ".join(owners[:10]) + (f" and {len(owners) - 10} more" if len(owners) > 10 else "")
    fix = f"exclude them from the method (e.g. exclude_modules={owners[:3]!r}) or make the forward pass use them"
    if _strategy_kind(trainer) == "ddp" and not _ddp_handles_unused(trainer):  # type: ignore[arg-type]
        raise RuntimeError(
            f"lightning-peft: {len(missing)} adapter tensors received no gradient in the first training step "
            f"(modules: {listed}); they are not on the path from the inputs to the loss. DDP with "
            "find_unused_parameters=False would wait for their gradients forever and crash at the next step, "
            f"after averaging only part of this step's gradients. Either {fix}, or let DDP skip them with "
            "Trainer(strategy='ddp_find_unused_parameters_true') / DDPStrategy(find_unused_parameters=True)."
        )
    if trainer is None or trainer.lightning_module.automatic_optimization:
        rank_zero_warn(
            f"lightning-peft: {len(missing)} adapter tensors received no gradient in the first training step "
            f"(modules: {listed}), so they will not train; {fix}."
        )


# -- FSDP1 wrap policy ----------------------------------------------------------------------------------
def _block_classes(
    root: nn.Module, explicit: Iterable[type[nn.Module]] | None
) -> tuple[type[nn.Module], ...]:
    if explicit is not None:
        return tuple(explicit)
    names: set[str] = set()
    for sub in root.modules():
        names.update(getattr(sub, "_no_split_modules", None) or ())
    return tuple({type(m) for m in root.modules() if type(m).__name__ in names})


def peft_wrap_targets(root: nn.Module, block_classes: tuple[type[nn.Module], ...]) -> set[int]:
    """ids of the modules that :func:`peft_auto_wrap_policy` makes FSDP units (see its docstring)."""
    from lightning_peft.methods.base import PEFTLayer

    owners: dict[int, set[int]] = {}
    for m in root.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))

    def cuttable(m: nn.Module) -> bool:
        # FSDP1 keeps tied parameters (GPT-2's wte / lm_head) in one unit: never cut a tied module out alone
        inside = {id(x) for x in m.modules()}
        return any(True for _ in m.parameters()) and all(owners[id(p)] <= inside for p in m.parameters())

    def trainable(m: nn.Module) -> list[bool]:
        return [p.requires_grad for p in m.parameters()]

    targets: set[int] = set()
    whole_trainable: list[str] = []
    for name, sub in root.named_modules():
        if sub is root:
            continue
        flags = trainable(sub)
        if block_classes and isinstance(sub, block_classes):
            targets.add(id(sub))
        elif isinstance(sub, PEFTLayer) and any(flags) and cuttable(sub):
            targets.add(id(sub))
            # the frozen base layer gets its own unit, so that the adapter's unit holds trainable tensors only
            for child in sub.children():
                if not any(trainable(child)) and cuttable(child):
                    targets.add(id(child))
        if flags and all(flags) and cuttable(sub):
            # modules_to_save (a new classifier) and fully trainable adapter modules: topmost subtree only
            if not any(name.startswith(outer + ".") for outer in whole_trainable):
                whole_trainable.append(name)
                targets.add(id(sub))
    return targets


@functools.cache
def _policy_class() -> type[CustomPolicy]:
    # torch.distributed.fsdp is imported on first use only: importing lightning_peft stays light
    from torch.distributed.fsdp.wrap import CustomPolicy

    class PEFTWrapPolicy(CustomPolicy):
        """FSDP1 policy whose units are decided from the root module FSDP wraps (the LightningModule, after the
        adapter is attached), not when the policy is created (before the adapter exists)."""

        def __init__(self, transformer_layer_cls: tuple[type[nn.Module], ...] | None) -> None:
            self.transformer_layer_cls = transformer_layer_cls
            self._targets: set[int] = set()
            super().__init__(lambda module: id(module) in self._targets)

        def _run_policy(
            self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict[str, Any]
        ) -> dict[nn.Module, dict[str, Any]]:
            blocks = _block_classes(root_module, self.transformer_layer_cls)
            self._targets = peft_wrap_targets(root_module, blocks)
            return super()._run_policy(root_module, ignored_modules, root_kwargs)

        def __repr__(self) -> str:
            return f"peft_auto_wrap_policy(transformer_layer_cls={self.transformer_layer_cls})"

    return PEFTWrapPolicy


def peft_auto_wrap_policy(
    transformer_layer_cls: Iterable[type[nn.Module]] | None = None,
) -> CustomPolicy:
    """An FSDP1 ``auto_wrap_policy`` for adapter training: ``FSDPStrategy(auto_wrap_policy=peft_auto_wrap_policy())``.

    Units (FSDP1 wraps bottom-up; each unit owns the parameters of its subtree not owned by an inner unit):

    * every transformer block (``transformer_layer_cls``, default: the classes listed in the transformers
      model's ``_no_split_modules``, such as ``BertLayer``/``LlamaDecoderLayer``): after the adapters are cut
      out, a block unit holds only frozen weights, so FSDP allocates and reduce-scatters no gradient for it;
    * every adapter layer (:class:`~lightning_peft.PEFTLayer`) with trainable parameters, with its frozen
      ``base_layer`` in a unit of its own: the adapter's unit is small and fully trainable, so gradient
      communication is the adapter's size, not the model's;
    * every fully trainable subtree (``modules_to_save`` such as a new classifier).

    The alternative, adapters in their block's unit, needs one FlatParameter with mixed ``requires_grad``
    (allowed with ``use_orig_params=True``): FSDP1 then keeps and reduce-scatters a gradient buffer for the
    whole block, frozen weights included — full fine-tuning's communication for a PEFT update. Cutting units
    costs two extra (small) all-gathers per adapted layer instead. Modules whose weights are tied to others
    (GPT-2's ``wte``/``lm_head``) are never split off. A module that owns frozen and trainable tensors itself
    (BitFit's biases next to frozen weights) stays mixed in its enclosing unit.
    """
    classes = None if transformer_layer_cls is None else tuple(transformer_layer_cls)
    return _policy_class()(classes)
