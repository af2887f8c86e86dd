"""One lifecycle behind both entry points: :class:`~lightning_peft.PEFTCallback` and
:class:`~lightning_peft.PEFTMixin` are thin adapters over :class:`PEFTLifecycle`, which sequences

``setup`` → (attach after ``configure_model``) → ``on_fit_start`` → first backward → save / load checkpoints,
plus the ``ddp_spawn`` return path (``load_state_dict``) and the warning for evaluating an untrained adapter.

The only differences between the two entry points are those Lightning imposes (see
``docs/callback_vs_mixin.md``): a callback's hooks do not run in ``LightningModule.load_from_checkpoint`` or in
the ``ddp_spawn`` main process, and a callback reaches the module's checkpoint and ``configure_model`` hooks
only through instance attributes, which the record remembers so that :func:`~lightning_peft.remove_peft`
takes them off again.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.core.hooks import ModelHooks
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_peft.core.record import (
    DEFAULT_ADAPTER_NAME,
    ensure_record,
    get_record,
    is_attached,
    replace_attribute,
)
from lightning_peft.distributed import (
    check_gradients,
    check_not_sharded,
    check_quantized_sharding,
    configure_strategy,
    prepare_training,
)
from lightning_peft.files.names import METADATA_KEY
from lightning_peft.lightning.checkpoints import filter_checkpoint, prepare_checkpoint_load
from lightning_peft.lightning.optimizers import fix_optimizers
from lightning_peft.lightning.precision import keep_adapter_unquantized
from lightning_peft.methods.base import PEFTMethod
from lightning_peft.ops.attach import apply_peft, as_method_list, remove_peft
from lightning_peft.ops.named_adapters import add_adapter, set_adapter
from lightning_peft.ops.parameters import ParameterCount, count_parameters
from lightning_peft.ops.participation import check_forward


def same_methods(a: Sequence[PEFTMethod], b: Sequence[PEFTMethod]) -> bool:
    return [m.to_dict() for m in a] == [m.to_dict() for m in b]


class PEFTLifecycle:
    """The PEFT steps of one LightningModule's life, for a fixed list of method configurations.

    Args:
        methods: the configurations to attach.
        install_hooks: put the checkpoint hooks and the deferred ``configure_model`` on the module instance
            (a callback must; a mixin has them as methods of its class).
        verbose: report the trainable-parameter count on rank 0 when attaching.
        adapter_name: the named adapter to attach and train; other adapters already loaded on the module
            stay frozen and out of the checkpoints.
    """

    def __init__(
        self,
        methods: PEFTMethod | Sequence[PEFTMethod],
        install_hooks: bool,
        verbose: bool = True,
        adapter_name: str = DEFAULT_ADAPTER_NAME,
    ) -> None:
        self.methods = as_method_list(methods)
        self.install_hooks = install_hooks
        self.verbose = verbose
        self.adapter_name = adapter_name

    # -- attaching ---------------------------------------------------------------------------------------
    def attach(self, module: nn.Module, trainer: pl.Trainer | None = None) -> ParameterCount | None:
        """Attach once; later calls with the same configuration do nothing (a different one raises).

        Returns the parameter count when this call attached, ``None`` when the adapter was already there.
        """
        record = get_record(module)
        entry = record.adapters.get(self.adapter_name) if record is not None else None
        if entry is not None:
            if not same_methods(entry.methods, self.methods):
                raise ValueError(
                    f"{type(module).__name__} already has {[type(m).__name__ for m in entry.methods]} attached as "
                    f"adapter {self.adapter_name!r} with a different configuration than {self.methods!r}; "
                    "attaching twice is not allowed"
                )
            _loose_loading(module)  # attached by the user (e.g. in configure_model): same rule
            keep_adapter_unquantized(module, getattr(trainer, "precision_plugin", None))
            return None
        check_not_sharded(module)
        check_quantized_sharding(module, trainer)
        if is_attached(module):  # other named adapters are loaded: this one trains alone, they stay frozen
            add_adapter(module, self.methods, self.adapter_name)
            set_adapter(module, self.adapter_name)
            counts = count_parameters(module)
        else:
            counts = apply_peft(module, self.methods, self.adapter_name)
        keep_adapter_unquantized(module, getattr(trainer, "precision_plugin", None))  # BitsandbytesPrecision
        record = ensure_record(module)
        record.pending = None
        stage = trainer.state.fn if trainer is not None else None
        if stage in ("validate", "test", "predict"):  # TrainerFn is a str enum
            record.fresh_stage = str(stage.value)  # type: ignore[union-attr]
        _loose_loading(module)
        if self.verbose:
            self.report(counts, trainer)
        return counts

    def report(self, counts: ParameterCount, trainer: pl.Trainer | None) -> None:
        names = " + ".join(type(m).__name__ for m in self.methods)
        rank_zero_info(f"lightning-peft: {names} attached; {counts}")
        if trainer is None:
            return
        hparams: dict[str, Any] = {
            "peft/method": names,
            "peft/trainable_params": counts.trainable,
            "peft/total_params": counts.total,
            "peft/trainable_percent": round(counts.percent, 4),
        }
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams)

    def setup(self, trainer: pl.Trainer | None, module: pl.LightningModule, builds_later: bool) -> None:
        """``setup`` of every stage. Attaches now when the targets exist; when they do not and the module
        builds layers in ``configure_model`` (``builds_later``), attaching waits for it, and any error is
        raised then."""
        configure_strategy(trainer)
        if self.install_hooks:
            self._install_checkpoint_hooks(module)
        if is_attached(module):
            self.attach(module, trainer)  # checks that the configuration is the same
            return
        try:
            self.attach(module, trainer)  # validates everything before touching the module
        except ValueError:
            if not builds_later:
                raise
            ensure_record(module).pending = self.methods
            if self.install_hooks:
                # a bound-method-like object: Lightning's is_overridden inspects the hook's __code__
                replace_attribute(module, "configure_model", _ConfigureModelHook(module, self))

    def after_configure_model(self, module: pl.LightningModule) -> None:
        """Right after ``configure_model``: attach unless attached (``configure_model`` is idempotent)."""
        if not is_attached(module):
            self.attach(module, getattr(module, "_trainer", None))

    # -- training ----------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not is_attached(module):
            # e.g. a configure_model override that never called the mixin's: attach now, or raise the reason
            self.attach(module, trainer)
        fix_optimizers(module, trainer.optimizers)
        prepare_training(module, trainer)

    def on_before_backward(self, module: pl.LightningModule, loss: Any) -> None:
        check_forward(module, loss)  # once per fit: every method took part in the first forward

    def on_after_backward(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        check_gradients(module, trainer)  # once per fit: adapter tensors that got no gradient

    def on_eval_start(self, module: pl.LightningModule) -> None:
        """A validate/test/predict loop starts: warn if it evaluates an adapter that was never trained or loaded."""
        record = get_record(module)
        stage = record.fresh_stage if record is not None else None
        if stage is None:
            return
        record.fresh_stage = None  # type: ignore[union-attr]
        rank_zero_warn(
            f"lightning-peft: this {stage} run uses an adapter that was attached in its own setup and neither "
            "trained nor loaded, so it has its initial values (LoRA's B = 0, for example, leaves the base model "
            "unchanged). To evaluate trained weights, pass ckpt_path ('best', 'last' or a file), or load the "
            "module with load_peft_checkpoint/load_adapter first. After trainer.fit with strategy='ddp_spawn', "
            "the module in the main process never received the adapter: use the checkpoint."
        )

    # -- checkpoints ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, module: nn.Module, checkpoint: dict[str, Any]) -> None:
        filter_checkpoint(module, checkpoint)

    def on_load_checkpoint(self, module: nn.Module, checkpoint: dict[str, Any]) -> None:
        if METADATA_KEY in checkpoint:
            prepare_checkpoint_load(module, checkpoint)
        record = get_record(module)
        if record is not None:
            record.fresh_stage = None

    def before_load_state_dict(self, module: nn.Module, state_dict: Mapping[str, Any]) -> bool:
        """Attach to a module without an adapter when ``state_dict`` has keys only the module with its adapter
        has (the weights ``ddp_spawn`` hands back to the main process, a full ``state_dict()`` of a trained
        module), so that ``load_state_dict`` loads them instead of dropping them. Rolled back if attaching
        does not explain any of those keys. Returns whether the adapter is now attached."""
        if is_attached(module):
            return False
        unexpected = set(state_dict) - set(module.state_dict(keep_vars=True))
        if not unexpected:
            return False
        try:
            self.attach(module)
        except ValueError:
            return False
        if len(set(state_dict) - set(module.state_dict(keep_vars=True))) < len(unexpected):
            return True
        remove_peft(module)  # also puts strict_loading back
        return False

    def _install_checkpoint_hooks(self, module: pl.LightningModule) -> None:
        record = get_record(module)
        if record is not None and "on_save_checkpoint" in record.replaced:
            return
        replace_attribute(module, "on_save_checkpoint", _SaveHook(module, self))
        replace_attribute(module, "on_load_checkpoint", _LoadHook(module, self))


def _loose_loading(module: nn.Module) -> None:
    # the checkpoints we write omit the frozen weights; the module's own hook checks the adapter's
    if isinstance(module, pl.LightningModule):
        replace_attribute(module, "_strict_loading", False)


def user_configure_model(module: nn.Module, skip: tuple[type, ...] = ()) -> bool:
    """Whether a class of ``module`` other than Lightning's own (and ``skip``) defines ``configure_model``."""
    # ModelHooks, a base of LightningModule, defines the empty default: it must not count as the user's
    ignored = {pl.LightningModule, ModelHooks, object, *skip}
    return any("configure_model" in cls.__dict__ for cls in type(module).__mro__ if cls not in ignored)


