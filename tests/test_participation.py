"""The guard against silent no-ops (lightning_peft/ops/participation.py) and the architecture fixes it found."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import HFModule, fast_trainer, hf_loader, tiny_bert
from zoo_models import ZOO

from lightning_peft import IA3, LoRA, PEFTCallback, PromptTuning, apply_peft, load_adapter, save_adapter
from lightning_peft.methods._virtual_tokens import VirtualTokenLayer

ZOO_BY_NAME = {z.name: z for z in ZOO}


def fit(module: pl.LightningModule, method: object) -> None:
    trainer = fast_trainer(".", max_steps=1, callbacks=[PEFTCallback(method, verbose=False)])  # type: ignore[arg-type]
    trainer.fit(module, hf_loader("bert", n=4, batch_size=2))


class Bypass(HFModule):
    """A training_step that reaches BERT's encoder directly, bypassing the wrapped ``bert`` backbone."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        bert = self.model.bert
        inner = bert.base_layer if isinstance(bert, VirtualTokenLayer) else bert
        hidden = inner.embeddings(input_ids=batch["input_ids"])
        hidden = inner.encoder(hidden).last_hidden_state
        return torch.nn.functional.cross_entropy(self.model.classifier(hidden[:, 0]), batch["labels"])


def test_a_method_bypassed_by_the_forward_is_an_error_naming_model_method_and_why() -> None:
    with pytest.raises(
        RuntimeError, match=r"PromptTuning is attached to BertForSequenceClassification.*none of"
    ):
        fit(Bypass(), PromptTuning(num_virtual_tokens=2))


class NoModel(HFModule):
    """A loss that does not use the model at all."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return (batch["input_ids"].float() * 0).sum() + torch.zeros((), requires_grad=False)


def test_a_loss_without_the_adapter_is_an_error_before_backward() -> None:
    with pytest.raises(RuntimeError, match="ran in the forward pass|does not depend on any trainable"):
        fit(NoModel(), LoRA(r=2, target_modules=["query"]))


class DetachedLoRA(HFModule):
    """The LoRA layers run, but the loss is cut off from them (no gradient reaches LoRA at all)."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"]).logits.detach()
        head = self.model.classifier
        return torch.nn.functional.cross_entropy(logits + 0 * head.weight.sum(), batch["labels"])


def test_a_method_without_any_gradient_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="none of the 8 tensors of LoRA on BertForSequenceClassification"):
        fit(DetachedLoRA(), LoRA(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))


def test_load_adapter_checks_the_first_inference(tmp_path: object) -> None:
    model = tiny_bert()
    apply_peft(model, IA3(target_modules=["key"]))
    save_adapter(model, tmp_path)
    loaded = load_adapter(tiny_bert(), tmp_path)
    with pytest.raises(RuntimeError, match="IA3 is attached to BertForSequenceClassification"):
        _bypass_root(loaded)
    # checked once: later calls are free
    loaded(input_ids=torch.tensor([[5, 6, 7]]))


def _bypass_root(model: torch.nn.Module) -> None:
    """Call the root without reaching any IA3 layer: a forward hook on the root checks after its first call."""
    original = type(model).forward
    try:
        type(model).forward = lambda self, **kwargs: None  # type: ignore[method-assign]
        model()
    finally:
        type(model).forward = original  # type: ignore[method-assign]


def test_opt_prompt_tuning_reaches_the_decoder_that_opt_for_causal_lm_calls() -> None:
    model = ZOO_BY_NAME["OPT"].build()
    apply_peft(model, PromptTuning(num_virtual_tokens=2))
    assert isinstance(model.model.decoder, VirtualTokenLayer)
    x = torch.tensor([[5, 6, 7, 8]])
    first = model(input_ids=x).logits
    with torch.no_grad():
        model.model.decoder.prompt_embeddings.add_(1.0)
    assert not torch.allclose(model(input_ids=x).logits, first)  # the logits depend on the prompt


def test_t5_feed_forward_reads_the_weight_of_a_wrapped_layer() -> None:
    model = ZOO_BY_NAME["T5"].build()
    apply_peft(model, LoRA(r=2, target_modules=["wo"]))
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.weight is wo.base_layer.weight and wo.weight.dtype == torch.float32
    assert (wo.in_features, wo.out_features) == (64, 32) and wo.bias is None
    assert wo.dtype == torch.float32 and wo.device.type == "cpu"
    x = torch.tensor([[5, 6, 7]])
    model(input_ids=x, labels=x)
