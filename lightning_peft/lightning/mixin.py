"""PEFTMixin: the callback's behaviour configured on the LightningModule itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_peft.files.safe_load import refusing_pickles
from lightning_peft.lightning.lifecycle import PEFTLifecycle, user_configure_model
from lightning_peft.methods.base import PEFTMethod


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
    #: the named adapter the mixin attaches and trains (others loaded on the module stay frozen)
    peft_adapter_name: str = "default"

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """``LightningModule.load_from_checkpoint`` that never unpickles: ``weights_only=True`` (unless passed
        explicitly) with the method classes allowed; a refused file raises ``UnsafeFileError``."""
        kwargs.setdefault("weights_only", True)
        with refusing_pickles(checkpoint_path):
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]

    def configure_peft(self) -> PEFTMethod | list[PEFTMethod] | None:
        """The method(s) to attach; defaults to ``self.peft_method``."""
        return self.peft_method

    def _peft_lifecycle(self) -> PEFTLifecycle | None:
        method = self.configure_peft()
        if method is None:
            return None
        return PEFTLifecycle(method, install_hooks=False, adapter_name=self.peft_adapter_name)

    def apply_peft(self) -> None:
        """Attach the configured method(s) now (idempotent)."""
        lifecycle = self._peft_lifecycle()
        if lifecycle is None:
            raise ValueError(
                f"{type(self).__name__}: set self.peft_method (e.g. LoRA(r=8)) or override configure_peft()"
            )
        lifecycle.attach(self, getattr(self, "_trainer", None))  # type: ignore[arg-type]

    def setup(self, stage: str) -> None:
        super().setup(stage)  # type: ignore[misc]
        lifecycle = self._peft_lifecycle()
        if lifecycle is not None:
            builds_later = user_configure_model(self, skip=(PEFTMixin,))  # type: ignore[arg-type]
            lifecycle.setup(getattr(self, "_trainer", None), self, builds_later)  # type: ignore[arg-type]

    def configure_model(self) -> None:
        super().configure_model()  # type: ignore[misc]
        lifecycle = self._peft_lifecycle()
        if lifecycle is not None:
            lifecycle.after_configure_model(self)  # type: ignore[arg-type]

    def on_fit_start(self) -> None:
        super().on_fit_start()  # type: ignore[misc]
        self._require_lifecycle().on_fit_start(self.trainer, self)  # type: ignore[attr-defined,arg-type]

    def on_before_backward(self, loss: Any) -> None:
        super().on_before_backward(loss)  # type: ignore[misc]
        self._require_lifecycle().on_before_backward(self, loss)  # type: ignore[arg-type]

    def on_after_backward(self) -> None:
        super().on_after_backward()  # type: ignore[misc]
        self._require_lifecycle().on_after_backward(self.trainer, self)  # type: ignore[attr-defined,arg-type]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        self._require_lifecycle().on_save_checkpoint(self, checkpoint)  # type: ignore[arg-type]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        self._require_lifecycle().on_load_checkpoint(self, checkpoint)  # type: ignore[arg-type]

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Attach the adapter first when ``state_dict`` holds its tensors and the module has none yet: the
        weights ``ddp_spawn`` hands back to the main process after ``fit``, or a full ``state_dict()`` of a
        trained module. Otherwise ``nn.Module.load_state_dict``."""
        lifecycle = self._peft_lifecycle()
        if lifecycle is not None:
            lifecycle.before_load_state_dict(self, state_dict)  # type: ignore[arg-type]
        return super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]

    # a validate/test/predict run that attached a new adapter and loaded no checkpoint evaluates an untrained one
    def on_validation_start(self) -> None:
        super().on_validation_start()  # type: ignore[misc]
        self._require_lifecycle().on_eval_start(self)  # type: ignore[arg-type]

    def on_test_start(self) -> None:
        super().on_test_start()  # type: ignore[misc]
        self._require_lifecycle().on_eval_start(self)  # type: ignore[arg-type]

    def on_predict_start(self) -> None:
        super().on_predict_start()  # type: ignore[misc]
        self._require_lifecycle().on_eval_start(self)  # type: ignore[arg-type]

    def _require_lifecycle(self) -> PEFTLifecycle:
        lifecycle = self._peft_lifecycle()
        if lifecycle is None:
            raise ValueError(
                f"{type(self).__name__}: set self.peft_method (e.g. LoRA(r=8)) or override configure_peft()"
            )
        return lifecycle
