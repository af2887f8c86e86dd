"""One lifecycle behind both entry points: every test runs with PEFTCallback and with PEFTMixin, so that any
difference between them shows up as a failing test. (The differences Lightning imposes are listed in
docs/callback_vs_mixin.md and tested in test_callback.py / test_mixin.py.)"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import HFModule, fast_trainer, hf_loader, model_output, snapshot, tiny_batch, tiny_bert
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_peft import (
    LoRA,
    PEFTCallback,
    PEFTMixin,
    load_peft_checkpoint,
    merge_and_unload,
    remove_peft,
    trainable_parameter_names,
)
from lightning_peft.core.record import get_record, is_attached
from lightning_peft.ops.parameters import peft_layers

METHOD = dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
ENTRY_POINTS = ["callback", "mixin"]


class MixinModule(PEFTMixin, HFModule):
    def __init__(self, r: int = 4) -> None:
        super().__init__("bert")
        self.save_hyperparameters()
        self.peft_method = LoRA(**{**METHOD, "r": r})


class BuiltInConfigureModel(HFModule):
    """Builds its network in configure_model, as FSDP users do."""

    def __init__(self) -> None:
        super().__init__("bert")
        del self.model
        self.model: Any = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_bert().train()
        super().configure_model()


class MixinBuiltInConfigureModel(PEFTMixin, BuiltInConfigureModel):
    def __init__(self) -> None:
        super().__init__()
        self.peft_method = LoRA(**METHOD)


def make(entry: str, late: bool = False) -> tuple[pl.LightningModule, list[pl.Callback]]:
    """A module and the callbacks that give it PEFT through ``entry``."""
    if entry == "callback":
        module = BuiltInConfigureModel() if late else HFModule("bert")
        return module, [PEFTCallback(LoRA(**METHOD))]
    return (MixinBuiltInConfigureModel() if late else MixinModule()), []


def fit_with_checkpoint(entry: str, tmp_path: Path, **kwargs: Any) -> pl.LightningModule:
    """Train through ``entry`` for 3 steps, writing ``tmp_path/last.ckpt``."""
    module, callbacks = make(entry)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = fast_trainer(tmp_path, callbacks=[*callbacks, ckpt], enable_checkpointing=True, **kwargs)
    trainer.fit(module, hf_loader("bert"))
    return module


def optimizer_ids(trainer: pl.Trainer) -> set[int]:
    return {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}


@pytest.mark.parametrize("late", [False, True], ids=["built-in-init", "built-in-configure_model"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_fit_trains_exactly_the_adapter(entry: str, late: bool, tmp_path: Path) -> None:
    module, callbacks = make(entry, late)
    trainer = fast_trainer(tmp_path, max_steps=3, callbacks=callbacks)
    trainer.fit(module, hf_loader("bert"))
    assert len(list(peft_layers(module))) == 4  # query and value of 2 layers
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert optimizer_ids(trainer) == trainable
    assert module.strict_loading is False


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_checkpoint_holds_the_adapter_and_resumes_exactly(entry: str, tmp_path: Path) -> None:
    module = fit_with_checkpoint(entry, tmp_path, max_epochs=1)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == set(trainable_parameter_names(module))
    assert saved["lightning_peft"]["base_prefix"] == "model."
    assert saved["lightning_peft"]["base"]["task_type"] == "SEQ_CLS"

    # two epochs in one go == one epoch, then resume for the second
    straight, callbacks = make(entry)
    fast_trainer(tmp_path / "a", max_epochs=2, callbacks=callbacks).fit(straight, hf_loader("bert"))
    resumed, callbacks = make(entry)
    trainer = fast_trainer(tmp_path / "b", max_epochs=2, callbacks=callbacks)
    trainer.fit(resumed, hf_loader("bert"), ckpt_path=tmp_path / "last.ckpt")
    for key, value in snapshot(straight).items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=0, rtol=0)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_validate_from_checkpoint_loads_the_trained_adapter(entry: str, tmp_path: Path) -> None:
    module = fit_with_checkpoint(entry, tmp_path, max_steps=3)
    fresh, callbacks = make(entry)
    trainer = fast_trainer(tmp_path, callbacks=callbacks)
    with pytest.warns(UserWarning) as caught:
        trainer.validate(fresh, hf_loader("bert", n=4), ckpt_path=tmp_path / "last.ckpt")
    assert not any("neither trained nor loaded" in str(w.message) for w in caught)
    batch = tiny_batch("bert")
    module.eval(), fresh.eval()
    torch.testing.assert_close(model_output(fresh.model, batch), model_output(module.model, batch))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_validating_an_untrained_adapter_warns(entry: str, tmp_path: Path) -> None:
    module, callbacks = make(entry)
    with pytest.warns(UserWarning, match="neither trained nor loaded"):
        fast_trainer(tmp_path, callbacks=callbacks).validate(module, hf_loader("bert", n=4))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_missing_targets_fail_at_setup_with_the_reason(entry: str, tmp_path: Path) -> None:
    bad = LoRA(target_modules=["no_such_layer"])
    if entry == "callback":
        module, callbacks = HFModule("bert"), [PEFTCallback(bad)]
    else:
        module, callbacks = MixinModule(), []
        module.peft_method = bad
    before = snapshot(module)
    with pytest.raises(ValueError, match="no_such_layer"):
        fast_trainer(tmp_path, max_steps=1, callbacks=callbacks).fit(module, hf_loader("bert"))
    assert not is_attached(module) and not list(peft_layers(module))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def dict_state(module: nn.Module) -> dict[str, Any]:
    """Every module's instance attributes, with parameters and children by identity."""
    return {
        name: {k: (id(v) if isinstance(v, nn.Module | torch.Tensor) else v) for k, v in sub.__dict__.items()}
        for name, sub in module.named_modules()
    }


