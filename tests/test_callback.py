"""PEFTCallback on unmodified LightningModules: setup, optimizers, checkpoints, resume, inference."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import (
    HFModule,
    MLPModule,
    fast_trainer,
    hf_loader,
    mlp_loader,
    model_output,
    snapshot,
    tiny_batch,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_peft import LoRA, PEFTCallback, load_peft_checkpoint, trainable_parameter_names
from lightning_peft.ops.parameters import peft_layers


def lora(**kwargs: Any) -> LoRA:
    kwargs.setdefault("target_modules", ["query", "value"])
    kwargs.setdefault("modules_to_save", ["classifier"])
    kwargs.setdefault("r", 4)
    return LoRA(**kwargs)


def changed_params(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    after = module.state_dict()
    return {k for k in after if k in before and not torch.equal(before[k], after[k])}


def test_setup_is_idempotent_across_stages(tmp_path: Path) -> None:
    module = HFModule("bert")
    callback = PEFTCallback(lora())
    trainer = fast_trainer(tmp_path, max_steps=2, callbacks=[callback])
    trainer.fit(module, hf_loader("bert"), hf_loader("bert", n=4))
    layers = [n for n, _ in peft_layers(module)]
    trainer.validate(module, hf_loader("bert", n=4))
    trainer.predict(module, hf_loader("bert", n=4))
    fast_trainer(tmp_path, callbacks=[callback]).validate(module, hf_loader("bert", n=4))
    assert [n for n, _ in peft_layers(module)] == layers
    assert len(layers) == 4
    assert not any("base_layer.base_layer" in n for n, _ in module.named_modules())


def test_different_configuration_on_attached_module_is_refused(tmp_path: Path) -> None:
    module = HFModule("bert")
    fast_trainer(tmp_path, max_steps=1, callbacks=[PEFTCallback(lora())]).fit(module, hf_loader("bert"))
    with pytest.raises(ValueError, match="attaching twice is not allowed"):
        fast_trainer(tmp_path, callbacks=[PEFTCallback(lora(r=2))]).validate(module, hf_loader("bert", n=4))


class OptimizerForms(HFModule):
    """``configure_optimizers`` in every form Lightning accepts, all written for full fine-tuning."""

    def __init__(self, form: str) -> None:
        super().__init__("bert", lr=1e-2)
        self.form = form
        if form == "cli_injected":
            # LightningCLI builds --optimizer over model.parameters() before setup: frozen params, no adapter
            self.early = torch.optim.AdamW(self.parameters(), lr=1e-2)

    def configure_optimizers(self) -> Any:
        if self.form == "cli_injected":
            return self.early
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        if self.form == "single":
            return optimizer
        if self.form == "list":
            return [optimizer]
        if self.form == "two_groups":
            decay = [p for n, p in self.named_parameters() if "bias" not in n]
            no_decay = [p for n, p in self.named_parameters() if "bias" in n]
            return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.mark.parametrize("form", ["single", "list", "two_groups", "dict_scheduler", "cli_injected"])
def test_optimizer_holds_exactly_the_trainable_parameters(tmp_path: Path, form: str) -> None:
    module = OptimizerForms(form)
    before = snapshot(module)
    trainer = fast_trainer(tmp_path, max_steps=3, callbacks=[PEFTCallback(lora())])
    trainer.fit(module, hf_loader("bert"))
    optimizer = trainer.optimizers[0]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert held == trainable
    assert set(map(id, optimizer.state)) == trainable  # state only for adapter tensors
    names = set(trainable_parameter_names(module))
    changed = changed_params(before, module)
    assert changed == {"model.classifier.weight", "model.classifier.bias"}  # the frozen base is bit-identical
    for name, param in module.named_parameters():
        if name.endswith("lora_B"):
            assert name in names and torch.count_nonzero(param) > 0  # B starts at zero and has trained
    if form == "dict_scheduler":
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)


def test_plain_mlp_module(tmp_path: Path) -> None:
    module = MLPModule()
    before = snapshot(module)
    callback = PEFTCallback(LoRA(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    fast_trainer(tmp_path, max_steps=4, callbacks=[callback]).fit(module, mlp_loader())
    assert changed_params(before, module) == {"net.head.weight", "net.head.bias"}
    assert all(torch.count_nonzero(layer.lora_B) > 0 for _, layer in peft_layers(module))


@pytest.mark.parametrize("weights_only", [False, True])
def test_model_checkpoint_holds_only_adapter(tmp_path: Path, weights_only: bool) -> None:
    module = HFModule("bert")
    checkpoint_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=weights_only, save_last=True)
    trainer = fast_trainer(
        tmp_path, max_epochs=1, callbacks=[PEFTCallback(lora()), checkpoint_cb], enable_checkpointing=True
    )
    trainer.fit(module, hf_loader("bert"))
    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert files
    for file in files:
        checkpoint = torch.load(file, weights_only=False)
        assert list(checkpoint["state_dict"]) == trainable_parameter_names(module)
        assert checkpoint["lightning_peft"]["methods"][0]["r"] == 4
        if not weights_only:
            state = checkpoint["optimizer_states"][0]["state"]
            assert len(state) == len(trainable_parameter_names(module))


def train_bert(tmp_path: Path, max_epochs: int, ckpt_path: str | None = None) -> tuple[HFModule, Any]:
    torch.manual_seed(0)
    module = HFModule("bert", lr=1e-2)
    trainer = fast_trainer(tmp_path, max_epochs=max_epochs, callbacks=[PEFTCallback(lora())])
    trainer.fit(module, hf_loader("bert"), ckpt_path=ckpt_path)
    return module, trainer


def test_resume_is_exact(tmp_path: Path) -> None:
    straight, _ = train_bert(tmp_path / "a", max_epochs=3)
    first, trainer = train_bert(tmp_path / "b", max_epochs=1)
    path = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(path)
    size = path.stat().st_size
    resumed, trainer = train_bert(tmp_path / "c", max_epochs=3, ckpt_path=str(path))
    assert trainer.global_step == 3 * 4
    a = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    # and the resumed run did move away from the checkpoint
    assert not torch.equal(dict(first.named_parameters())[name], b[name])
    assert size < 100_000


def test_load_peft_checkpoint_in_one_call(tmp_path: Path) -> None:
    module, trainer = train_bert(tmp_path, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "adapter.ckpt")
    model = load_peft_checkpoint(HFModule, tmp_path / "adapter.ckpt")
    assert not model.training
    batch = tiny_batch("bert")
    module.eval()
    torch.testing.assert_close(
        model_output(model.model, batch), model_output(module.model, batch), atol=0, rtol=0
    )


class BuiltInConfigureModel(HFModule):
    """Builds its network in ``configure_model``, which Lightning calls after the callbacks' setup."""

    def __init__(self) -> None:
        super().__init__("bert")
        del self.model
        self.model = None

    def configure_model(self) -> None:
        if self.model is None:
            from helpers import tiny_bert

            self.model = tiny_bert()
            self.model.train()


