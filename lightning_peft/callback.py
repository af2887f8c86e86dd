"""PEFTCallback: PEFT for an unmodified LightningModule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_peft.hooks import attach
from lightning_peft.io import CHECKPOINT_KEY, filter_checkpoint, prepare_checkpoint_load
from lightning_peft.methods import PEFTMethod
from lightning_peft.model import as_method_list, is_attached
from lightning_peft.optim import fix_optimizers

_PATCHED = "_lightning_peft_patched"


class PEFTCallback(Callback):
    """Attach one or several PEFT methods to the LightningModule at ``setup``.

    ``Trainer(callbacks=[PEFTCallback(LoRA(r=8, target_modules=["query", "value"]))])``

    * ``setup`` (every stage, idempotent): freeze the module, attach the method(s), make
      ``modules_to_save`` trainable and report the trainable-parameter count. If no target exists yet and
      the module overrides ``configure_model``, attaching waits until ``configure_model`` has run.
    * ``on_fit_start``: the optimizers hold exactly the trainable parameters.
    * checkpoints keep only the adapter's tensors and the configuration, also with
      ``ModelCheckpoint(save_weights_only=True)`` (the filter is installed on the module's own
      ``on_save_checkpoint``, which Lightning always calls).

    Args:
        method: a method configuration such as ``LoRA(r=8)``, or a list of non-conflicting ones.
        verbose: print the trainable-parameter summary on rank 0.
    """

    def __init__(self, method: PEFTMethod | list[PEFTMethod], verbose: bool = True) -> None:
        self.methods = as_method_list(method)
        self.verbose = verbose

    # -- attaching --------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._install_checkpoint_hooks(pl_module)
        if is_attached(pl_module):
            attach(pl_module, self.methods, trainer)  # checks that the configuration is the same
            return
        try:
            plans_ok = self._can_attach(pl_module)
        except ValueError:
            if not is_overridden("configure_model", pl_module):
                raise
            plans_ok = False
        if plans_ok:
            attach(pl_module, self.methods, trainer)
        elif is_overridden("configure_model", pl_module):
            self._attach_after_configure_model(trainer, pl_module)

    def _can_attach(self, pl_module: pl.LightningModule) -> bool:
        for method in self.methods:
            method.plan(pl_module)
        return True

    def _attach_after_configure_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs callbacks' setup before configure_model: layers built there do not exist yet
        original: Callable[[], None] = pl_module.configure_model

        def configure_model_then_attach() -> None:
            original()
            attach(pl_module, self.methods, trainer)

        pl_module.configure_model = configure_model_then_attach  # type: ignore[method-assign]

    def _install_checkpoint_hooks(self, pl_module: pl.LightningModule) -> None:
        if pl_module.__dict__.get(_PATCHED):
            return
        save_hook = pl_module.on_save_checkpoint
        load_hook = pl_module.on_load_checkpoint

        def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
            save_hook(checkpoint)
            filter_checkpoint(pl_module, checkpoint)

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            load_hook(checkpoint)
            if CHECKPOINT_KEY in checkpoint:
                prepare_checkpoint_load(pl_module, checkpoint)

        pl_module.on_save_checkpoint = on_save_checkpoint  # type: ignore[method-assign]
        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
        pl_module.__dict__[_PATCHED] = True

    # -- training ---------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_attached(pl_module):
            raise RuntimeError(
                "PEFTCallback: no adapter was attached before training started; if the model is built in "
                "configure_model, make sure configure_model creates the target layers"
            )
        fix_optimizers(pl_module, trainer.optimizers)

    # -- callback state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"methods": [m.to_dict() for m in self.methods]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("methods")
        if saved is not None and saved != [m.to_dict() for m in self.methods]:
            raise ValueError(
                f"the checkpoint was trained with PEFT methods {saved}, but this PEFTCallback is configured "
                f"with {[m.to_dict() for m in self.methods]}"
            )

    def __repr__(self) -> str:
        return f"PEFTCallback({', '.join(repr(m) for m in self.methods)})"
