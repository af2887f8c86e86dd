"""PEFTCallback: PEFT for an unmodified LightningModule."""

from __future__ import annotations

import types
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_peft.distributed import check_gradients, configure_strategy, prepare_training
from lightning_peft.hooks import attach, mark_loaded, warn_if_fresh
from lightning_peft.io import CHECKPOINT_KEY, filter_checkpoint, prepare_checkpoint_load
from lightning_peft.methods import PEFTMethod
from lightning_peft.model import as_method_list, is_attached
from lightning_peft.optim import fix_optimizers
from lightning_peft.participation import check_forward

_PATCHED = "_lightning_peft_patched"
_PENDING = "_lightning_peft_pending"


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
        configure_strategy(trainer)
        self._install_checkpoint_hooks(pl_module)
        if is_attached(pl_module):
            attach(pl_module, self.methods, trainer)  # checks that the configuration is the same
            return
        try:
            attach(pl_module, self.methods, trainer)  # validates everything before touching the module
        except ValueError:
            if not is_overridden("configure_model", pl_module):
                raise
            # the layers may be built in configure_model, which runs next: attach (or raise) after it
            self._attach_after_configure_model(trainer, pl_module)

    def _attach_after_configure_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs callbacks' setup before configure_model: layers built there do not exist yet
        pl_module.__dict__[_PENDING] = self.methods
        # a bound method (not a callable object): Lightning's is_overridden inspects its __code__
        pl_module.configure_model = types.MethodType(configure_model, pl_module)  # type: ignore[method-assign]

    def _install_checkpoint_hooks(self, pl_module: pl.LightningModule) -> None:
        if pl_module.__dict__.get(_PATCHED):
            return
        pl_module.on_save_checkpoint = _SaveHook(pl_module)  # type: ignore[method-assign]
        pl_module.on_load_checkpoint = _LoadHook(pl_module)  # type: ignore[method-assign]
        pl_module.__dict__[_PATCHED] = True

    # -- training ---------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_attached(pl_module):
            raise RuntimeError(
                "PEFTCallback: no adapter was attached before training started; if the model is built in "
                "configure_model, make sure configure_model creates the target layers"
            )
        fix_optimizers(pl_module, trainer.optimizers)
        prepare_training(pl_module, trainer)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        check_forward(pl_module, loss)  # once per fit: every method took part in the first forward

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_gradients(pl_module, trainer)  # once per fit: adapter tensors that got no gradient

    # a validate/test/predict run that attached a new adapter and loaded no checkpoint evaluates an untrained one
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        warn_if_fresh(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        warn_if_fresh(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        warn_if_fresh(pl_module)

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


# The hooks below are installed on the module instance. They are small objects rather than closures so
# that the module still pickles (ddp_spawn) and deep-copies with the hooks pointing at the copy; they call
# the class-level hook, so the user's own on_save_checkpoint/on_load_checkpoint/configure_model still run.
class _InstanceHook:
    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module


class _SaveHook(_InstanceHook):
    def __call__(self, checkpoint: dict[str, Any]) -> None:
        type(self.module).on_save_checkpoint(self.module, checkpoint)
        filter_checkpoint(self.module, checkpoint)


class _LoadHook(_InstanceHook):
    def __call__(self, checkpoint: dict[str, Any]) -> None:
        type(self.module).on_load_checkpoint(self.module, checkpoint)
        if CHECKPOINT_KEY in checkpoint:
            prepare_checkpoint_load(self.module, checkpoint)
        mark_loaded(self.module)


def configure_model(self: pl.LightningModule) -> None:
    """Installed on a module whose layers are built in ``configure_model``: build, then attach."""
    type(self).configure_model(self)
    attach(self, self.__dict__[_PENDING], self._trainer)