def test_model_built_in_configure_model(tmp_path: Path) -> None:
    module = BuiltInConfigureModel()
    trainer = fast_trainer(tmp_path, max_steps=2, callbacks=[PEFTCallback(lora())])
    trainer.fit(module, hf_loader("bert"))
    assert len(list(peft_layers(module))) == 4
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert held == {id(p) for p in module.parameters() if p.requires_grad}


def test_parameter_counts_are_logged(tmp_path: Path) -> None:
    module = HFModule("bert")
    logger = CSVLogger(tmp_path, name="logs")
    fast_trainer(tmp_path, max_steps=1, logger=logger, callbacks=[PEFTCallback(lora())]).fit(
        module, hf_loader("bert")
    )
    hparams = yaml.safe_load(Path(logger.log_dir, "hparams.yaml").read_text())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert hparams["peft/trainable_params"] == trainable
    assert hparams["peft/method"] == "LoRA"


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluating_an_adapter_that_was_never_trained_or_loaded_warns(tmp_path: Path, stage: str) -> None:
    """The adapter attached by a validate/test/predict run has its initial values: e.g. trainer.test(module)
    after a ddp_spawn fit, whose main-process module never got the trained adapter."""
    module = HFModule("bert")
    module.test_step = module.validation_step  # type: ignore[method-assign]
    trainer = fast_trainer(tmp_path, callbacks=[PEFTCallback(lora(), verbose=False)])
    with pytest.warns(UserWarning, match=f"this {stage} run uses an adapter .* neither trained nor loaded"):
        getattr(trainer, stage)(module, hf_loader("bert", n=4))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*neither trained nor loaded")
        getattr(trainer, stage)(module, hf_loader("bert", n=4))  # attached before this run: no warning


def test_no_untrained_warning_after_fit_or_with_a_checkpoint(tmp_path: Path) -> None:
    checkpoint_cb = ModelCheckpoint(dirpath=tmp_path, filename="last")
    callbacks = [PEFTCallback(lora(), verbose=False), checkpoint_cb]
    trainer = fast_trainer(tmp_path, max_steps=2, callbacks=callbacks, enable_checkpointing=True)
    module = HFModule("bert")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*neither trained nor loaded")
        trainer.fit(module, hf_loader("bert"), hf_loader("bert", n=4))  # fit's validation: trained adapter
        trainer.validate(module, hf_loader("bert", n=4))
        fresh = fast_trainer(tmp_path, callbacks=[PEFTCallback(lora(), verbose=False)])
        fresh.validate(HFModule("bert"), hf_loader("bert", n=4), ckpt_path=tmp_path / "last.ckpt")
