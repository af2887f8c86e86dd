"""Adapters on models whose weights are created empty: meta-device materialisation (what Lightning does for
``ModelParallelStrategy``/FSDP2: ``to_empty``, then ``reset_parameters`` on every module with parameters) and
``Trainer.init_module(empty_init=True)`` (which turns ``torch.nn.init`` into no-ops).

Every method must then start at its documented init: the same outputs as the model without the adapter for
LoRA, DoRA, IA3, bottleneck adapters and BitFit; U(-0.5, 0.5) soft prompts; N(0, 1) prefixes. DoRA's
magnitude ``m = ‖W‖`` depends on the base weight, which Lightning resets *after* the DoRA layer (parents come
first in ``modules()``) and which FSDP flows may load later still: it is computed again at ``on_fit_start``
while it has been neither trained nor loaded. (The 2-process FSDP2 run is in tests/test_fsdp2.py.)
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from helpers import HFModule, every_method, fast_trainer, hf_loader, materialize, tiny_batch, tiny_bert
from lightning.fabric.utilities.init import _EmptyInit
from torch import nn

from lightning_peft import (
    PEFTCallback,
    PEFTMethod,
    PEFTMixin,
    apply_peft,
    remove_peft,
    trainable_parameter_names,
)
from lightning_peft.ops.participation import disarm, start_training

METHODS = every_method()
IDENTITY = {"lora", "dora", "ia3", "adapter", "bitfit"}


def outputs(model: nn.Module) -> torch.Tensor:
    batch = tiny_batch("bert", batch=2)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def check_documented_init(model: nn.Module, method: str) -> None:
    params = dict(model.named_parameters())
    adapter = {n: params[n].detach() for n in trainable_parameter_names(model)}
    assert all(bool(t.isfinite().all()) for t in adapter.values()), "uninitialised memory in the adapter"
    if method in IDENTITY:
        torch.testing.assert_close(
            outputs(model), outputs(remove_peft(copy.deepcopy(model))), atol=1e-6, rtol=0
        )
    elif method == "prompt":
        (prompt,) = adapter.values()
        assert float(prompt.abs().max()) <= 0.5 and float(prompt.std()) > 0.2
    else:
        (prefix,) = adapter.values()
        assert 0.8 < float(prefix.std()) < 1.2


def restore_buffers(model: nn.Module) -> None:
    """BERT's non-persistent position/token-type id buffers have no reset_parameters: take them from a real
    model (a user loads them with the weights)."""
    real = dict(tiny_bert().named_buffers())
    for name, buffer in model.named_buffers():
        buffer.copy_(real[name.replace("base_layer.", "")])


@pytest.mark.parametrize("method", METHODS)
def test_meta_materialisation_leaves_every_adapter_at_its_init(method: str) -> None:
    with torch.device("meta"):
        model = tiny_bert()
    apply_peft(model, METHODS[method]())
    materialize(model)  # Lightning's own materialisation
    restore_buffers(model)
    if method == "dora":  # m was computed from the base weight before Lightning reset it
        assert not torch.allclose(outputs(model), outputs(remove_peft(copy.deepcopy(model))), atol=1e-3)
    start_training(model)  # what on_fit_start runs
    disarm(model)
    check_documented_init(model, method)


@pytest.mark.parametrize("method", METHODS)
def test_adapters_created_under_empty_init_are_initialised(method: str) -> None:
    model = tiny_bert()
    with _EmptyInit():  # Trainer.init_module(empty_init=True) on one device: torch.nn.init does nothing
        apply_peft(model, METHODS[method]())
    check_documented_init(model, method)


class CheckAtTrainStart(pl.Callback):
    """Placed after PEFTCallback: the adapter is at its init once fit starts, with the loaded base weights."""

    def __init__(self, method: str, reference: nn.Module) -> None:
        self.method, self.reference = method, reference
        self.checked = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        check_documented_init(model, self.method)
        if self.method in IDENTITY:
            torch.testing.assert_close(outputs(model), outputs(self.reference), atol=1e-6, rtol=0)
        self.checked = True


class LoadedBaseMixin(PEFTMixin, HFModule):
    """``self.apply_peft()`` in ``configure_model``."""

    def __init__(self, method: str) -> None:
        super().__init__(seed=3)
        self.method_name = method

    def configure_peft(self) -> PEFTMethod:
        return METHODS[self.method_name]()

    def configure_model(self) -> None:
        self.apply_peft()


def fit(module: pl.LightningModule, callbacks: list[pl.Callback], reference: nn.Module) -> None:
    trainer = fast_trainer(".", max_steps=1, callbacks=callbacks, deterministic=False)
    with trainer.init_module(empty_init=True):
        built = module()  # type: ignore[operator]
    built.model.load_state_dict(reference.state_dict())  # the user's pretrained base weights
    trainer.fit(built, hf_loader("bert", n=4, batch_size=2))
    assert callbacks[-1].checked  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", METHODS)
def test_init_module_empty_init_with_the_callback_and_the_mixin(method: str) -> None:
    reference = tiny_bert(seed=0)
    fit(
        lambda: HFModule(seed=3),
        [PEFTCallback(METHODS[method](), verbose=False), CheckAtTrainStart(method, reference)],
        reference,
    )  # type: ignore[arg-type]
    fit(lambda: LoadedBaseMixin(method), [CheckAtTrainStart(method, reference)], reference)  # type: ignore[arg-type]
