"""Prefix tuning through transformers' attention interface, for encoders without a key/value cache."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_bert
from zoo_models import ZOO

from lightning_peft import PrefixTuning, apply_peft
from lightning_peft.core.base_model import set_activation_checkpointing
from lightning_peft.methods.prefix.layers import InterfacePrefixLayer

ZOO_BY_NAME = {z.name: z for z in ZOO}


def test_the_attention_route_equals_the_cache_route_on_bert() -> None:
    """BERT takes both routes; with the real tokens at the same positions (the cache route puts them after the
    P prefix positions) the outputs are identical, padding included."""
    by_cache = tiny_bert()
    apply_peft(by_cache, PrefixTuning(num_virtual_tokens=3))
    by_attention = tiny_bert()
    layer = InterfacePrefixLayer(by_attention.bert, 3, by_cache.bert.geometry, False, 512, False)
    with torch.no_grad():
        layer.prompt_embeddings.copy_(torch.randn_like(layer.prompt_embeddings))
        by_cache.bert.prompt_embeddings.copy_(layer.prompt_embeddings)
    by_attention.bert = layer
    x = torch.randint(3, 90, (2, 6))
    mask = torch.ones_like(x)
    mask[1, 4:] = 0
    positions = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        expected = by_cache(input_ids=x, attention_mask=mask, position_ids=positions).logits
        got = by_attention(input_ids=x, attention_mask=mask, position_ids=positions + 3).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert by_attention.config._attn_implementation == "sdpa"  # put back after the call


@pytest.mark.parametrize("name", ["DistilBERT", "ALBERT"])
def test_encoders_without_a_cache_get_the_prefix_in_every_layer(name: str) -> None:
    model = ZOO_BY_NAME[name].build()
    apply_peft(model, PrefixTuning(num_virtual_tokens=3))
    (layer,) = [m for m in model.modules() if isinstance(m, InterfacePrefixLayer)]
    x = torch.randint(3, 90, (2, 6))
    first = model(input_ids=x).logits
    with torch.no_grad():  # every layer's block of Θ changes the output (ALBERT shares one attention module)
        width = layer.prompt_embeddings.shape[1] // 2
        layer.prompt_embeddings[:, width:].add_(1.0)
    second = model(input_ids=x).logits
    assert not torch.allclose(first, second)
    model(input_ids=x, labels=torch.tensor([0, 1])).loss.backward()
    grad = layer.prompt_embeddings.grad
    assert (
        grad is not None and float(grad[:, :width].abs().sum()) > 0 and float(grad[:, width:].abs().sum()) > 0
    )


def test_a_model_whose_attention_bypasses_the_interface_is_refused() -> None:
    model = ZOO_BY_NAME["DeBERTa-v2"].build()
    with pytest.raises(
        ValueError, match="DebertaV2Model.forward takes no key/value cache.*attention interface"
    ):
        apply_peft(model, PrefixTuning(num_virtual_tokens=3))


def test_gradient_checkpointing_is_refused_on_this_route() -> None:
    model = ZOO_BY_NAME["DistilBERT"].build()
    set_activation_checkpointing(model)
    apply_peft(model, PrefixTuning(num_virtual_tokens=3))
    model.train()
    with pytest.raises(RuntimeError, match="does not support gradient checkpointing"):
        model(input_ids=torch.randint(3, 90, (2, 6)))
    with torch.no_grad():
        model(input_ids=torch.randint(3, 90, (2, 6)))  # inference recomputes nothing
