"""PEFTMixin: the same behaviour configured on the LightningModule."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import HFModule, fast_trainer, hf_loader, model_output, snapshot, tiny_batch, tiny_bert
from lightning.pytorch.callbacks import ModelCheckpoint
from test_method_table import METHODS

from lightning_peft import LoRA, PEFTMixin, trainable_parameter_names
from lightning_peft.ops.parameters import peft_layers


class LoRAClassifier(PEFTMixin, HFModule):
    def __init__(self, r: int = 4, lr: float = 1e-2) -> None:
        super().__init__("bert", lr=lr)
        self.save_hyperparameters()
        self.peft_method = LoRA(r=r, target_modules=["query", "value"], modules_to_save=["classifier"])


def test_mixin_trains_only_the_adapter(tmp_path: Path) -> None:
    module = LoRAClassifier()
    before = snapshot(module)
    trainer = fast_trainer(tmp_path, max_steps=3)
    trainer.fit(module, hf_loader("bert"))
    after = module.state_dict()
    changed = {k for k in after if k in before and not torch.equal(before[k], after[k])}
    assert changed == {"model.classifier.weight", "model.classifier.bias"}
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert held == {id(p) for p in module.parameters() if p.requires_grad}
    trainer.validate(module, hf_loader("bert", n=4))
    assert len(list(peft_layers(module))) == 4


def test_load_from_checkpoint_works_on_adapter_only_file(tmp_path: Path) -> None:
    module = LoRAClassifier()
    checkpoint_cb = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = fast_trainer(tmp_path, max_steps=4, callbacks=[checkpoint_cb], enable_checkpointing=True)
    trainer.fit(module, hf_loader("bert"))
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert list(checkpoint["state_dict"]) == trainable_parameter_names(module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "missing keys" warning: frozen weights come from __init__
        loaded = LoRAClassifier.load_from_checkpoint(tmp_path / "last.ckpt")
    loaded.eval()
    module.eval()
    batch = tiny_batch("bert")
    torch.testing.assert_close(
        model_output(loaded.model, batch), model_output(module.model, batch), atol=0, rtol=0
    )


class ConfiguredInConfigureModel(PEFTMixin, HFModule):
    """Builds the network in configure_model and shards nothing: the mixin attaches right after it."""

    def __init__(self) -> None:
        super().__init__("bert")
        del self.model
        self.model: Any = None
        self.peft_method = LoRA(r=2, target_modules=["query"])

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_bert().train()
        super().configure_model()


class ApplyBeforeSharding(PEFTMixin, HFModule):
    """The FSDP2 pattern: attach explicitly inside configure_model, before fully_shard would run."""

    def __init__(self) -> None:
        super().__init__("bert")
        self.peft_method = LoRA(r=2, target_modules=["value"])
        self.attached_before_shard = False

    def configure_model(self) -> None:
        self.apply_peft()
        self.attached_before_shard = len(list(peft_layers(self))) == 2
        # fully_shard(self.model) would go here


@pytest.mark.parametrize("cls", [ConfiguredInConfigureModel, ApplyBeforeSharding])
def test_mixin_with_configure_model(tmp_path: Path, cls: type) -> None:
    module = cls()
    trainer = fast_trainer(tmp_path, max_steps=2)
    trainer.fit(module, hf_loader("bert"))
    assert len(list(peft_layers(module))) == 2
    assert all(torch.count_nonzero(layer.lora_B) > 0 for _, layer in peft_layers(module))
    if cls is ApplyBeforeSharding:
        assert module.attached_before_shard


def test_mixin_without_method_explains() -> None:
    class Bare(PEFTMixin, HFModule):
        pass

    with pytest.raises(ValueError, match="set self.peft_method"):
        Bare().apply_peft()


class MethodAsHyperparameter(PEFTMixin, HFModule):
    def __init__(self, method: LoRA | None = None) -> None:
        super().__init__("bert")
        self.save_hyperparameters()
        self.peft_method = method


def test_method_object_as_hyperparameter_loads_with_weights_only(tmp_path: Path) -> None:
    module = MethodAsHyperparameter(LoRA(r=2, target_modules=["query"]))
    trainer = fast_trainer(tmp_path, max_steps=1)
    trainer.fit(module, hf_loader("bert"))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=True)  # method classes are safe globals
    assert checkpoint["hyper_parameters"]["method"] == LoRA(r=2, target_modules=["query"])
    loaded = MethodAsHyperparameter.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    assert len(list(peft_layers(loaded))) == 2


class AnyMethod(PEFTMixin, HFModule):
    def __init__(self, kind: str = "gpt2", method_name: str = "lora") -> None:
        super().__init__(kind, lr=1e-2)
        self.save_hyperparameters()
        self.peft_method = METHODS[method_name][0]()


@pytest.mark.parametrize("method_name", list(METHODS))
def test_mixin_with_every_method(tmp_path: Path, method_name: str) -> None:
    module = AnyMethod(method_name=method_name)
    trainer = fast_trainer(tmp_path, max_steps=2)
    trainer.fit(module, hf_loader("gpt2"))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert list(checkpoint["state_dict"]) == trainable_parameter_names(module)
    loaded = AnyMethod.load_from_checkpoint(tmp_path / "m.ckpt").eval()
    module.eval()
    batch = tiny_batch("gpt2")
    torch.testing.assert_close(
        model_output(loaded.model, batch), model_output(module.model, batch), atol=0, rtol=0
    )


def test_load_state_dict_of_a_trained_module_attaches_first(tmp_path: Path) -> None:
    """What ddp_spawn's main process gets after fit: the worker's full state_dict, loaded into a module that
    has no adapter (Lightning passes strict=False, which would silently drop the adapter)."""
    trained = LoRAClassifier()
    fast_trainer(tmp_path, max_steps=3).fit(trained, hf_loader("bert"))
    trained.eval()
    batch = tiny_batch("bert")
    for strict in (True, False):
        fresh = LoRAClassifier()
        assert not list(peft_layers(fresh))
        fresh.load_state_dict(trained.state_dict(), strict=strict)
        assert len(list(peft_layers(fresh))) == 4
        torch.testing.assert_close(
            model_output(fresh.eval().model, batch), model_output(trained.model, batch), atol=0, rtol=0
        )


def test_load_state_dict_without_adapter_tensors_attaches_nothing() -> None:
    source = LoRAClassifier()
    flags = {n: p.requires_grad for n, p in source.named_parameters()}
    fresh = LoRAClassifier()
    fresh.load_state_dict(source.state_dict())  # no adapter in the state: nothing to attach
    assert not list(peft_layers(fresh))
    # keys that attaching would not explain: the adapter is rolled back, flags and strictness restored
    state = {**source.state_dict(), "model.unrelated.weight": torch.zeros(1)}
    result = fresh.load_state_dict(state, strict=False)
    assert not list(peft_layers(fresh)) and result.unexpected_keys == ["model.unrelated.weight"]
    assert {n: p.requires_grad for n, p in fresh.named_parameters()} == flags
    assert fresh.strict_loading is True


def test_evaluating_an_adapter_that_was_never_trained_or_loaded_warns(tmp_path: Path) -> None:
    module = LoRAClassifier()
    with pytest.warns(UserWarning, match="neither trained nor loaded"):
        fast_trainer(tmp_path).validate(module, hf_loader("bert", n=4))
    checkpoint_cb = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = fast_trainer(tmp_path, max_steps=2, callbacks=[checkpoint_cb], enable_checkpointing=True)
    trainer.fit(LoRAClassifier(), hf_loader("bert"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*neither trained nor loaded")
        fast_trainer(tmp_path).validate(
            LoRAClassifier(), hf_loader("bert", n=4), ckpt_path=tmp_path / "last.ckpt"
        )
