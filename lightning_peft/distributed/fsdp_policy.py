"""The FSDP1 auto-wrap policy for adapter training. Building it is not a collective."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from torch import nn

from lightning_peft.methods.base import PEFTLayer

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.fsdp.wrap import CustomPolicy


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