# The hooks below are installed on the module instance by the callback. They are small objects rather than
# closures so that the module still pickles (ddp_spawn) and deep-copies with the hooks pointing at the copy;
# they call the class-level hook first, so the user's own hooks still run.
class _InstanceHook:
    def __init__(self, module: pl.LightningModule, lifecycle: PEFTLifecycle) -> None:
        self.module = module
        self.lifecycle = lifecycle


class _SaveHook(_InstanceHook):
    def __call__(self, checkpoint: dict[str, Any]) -> None:
        type(self.module).on_save_checkpoint(self.module, checkpoint)
        self.lifecycle.on_save_checkpoint(self.module, checkpoint)


class _LoadHook(_InstanceHook):
    def __call__(self, checkpoint: dict[str, Any]) -> None:
        type(self.module).on_load_checkpoint(self.module, checkpoint)
        self.lifecycle.on_load_checkpoint(self.module, checkpoint)


class _ConfigureModelHook(_InstanceHook):
    """Installed when the layers are built in ``configure_model``: build, then attach."""

    def __call__(self) -> None:
        type(self.module).configure_model(self.module)
        self.lifecycle.after_configure_model(self.module)

    @property
    def __code__(self) -> types.CodeType:  # Lightning's is_overridden compares the hook's code object
        return _ConfigureModelHook.__call__.__code__
