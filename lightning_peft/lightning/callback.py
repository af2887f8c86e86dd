"""PEFTCallback: PEFT for an unmodified LightningModule."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_peft.lightning.lifecycle import PEFTLifecycle, user_configure_model
from lightning_peft.methods.base import PEFTMethod


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
        adapter_name: the named adapter to train. Adapters already loaded on the module (``load_adapter(module,
            path, adapter_name=...)``) stay frozen; the optimizer and the checkpoints hold this one only.
    """

    def __init__(
        self, method: PEFTMethod | list[PEFTMethod], verbose: bool = True, adapter_name: str = "default"
    ) -> None:
        self.lifecycle = PEFTLifecycle(method, install_hooks=True, verbose=verbose, adapter_name=adapter_name)
        self.methods = self.lifecycle.methods
        self.verbose = verbose

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.lifecycle.setup(trainer, pl_module, builds_later=user_configure_model(pl_module))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lifecycle.on_fit_start(trainer, pl_module)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        self.lifecycle.on_before_backward(pl_module, loss)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lifecycle.on_after_backward(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lifecycle.on_eval_start(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lifecycle.on_eval_start(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lifecycle.on_eval_start(pl_module)

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
