"""Adapter functions accept the LightningModule PEFT was attached to or the transformers model inside it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from llm_tiny import tiny_chat_llama
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import (
    LoRA,
    PEFTCallback,
    active_adapters,
    adapter_state_dict,
    add_adapter,
    apply_peft,
    count_parameters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    load_adapter,
    merge_adapter,
    merge_and_unload,
    remove_peft,
    save_adapter,
    set_adapter,
    trainable_parameter_names,
    unmerge_adapter,
)
from lightning_peft.core.record import get_record
from lightning_peft.methods.base import PEFTLayer
from lightning_peft.ops.resolve import resolve_owner

TARGETS = ["q_proj", "v_proj"]


class SFT(pl.LightningModule):
    """A minimal causal-LM module holding the transformers model as ``self.model``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_chat_llama().train()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def trained(method: object = None) -> SFT:
    """Fit 2 steps with PEFTCallback: the record lives on the LightningModule, the layers in ``module.model``."""
    module = SFT()
    ids = torch.randint(3, 300, (4, 10), generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(
        max_steps=2,
        callbacks=[PEFTCallback(method or LoRA(r=4, target_modules=TARGETS), verbose=False)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=2))
    return module.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 19).view(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_callback_record_is_on_the_module_and_inner_model_resolves_to_it() -> None:
    module = trained()
    assert get_record(module) is not None and get_record(module.model) is None
    assert resolve_owner(module.model) is module
    assert resolve_owner(module) is module
    assert list_adapters(module.model) == ["default"] == active_adapters(module.model)


@pytest.mark.parametrize("given", ["module", "inner"])
def test_save_adapter_from_either_gives_the_same_files_and_loads_back(tmp_path: Path, given: str) -> None:
    module = trained()
    target = module if given == "module" else module.model
    save_adapter(target, tmp_path / "a")
    fresh = tiny_chat_llama()
    load_adapter(fresh, tmp_path / "a")
    assert torch.allclose(logits(fresh), logits(module.model), atol=1e-6)
    assert not torch.allclose(logits(fresh), logits(tiny_chat_llama()), atol=1e-4)  # the adapter trained


def test_names_and_state_are_relative_to_the_module_given() -> None:
    module = trained(LoRA(r=4, target_modules=TARGETS, modules_to_save=["model.norm"]))
    inner_names = trainable_parameter_names(module.model)
    outer_names = trainable_parameter_names(module)
    assert outer_names == [f"model.{n}" for n in inner_names] and inner_names
    assert all(n in dict(module.model.named_parameters()) for n in inner_names)
    assert (
        "model.norm.weight" in inner_names
    )  # a saved module, known only to the record on the LightningModule
    state = adapter_state_dict(module.model)
    assert set(state) == set(inner_names)
    assert set(adapter_state_dict(module)) == {f"model.{n}" for n in state}


def test_count_parameters_counts_the_module_given() -> None:
    module = trained()
    inner, outer = count_parameters(module.model), count_parameters(module)
    assert inner.trainable == outer.trainable > 0
    assert inner.total == sum(p.numel() for p in module.model.parameters())


def test_merge_unmerge_and_merge_and_unload_on_the_inner_model() -> None:
    module = trained()
    before = logits(module.model)
    merge_adapter(module.model)
    assert all(layer.merged for layer in module.model.modules() if isinstance(layer, PEFTLayer))
    assert torch.allclose(logits(module.model), before, atol=1e-5)
    unmerge_adapter(module.model)
    plain = merge_and_unload(module.model)
    assert plain is module.model
    assert not any(isinstance(m, PEFTLayer) for m in module.modules())
    assert get_record(module) is None  # the LightningModule's record (and its hooks) went too
    assert "on_save_checkpoint" not in module.__dict__
    assert torch.allclose(logits(plain), before, atol=1e-5)


def test_remove_peft_on_the_inner_model_restores_the_base() -> None:
    module = trained()
    assert remove_peft(module.model) is module.model
    assert get_record(module) is None
    assert torch.allclose(logits(module.model), logits(tiny_chat_llama()), atol=1e-6)


def test_named_adapters_on_the_inner_model() -> None:
    module = trained()
    add_adapter(module.model, LoRA(r=2, target_modules=["k_proj"]), "second")
    assert list_adapters(module) == ["default", "second"]
    set_adapter(module.model, "second")
    assert active_adapters(module) == ["second"]
    set_adapter(module.model, "default")
    with disable_adapters(module.model):
        assert torch.allclose(logits(module.model), logits(tiny_chat_llama()), atol=1e-6)
    delete_adapter(module.model, "second")
    assert list_adapters(module) == ["default"]


def test_a_submodule_that_misses_adapter_layers_is_refused() -> None:
    module = trained()
    with pytest.raises(ValueError, match="reach outside it.*pass the SFT"):
        save_adapter(module.model.model.layers[0], "unused")


def test_wrapper_around_the_holder_resolves_down() -> None:
    model = tiny_chat_llama()
    apply_peft(model, LoRA(r=4, target_modules=TARGETS))
    wrapper = torch.nn.ModuleDict({"lm": model})
    assert resolve_owner(wrapper) is model
    assert trainable_parameter_names(wrapper) == [f"lm.{n}" for n in trainable_parameter_names(model)]


def test_a_model_with_no_adapter_anywhere_is_unchanged() -> None:
    model = tiny_chat_llama()
    assert resolve_owner(model) is model
    with pytest.raises(ValueError, match="no PEFT method is attached"):
        save_adapter(model, "unused")
