"""Prefix tuning under activation checkpointing: HF's (which drops the key/value cache inside checkpointed
layers) and torch's ``checkpoint_wrapper`` (which keeps it but recomputes every layer) give the gradients
of a normal step, reentrant or not, with and without the reparameterisation MLP."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import TINY_MODELS, model_output, tiny_batch
from test_prefix import P, prefix_layer, with_prefix
from torch import nn

from lightning_peft import remove_peft, trainable_parameter_names
from lightning_peft.core.base_model import set_activation_checkpointing
from lightning_peft.distributed import enable_input_grads
from lightning_peft.methods.prefix.cache import PrefixAttentionHook, remove_hooks

KINDS = ["bert", "gpt2", "llama"]
BLOCKS = {"bert": "BertLayer", "gpt2": "GPT2Block", "llama": "LlamaDecoderLayer"}


def loss_and_grads(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(model: nn.Module, batch: dict[str, torch.Tensor], expected: tuple) -> None:
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, expected[0], atol=1e-6, rtol=0)
    assert set(grads) == set(expected[1]) == set(trainable_parameter_names(model))
    for name, grad in expected[1].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def hooks_of(model: nn.Module) -> list[PrefixAttentionHook]:
    return [
        h
        for m in model.modules()
        for h in m._forward_pre_hooks.values()
        if isinstance(h, PrefixAttentionHook)
    ]


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("kind", KINDS)
def test_hf_gradient_checkpointing_gives_the_gradients_of_a_normal_step(
    kind: str, projection: bool, use_reentrant: bool
) -> None:
    model = with_prefix(kind, prefix_projection=projection, encoder_hidden_size=8).train()
    batch = tiny_batch(kind)
    if kind != "bert":
        batch["attention_mask"][1, :4] = 0  # left padding
    expected = loss_and_grads(model, batch)
    set_activation_checkpointing(model, use_reentrant=use_reentrant)
    enable_input_grads(model)  # what PEFTCallback does at on_fit_start (reentrant needs it)
    assert_same_step(model, batch, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_checkpoint_wrapper_gives_the_gradients_of_a_normal_step(kind: str) -> None:
    """torch's wrapper keeps the cache and recomputes the layer: a cache that stored the real keys would
    see them twice on the recompute."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model = with_prefix(kind).train()
    batch = tiny_batch(kind)
    expected = loss_and_grads(model, batch)
    apply_activation_checkpointing(model, check_fn=lambda m: type(m).__name__ == BLOCKS[kind])
    assert sum(type(m).__name__ == "CheckpointWrapper" for m in model.modules()) == 2
    assert_same_step(model, batch, expected)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("kind", KINDS)
def test_outputs_with_gradients_on_equal_those_of_the_filled_cache(kind: str, projection: bool) -> None:
    """With gradients on the prefix comes from the read-only cache, one layer's columns of Θ at a time;
    without, from the cache the layers fill (the path compared with HF PEFT and a hand-written BERT in
    test_prefix)."""
    model = with_prefix(kind, prefix_projection=projection, encoder_hidden_size=8).train()
    batch = tiny_batch(kind)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(model(**inputs).logits.detach(), model_output(model, batch), atol=1e-6, rtol=0)
    assert not torch.allclose(model_output(model, batch), model_output(TINY_MODELS[kind]().eval(), batch))


@pytest.mark.parametrize("kind", KINDS)
def test_without_the_hooks_a_dropped_cache_is_an_error_not_a_silent_loss(kind: str) -> None:
    model = with_prefix(kind).train()
    set_activation_checkpointing(model)
    layer = prefix_layer(model)
    assert len(hooks_of(model)) == 2  # one per attention layer
    remove_hooks(layer, layer.base_layer)
    assert hooks_of(model) == []
    with pytest.raises(RuntimeError, match=r"attention layers.* got no prefix.*gradient-checkpointed"):
        model(**tiny_batch(kind))
    model.eval()
    model(**tiny_batch(kind))  # checkpointing only acts in training: the cache is kept


@pytest.mark.parametrize("kind", KINDS)
def test_checkpointed_model_in_training_mode_without_gradients(kind: str) -> None:
    """GPT-2 drops the cache in checkpointed training mode even under no_grad; the hooks give the prefix."""
    model = with_prefix(kind)
    batch = tiny_batch(kind)
    expected = model_output(model, batch)
    set_activation_checkpointing(model)
    torch.testing.assert_close(model_output(model.train(), batch), expected, atol=1e-6, rtol=0)


def test_generate_after_checkpointed_training_keeps_the_prefix() -> None:
    model = with_prefix("gpt2").train()
    set_activation_checkpointing(model)
    loss_and_grads(model, tiny_batch("gpt2"))
    prompt = tiny_batch("gpt2", batch=1, seq=4)["input_ids"]
    generated = model.eval().generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    set_activation_checkpointing(model, enable=False)
    plain = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, plain)


def test_hooks_follow_copies_and_go_with_the_adapter() -> None:
    model = with_prefix("bert").train()
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # ddp_spawn pickles the module
        assert {id(h.owner) for h in hooks_of(twin)} == {id(prefix_layer(twin))}
        set_activation_checkpointing(twin)
        with torch.no_grad():
            prefix_layer(twin).prompt_embeddings.zero_()
        batch = tiny_batch("bert")
        assert not torch.allclose(twin(**batch).logits, model(**batch).logits)  # the twin's own prefix
    assert prefix_layer(model).prompt_embeddings.shape[0] == P
    remove_peft(model)
    assert hooks_of(model) == []
