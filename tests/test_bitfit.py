"""BitFit: which biases train, errors for bias-free models, training, save/load, merge, combinations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import (
    HFModule,
    fast_trainer,
    hf_loader,
    model_output,
    tiny_batch,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)
from safetensors.torch import load_file
from torch import nn

from lightning_peft import (
    Adapter,
    BitFit,
    LoRA,
    PEFTCallback,
    apply_peft,
    load_adapter,
    merge_adapter,
    merge_and_unload,
    remove_peft,
    save_adapter,
    trainable_parameter_names,
)
from lightning_peft.core.record import is_attached
from lightning_peft.methods import method_from_dict
from lightning_peft.ops.parameters import peft_layers


def bias_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.endswith("bias")}


def perturb(model: nn.Module, names: set[str], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(names):
            params[name].add_(torch.randn(params[name].shape, generator=g) * 0.2)


# -- configuration -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"biases": "some"}, "biases must be one of 'all', 'attention', 'pattern', got 'some'"),
        (
            {"biases": "pattern"},
            "biases='pattern' trains the biases of the modules named by target_modules, got ",
        ),
        (
            {"target_modules": ["query"]},
            "target_modules is only used with biases='pattern', got biases='all'",
        ),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BitFit(**kwargs)


def test_config_round_trip() -> None:
    config = BitFit(biases="pattern", target_modules=["query"], exclude_modules="classifier")
    assert method_from_dict(config.to_dict()) == config
    with pytest.raises(TypeError, match="exclude_modules must be a list of strings"):
        BitFit(exclude_modules=[3])  # type: ignore[list-item]


# -- which biases ------------------------------------------------------------------------------------------
def test_all_biases_and_plan_wraps_nothing() -> None:
    model = tiny_bert()
    method = BitFit()
    assert method.plan(model) == []
    apply_peft(model, method)
    assert set(trainable_parameter_names(model)) == bias_names(model)
    assert len(bias_names(model)) == 19  # embeddings LN, 2 × 8 per block, pooler, classifier
    assert not list(peft_layers(model))
    for name, param in model.named_parameters():
        assert param.requires_grad == name.endswith("bias"), name


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            tiny_bert,
            {
                f"bert.encoder.layer.{i}.attention.{m}.bias"
                for i in range(2)
                for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
            },
        ),
        (tiny_gpt2, {f"transformer.h.{i}.attn.{m}.bias" for i in range(2) for m in ("c_attn", "c_proj")}),
    ],
)
def test_attention_biases(make: type, expected: set[str]) -> None:
    model = make()
    apply_peft(model, BitFit(biases="attention"))
    assert set(trainable_parameter_names(model)) == expected


def test_pattern_and_exclude() -> None:
    model = tiny_bert()
    apply_peft(model, BitFit(biases="pattern", target_modules=["query", "value"]))
    assert set(trainable_parameter_names(model)) == {
        f"bert.encoder.layer.{i}.attention.self.{m}.bias" for i in range(2) for m in ("query", "value")
    }
    # a container matched by the pattern brings the biases of everything inside it
    model = tiny_bert()
    apply_peft(model, BitFit(biases="pattern", target_modules=r"bert\.encoder\.layer\.1\.output"))
    assert set(trainable_parameter_names(model)) == {
        "bert.encoder.layer.1.output.dense.bias",
        "bert.encoder.layer.1.output.LayerNorm.bias",
    }
    # exclude_modules also covers everything below an excluded container
    model = tiny_bert()
    apply_peft(model, BitFit(exclude_modules=["attention", "LayerNorm", "classifier"]))
    assert set(trainable_parameter_names(model)) == {
        "bert.encoder.layer.0.intermediate.dense.bias",
        "bert.encoder.layer.0.output.dense.bias",
        "bert.encoder.layer.1.intermediate.dense.bias",
        "bert.encoder.layer.1.output.dense.bias",
        "bert.pooler.dense.bias",
    }


def test_fused_biases_of_multihead_attention() -> None:
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8, bias=False))
    apply_peft(model, BitFit())
    assert set(trainable_parameter_names(model)) == {"0.in_proj_bias", "0.out_proj.bias"}


def test_no_biases_is_an_error_and_model_unchanged(tmp_path: Path) -> None:
    model = tiny_llama()
    with pytest.raises(
        ValueError, match=r"no bias parameters in LlamaForCausalLM \(model_type='llama'\).*'bias'"
    ):
        apply_peft(model, BitFit())
    assert not is_attached(model) and all(p.requires_grad for p in model.parameters())
    module = HFModule("llama")
    trainer = fast_trainer(tmp_path, callbacks=[PEFTCallback(BitFit(), verbose=False)])
    with pytest.raises(ValueError, match=r"no bias parameters in HFModule"):
        trainer.fit(module, hf_loader("llama"))


def test_nothing_selected_errors_name_the_search() -> None:
    model = tiny_bert()
    with pytest.raises(
        ValueError, match=r"target_modules=\['nope'\] matched no module.*Modules with biases:"
    ):
        apply_peft(model, BitFit(biases="pattern", target_modules=["nope"]))
    with pytest.raises(
        ValueError, match=r"matched \['bert.embeddings.word_embeddings'\], which hold no bias"
    ):
        apply_peft(model, BitFit(biases="pattern", target_modules=["word_embeddings"]))
    with pytest.raises(
        ValueError, match=r"biases='attention' found no bias inside a module whose name contains"
    ):
        apply_peft(nn.Sequential(nn.Linear(2, 2)), BitFit(biases="attention"))
    assert not is_attached(model)


# -- training, save/load, merge -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_training_changes_only_biases(tmp_path: Path, kind: str) -> None:
    module = HFModule(kind)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = fast_trainer(tmp_path, callbacks=[PEFTCallback(BitFit(), verbose=False)])
    trainer.fit(module, hf_loader(kind))
    trainable = set(trainable_parameter_names(module))
    assert trainable == bias_names(module)
    changed = {n for n, p in module.named_parameters() if not torch.equal(before[n], p)}
    assert changed <= trainable
    # BERT's key bias adds the same q·b_k to every score of a query, which softmax ignores: zero gradient
    unchanged = trainable - changed
    assert all(".key." in n for n in unchanged), unchanged


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = tiny_bert()
    apply_peft(model, BitFit())
    perturb(model, bias_names(model))
    batch = tiny_batch("bert")
    expected = model_output(model, batch)
    save_adapter(model, tmp_path / "bitfit")
    keys = set(load_file(str(tmp_path / "bitfit" / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.{n}" for n in bias_names(model)}
    fresh = tiny_bert()
    assert not torch.allclose(model_output(fresh, batch), expected)
    load_adapter(fresh, tmp_path / "bitfit")
    torch.testing.assert_close(model_output(fresh, batch), expected, rtol=0, atol=0)


def test_merge_and_unload_keeps_trained_biases() -> None:
    model = tiny_bert()
    apply_peft(model, BitFit())
    perturb(model, bias_names(model))
    batch = tiny_batch("bert")
    expected = model_output(model, batch)
    merge_adapter(model)  # nothing to fold: a no-op, not an error
    torch.testing.assert_close(model_output(model, batch), expected, rtol=0, atol=0)
    merged = merge_and_unload(model)
    assert not is_attached(merged) and trainable_parameter_names(merged) == []
    torch.testing.assert_close(model_output(merged, batch), expected, rtol=0, atol=0)
    assert not torch.allclose(expected, model_output(tiny_bert(), batch))


# -- combinations ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora_first", [True, False])
def test_combined_with_lora(tmp_path: Path, lora_first: bool) -> None:
    model = tiny_bert()
    lora, bitfit = LoRA(r=2, target_modules=["query", "value"]), BitFit()
    apply_peft(model, [lora, bitfit] if lora_first else [bitfit, lora])
    lora_params = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert len(lora_params) == 8
    assert set(trainable_parameter_names(model)) == lora_params | bias_names(model)
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in bias_names(model)
    perturb(model, lora_params | bias_names(model))
    batch = tiny_batch("bert")
    expected = model_output(model, batch)
    save_adapter(model, tmp_path / "both")
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path / "both")
    torch.testing.assert_close(model_output(fresh, batch), expected, rtol=0, atol=0)
    # LoRA folds into the weights and the trained biases stay in place
    merged = merge_and_unload(fresh)
    assert isinstance(merged.bert.encoder.layer[0].attention.self.query, nn.Linear)
    torch.testing.assert_close(model_output(merged, batch), expected, atol=1e-5, rtol=1e-5)


def test_combined_with_adapter_skips_adapter_internals() -> None:
    model = tiny_bert()
    apply_peft(model, [Adapter(bottleneck_size=4), BitFit(biases="pattern", target_modules=["output.dense"])])
    bitfit_marked = {n for n in trainable_parameter_names(model) if ".adapter_" not in n}
    assert bitfit_marked == {
        f"bert.encoder.layer.{i}.{m}.bias"
        for i in range(2)
        for m in ("attention.output.dense", "output.dense.base_layer")
    }


# -- the real MiniLM ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "expected"),
    [
        # embeddings LN 384; per block q,k,v,o + 2 LN + FFN out = 7·384, FFN in 1536; pooler 384; classifier 2
        (BitFit(), 384 + 6 * (7 * 384 + 1536) + 384 + 2),
        (BitFit(biases="attention"), 6 * 5 * 384),
    ],
)
def test_minilm_counts(minilm: nn.Module, method: BitFit, expected: int) -> None:
    counts = apply_peft(minilm, method)
    try:
        assert counts.trainable == expected
    finally:
        remove_peft(minilm)
