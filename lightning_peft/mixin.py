"""PEFTMixin: the callback's behaviour configured on the LightningModule itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_peft.distributed import check_gradients, configure_strategy, prepare_training
from lightning_peft.hooks import attach, attach_for_state_dict, mark_loaded, warn_if_fresh
from lightning_peft.io import filter_checkpoint, prepare_checkpoint_load
from lightning_peft.methods import PEFTMethod
from lightning_peft.model import as_method_list, is_attached
from lightning_peft.optim import fix_optimizers
from lightning_peft.participation import check_forward


class PEFTMixin:
    """Mix into a LightningModule (``class MyModel(PEFTMixin, LightningModule)``) to get PEFT.

    Configure the method by setting ``self.peft_method`` in ``__init__`` (e.g. from an argument saved with
    ``save_hyperparameters``) or by overriding :meth:`configure_peft`. The adapter is attached in ``setup``
    when the target layers exist, otherwise right after ``configure_model``; call :meth:`apply_peft`
    yourself inside ``configure_model`` to attach *before* sharding (FSDP2 ``fully_shard``).

    ``MyModel.load_from_checkpoint(path)`` works on the adapter-only checkpoints: the base weights come
    from ``__init__``/``configure_model`` and the adapter from the file.
    """

    peft_method: PEFTMethod | list[PEFTMethod] | None = None

    def configure_peft(self) -> PEFTMethod | list[PEFTMethod] | None:
        """The method(s) to attach; defaults to ``self.peft_method``."""
        return self.peft_method

    def apply_peft(self) -> None:
        """Attach the configured method(s) now (idempotent)."""
        method = self.configure_peft()
        if method is None:
            raise ValueError(
                f"{type(self).__name__}: set self.peft_method (e.g. LoRA(r=8)) or override configure_peft()"
            )
        attach(self, as_method_list(method), getattr(self, "_trainer", None))  # type: ignore[arg-type]

    def setup(self, stage: str) -> None:
        super().setup(stage)  # type: ignore[misc]
        configure_strategy(getattr(self, "_trainer", None))
        if not is_attached(self) and self.configure_peft() is not None:  # type: ignore[arg-type]
            try:
                self.apply_peft()  # validates everything before touching the module
            except ValueError:
                pass  # the layers may be built in configure_model, which runs next and attaches (or raises)

    def configure_model(self) -> None:
        super().configure_model()  # type: ignore[misc]
        if not is_attached(self) and self.configure_peft() is not None:  # type: ignore[arg-type]
            self.apply_peft()

    def on_fit_start(self) -> None:
        super().on_fit_start()  # type: ignore[misc]
        if not is_attached(self):  # type: ignore[arg-type]
            self.apply_peft()
        fix_optimizers(self, self.trainer.optimizers)  # type: ignore[attr-defined,arg-type]
        prepare_training(self, self.trainer)  # type: ignore[attr-defined,arg-type]

    def on_before_backward(self, loss: Any) -> None:
        super().on_before_backward(loss)  # type: ignore[misc]
        check_forward(self, loss)  # type: ignore[arg-type]

    def on_after_backward(self) -> None:
        super().on_after_backward()  # type: ignore[misc]
        check_gradients(self, self.trainer)  # type: ignore[attr-defined,arg-type]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        filter_checkpoint(self, checkpoint)  # type: ignore[arg-type]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        prepare_checkpoint_load(self, checkpoint)  # type: ignore[arg-type]
        mark_loaded(self)  # type: ignore[arg-type]

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Attach the adapter first when ``state_dict`` holds its tensors and the module has none yet: the
        weights ``ddp_spawn`` hands back to the main process after ``fit``, or a full ``state_dict()`` of a
        trained module. Otherwise ``nn.Module.load_state_dict``."""
        method = self.configure_peft()
        if method is not None:
            attach_for_state_dict(self, as_method_list(method), state_dict)  # type: ignore[arg-type]
        return super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]

    # a validate/test/predict run that attached a new adapter and loaded no checkpoint evaluates an untrained one
    def on_validation_start(self) -> None:
        super().on_validation_start()  # type: ignore[misc]
        warn_if_fresh(self)  # type: ignore[arg-type]

    def on_test_start(self) -> None:
        super().on_test_start()  # type: ignore[misc]
        warn_if_fresh(self)  # type: ignore[arg-type]

    def on_predict_start(self) -> None:
        super().on_predict_start()  # type: ignore[misc]
        warn_if_fresh(self)  # type: ignore[arg-type]