@pytest.mark.parametrize("how", ["remove_peft", "merge_and_unload"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_removing_leaves_the_module_as_before_attaching(entry: str, how: str, tmp_path: Path) -> None:
    module, callbacks = make(entry)
    trainer = fast_trainer(tmp_path, callbacks=callbacks)
    before = dict_state(module)
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    if callbacks:
        callbacks[0].setup(trainer, module, "fit")
    else:
        module.setup("fit")
    assert is_attached(module) and get_record(module) is not None
    (remove_peft if how == "remove_peft" else merge_and_unload)(module)
    assert dict_state(module) == before  # no record, hook, flag or strict_loading change left behind
    assert {n: p.requires_grad for n, p in module.named_parameters()} == flags


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_copies_keep_the_record_pointing_at_the_copy(entry: str, tmp_path: Path) -> None:
    module, callbacks = make(entry)
    trainer = fast_trainer(tmp_path, callbacks=callbacks)
    callbacks[0].setup(trainer, module, "fit") if callbacks else module.setup("fit")
    for copied in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert trainable_parameter_names(copied) == trainable_parameter_names(module)
        remove_peft(copied)
        assert not list(peft_layers(copied)) and is_attached(module)
        # the copy got its flags back (HFModule trains everything); the original is untouched
        assert all(p.requires_grad for p in copied.parameters())
        assert set(trainable_parameter_names(module)) == {
            n for n, p in module.named_parameters() if p.requires_grad
        }


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_load_peft_checkpoint_rebuilds_the_trained_model(entry: str, tmp_path: Path) -> None:
    module = fit_with_checkpoint(entry, tmp_path, max_steps=3)
    loaded = load_peft_checkpoint(type(module), tmp_path / "last.ckpt")
    batch = tiny_batch("bert")
    module.eval()
    torch.testing.assert_close(model_output(loaded.model, batch), model_output(module.model, batch))


def test_only_a_users_own_configure_model_defers_attaching() -> None:
    import lightning.pytorch as pl

    from lightning_peft.lightning.lifecycle import user_configure_model

    class Plain(pl.LightningModule):
        pass

    class Builds(pl.LightningModule):
        def configure_model(self) -> None:
            pass

    # Lightning's own empty default (on ModelHooks) must not count: a refusal would be put off to a hook
    # that never builds anything
    assert not user_configure_model(Plain())
    assert user_configure_model(Builds())
