"""Prefix tuning in the encoder's self-attention of encoder-decoder models (``PrefixTuning(encoder_prefix=True)``).

HF PEFT has no encoder prefix, so the oracle is the formula itself, evaluated by hand on each encoder
self-attention's own input: ``softmax(Q [K^p_l; K]^T · s + [0; B] + [0; M]) [V^p_l; V] W_o`` with T5's relative
bias ``B`` (none for BART) and the key-padding mask ``M``; the prefix positions get no bias and are never masked.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import materialize
from safetensors.torch import load_file
from test_encoder_decoder import greedy, inputs
from torch import nn
from zoo_models import ZOO

from lightning_peft import PrefixTuning, apply_peft, load_adapter, save_adapter
from lightning_peft.core.base_model import set_activation_checkpointing
from lightning_peft.methods.prefix.layers import EncoderPrefixLayer

SEQ2SEQ = {z.name: z for z in ZOO if z.kind == "encoder-decoder"}
P = 3
#: (query, key, value, output) projection names of each family's attention module
PROJECTIONS = {"T5": ("q", "k", "v", "o"), "BART": ("q_proj", "k_proj", "v_proj", "out_proj")}


def with_encoder_prefix(name: str, **kwargs: Any) -> nn.Module:
    model = SEQ2SEQ[name].build().eval()
    apply_peft(model, PrefixTuning(num_virtual_tokens=P, encoder_prefix=True, **kwargs))
    return model


def encoder_layer(model: nn.Module) -> EncoderPrefixLayer:
    (layer,) = [m for m in model.modules() if isinstance(m, EncoderPrefixLayer)]
    return layer


def self_attentions(encoder: nn.Module, name: str) -> list[nn.Module]:
    q = PROJECTIONS[name][0]
    return [m for m in encoder.modules() if isinstance(getattr(m, q, None), nn.Linear)]


def by_hand(
    attention: nn.Module,
    name: str,
    hidden: torch.Tensor,
    layer: int,
    owner: EncoderPrefixLayer,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    q_name, k_name, v_name, o_name = PROJECTIONS[name]
    g = owner.geometry
    batch, length, _ = hidden.shape

    def heads(x: torch.Tensor) -> torch.Tensor:  # (B, S, H·d) -> (B, H, S, d)
        return x.view(batch, length, g.kv_heads, g.head_dim).transpose(1, 2)

    q = heads(getattr(attention, q_name)(hidden))
    k = heads(getattr(attention, k_name)(hidden))
    v = heads(getattr(attention, v_name)(hidden))
    theta = owner.prompt_embeddings[:, layer * 2 * g.kv_dim : (layer + 1) * 2 * g.kv_dim]  # (P, 2·d_kv)
    theta = theta.reshape(P, 2, g.kv_heads, g.head_dim).permute(1, 2, 0, 3)  # (2, H, P, d)
    k = torch.cat([theta[0].expand(batch, -1, -1, -1), k], dim=2)  # (B, H, P+S, d)
    v = torch.cat([theta[1].expand(batch, -1, -1, -1), v], dim=2)
    scale = 1.0 if name == "T5" else g.head_dim**-0.5
    scores = q @ k.transpose(-1, -2) * scale  # (B, H, S, P+S)
    if bias is not None:
        scores[..., P:] += bias
    hidden_keys = torch.cat([torch.ones(batch, P, dtype=torch.bool), mask.bool()], dim=1)  # (B, P+S)
    scores = scores.masked_fill(~hidden_keys[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)  # (B, S, H·d)
    return getattr(attention, o_name)(out)


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_every_encoder_self_attention_equals_the_formula_with_its_own_prefix(name: str) -> None:
    model = with_encoder_prefix(name)
    owner = encoder_layer(model)
    attentions = self_attentions(owner.base_layer, name)
    assert len(attentions) == owner.geometry.layers
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden.detach(), output[0].detach()))

    handles = [a.register_forward_hook(capture, with_kwargs=True) for a in attentions]
    batch = inputs()
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    assert len(seen) == len(attentions)
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        # T5: the relative bias of the real tokens, computed by the first layer and shared by all
        bias = attentions[0].compute_bias(length, length) if name == "T5" else None
        for layer, (attention, (hidden, output)) in enumerate(zip(attentions, seen)):
            expected = by_hand(attention, name, hidden, layer, owner, batch["attention_mask"], bias)
            torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_every_encoder_layer_prefix_gets_a_gradient_and_changes_the_output(name: str) -> None:
    plain = SEQ2SEQ[name].build().eval()
    model = with_encoder_prefix(name)
    with torch.no_grad():
        apply_peft(plain, PrefixTuning(num_virtual_tokens=P))
        plain.get_decoder().prompt_embeddings.copy_(model.get_decoder().prompt_embeddings)
    batch = inputs()
    out = model(**batch)
    # the encoder prefix takes part (tiny random BART barely reacts, hence a difference, not a tolerance)
    assert float((out.logits - plain(**batch).logits).detach().abs().max()) > 1e-7
    out.loss.backward()
    owner = encoder_layer(model)
    width = 2 * owner.geometry.kv_dim
    grad = owner.prompt_embeddings.grad
    for layer in range(owner.geometry.layers):
        assert float(grad[:, layer * width : (layer + 1) * width].abs().sum()) > 0, f"encoder layer {layer}"


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_generate_with_the_encoder_prefix_equals_greedy_decoding_by_hand(name: str) -> None:
    model = with_encoder_prefix(name, cross_attention_prefix=True)
    batch = inputs()
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "max_new_tokens": 4}
    generated = model.generate(**kwargs, do_sample=False)  # (B, ≤ 5): tiny BART may stop at its EOS
    assert generated.shape[1] >= 2
    assert torch.equal(generated, greedy(model, batch, 4)[:, : generated.shape[1]])


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_save_and_load_keep_the_encoder_prefix_and_hf_peft_reads_the_decoder_part(
    name: str, tmp_path: Path
) -> None:
    model = with_encoder_prefix(name, prefix_projection=True)
    batch = inputs()
    with torch.no_grad():
        ours = model(**batch).logits
    save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(tensors) == {"prompt_embeddings", "encoder_prompt_embeddings"}  # folded, no MLP
    loaded = load_adapter(SEQ2SEQ[name].build(), tmp_path).eval()
    assert isinstance(loaded.get_encoder(), EncoderPrefixLayer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ours, atol=1e-5, rtol=0)
    # HF PEFT reads the decoder's prompt_embeddings: the same as our model with the encoder prefix removed
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(SEQ2SEQ[name].build(), tmp_path).eval()
    decoder_only = SEQ2SEQ[name].build().eval()
    apply_peft(decoder_only, PrefixTuning(num_virtual_tokens=P))
    with torch.no_grad():
        decoder_only.get_decoder().prompt_embeddings.copy_(tensors["prompt_embeddings"])
        torch.testing.assert_close(theirs(**batch).logits, decoder_only(**batch).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("zoo_name", ["GPT-2", "BERT"])
def test_encoder_prefix_on_a_model_without_a_separate_encoder_is_refused_before_touching_it(
    zoo_name: str,
) -> None:
    (entry,) = [z for z in ZOO if z.name == zoo_name]
    model = entry.build()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        ValueError, match=rf"encoder_prefix=True is for encoder-decoder models.*{type(model).__name__}"
    ):
        apply_peft(model, PrefixTuning(num_virtual_tokens=P, encoder_prefix=True))
    assert list(model.state_dict()) == list(before)
    assert all(p.requires_grad for p in model.parameters())


def test_gradient_checkpointing_with_the_encoder_prefix_is_an_error_that_says_so() -> None:
    model = with_encoder_prefix("T5").train()
    set_activation_checkpointing(model, use_reentrant=False)
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(**inputs())


def test_meta_materialisation_gives_the_encoder_prefix_its_documented_init() -> None:
    with torch.device("meta"):
        model = SEQ2SEQ["T5"].build()
    apply_peft(model, PrefixTuning(num_virtual_tokens=P, encoder_prefix=True))
    materialize(model)  # Lightning's to_empty + reset_parameters
    for tensor in (encoder_layer(model).prompt_embeddings, model.get_decoder().prompt_embeddings):
        tensor = tensor.detach()
        assert bool(tensor.isfinite().all()) and 0.7 < float(tensor.std()) < 1.3  # N(0, 1)


@pytest.mark.parametrize("name", [*SEQ2SEQ, "GPT-2"])
def test_prefix_tuning_calls_models_with_the_current_cache_keyword(name: str) -> None:
    """transformers 5.24 deprecates ``past_key_values`` (gone in 5.40): our forward and generate never pass it."""
    entry = SEQ2SEQ.get(name) or next(z for z in ZOO if z.name == name)
    model = entry.build().eval()
    seq2seq = name in SEQ2SEQ
    apply_peft(
        model, PrefixTuning(num_virtual_tokens=P, encoder_prefix=seq2seq, cross_attention_prefix=seq2seq)
    )
    batch = inputs() if seq2seq else {**inputs(), "labels": inputs()["input_ids"]}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*deprecated", category=FutureWarning)
        model(**batch).loss.backward()
        with torch.no_grad():
            model.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=2
            )
