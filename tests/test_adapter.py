"""Bottleneck adapters: configuration, the formula, placement in real blocks, training, save/load, merge."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import (
    MLP,
    TINY_MODELS,
    HFModule,
    fast_trainer,
    hf_loader,
    model_output,
    tiny_batch,
    tiny_bert,
)
from safetensors.torch import load_file
from torch import nn

from lightning_peft import (
    Adapter,
    LoRA,
    PEFTCallback,
    apply_peft,
    load_adapter,
    load_peft_checkpoint,
    merge_and_unload,
    remove_peft,
    save_adapter,
    trainable_parameter_names,
)
from lightning_peft.core.record import is_attached
from lightning_peft.methods import method_from_dict
from lightning_peft.methods.adapter import BottleneckAdapterLayer
from lightning_peft.ops.parameters import peft_layers

#: the activations written out by hand, independent of torch.nn's modules
FORMULAS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": lambda t: t.clamp_min(0),
    "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))),
    "gelu_tanh": lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3))),
    "silu": lambda t: t / (1 + torch.exp(-t)),
    "tanh": lambda t: (torch.exp(t) - torch.exp(-t)) / (torch.exp(t) + torch.exp(-t)),
}


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """W_up and b_up start at zero, which would hide bugs; give every adapter tensor random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in peft_layers(model):
            for name, p in layer.named_parameters():
                if not name.startswith("base_layer."):  # adapter (or LoRA) tensors only
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def adapter_formula(layer: BottleneckAdapterLayer, h: torch.Tensor, activation: str) -> torch.Tensor:
    wd, bd = layer.adapter_down.weight, layer.adapter_down.bias
    wu, bu = layer.adapter_up.weight, layer.adapter_up.bias
    return h + FORMULAS[activation](h @ wd.T + bd) @ wu.T + bu


def wrapped_names(model: nn.Module) -> list[str]:
    return [name for name, _ in peft_layers(model)]


# -- configuration -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"placement": "after"}, "placement must be one of 'houlsby', 'pfeiffer', got 'after'"),
        ({"bottleneck_size": 0}, "bottleneck_size must be a positive integer, got 0"),
        ({"reduction_factor": -2}, "reduction_factor must be a positive integer, got -2"),
        ({"reduction_factor": 2.5}, "reduction_factor must be a positive integer, got 2.5"),
        ({"bottleneck_size": 8, "reduction_factor": 4}, "bottleneck_size=8 and reduction_factor=4"),
        ({"activation": "softplus"}, "activation must be one of 'relu', 'gelu'"),
        ({"train_layernorms": "yes"}, "train_layernorms must be True, False or None, got 'yes'"),
        ({"target_modules": []}, "target_modules must name at least one module"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Adapter(**kwargs)


def test_config_defaults_and_round_trip() -> None:
    method = Adapter()
    assert method.bottleneck_for(384) == 24  # reduction factor 16 when nothing is given
    assert Adapter(reduction_factor=8).bottleneck_for(384) == 48
    assert Adapter(bottleneck_size=5).bottleneck_for(384) == 5
    assert Adapter().layernorms_trained is False
    assert Adapter(placement="houlsby").layernorms_trained is True
    assert Adapter(placement="houlsby", train_layernorms=False).layernorms_trained is False
    config = Adapter(placement="houlsby", bottleneck_size=4, activation="gelu", target_modules="x")
    assert method_from_dict(config.to_dict()) == config
    with pytest.raises(TypeError, match="target_modules must be a list of strings"):
        Adapter(target_modules=[1])  # type: ignore[list-item]


# -- the formula -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", sorted(FORMULAS))
def test_layer_matches_formula_linear(activation: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 10)
    layer = BottleneckAdapterLayer(base, bottleneck_size=3, activation=activation)
    assert (
        torch.count_nonzero(layer.adapter_up.weight) == 0 and torch.count_nonzero(layer.adapter_up.bias) == 0
    )
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(layer(x), base(x))  # identity at init
    with torch.no_grad():
        layer.adapter_up.weight.normal_()
        layer.adapter_up.bias.normal_()
    h = x @ base.weight.T + base.bias
    out = layer(x)
    assert out.shape == (2, 5, 10)
    torch.testing.assert_close(out, adapter_formula(layer, h, activation), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, h)


def test_layer_matches_formula_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(12, 8)  # GPT-2 layout: weight (in=8, out=12)
    layer = BottleneckAdapterLayer(base, bottleneck_size=4, activation="relu")
    assert layer.features == 12 and layer.adapter_down.weight.shape == (4, 12)
    with torch.no_grad():
        layer.adapter_up.weight.normal_()
        layer.adapter_up.bias.normal_()
    x = torch.randn(3, 8)
    h = x @ base.weight + base.bias
    torch.testing.assert_close(layer(x), adapter_formula(layer, h, "relu"), atol=1e-5, rtol=1e-5)


def test_adapter_sits_before_residual_and_layernorm() -> None:
    """In BERT layer 0 the input of the FFN's LayerNorm is dense(x) + residual; with the adapter it must be
    adapter(dense(x)) + residual, i.e. the difference is exactly W_up·act(W_down·h + b_down) + b_up."""
    base, adapted = tiny_bert(), tiny_bert()
    apply_peft(adapted, Adapter(bottleneck_size=4))
    randomize_adapters(adapted)
    captured: dict[str, torch.Tensor] = {}

    def keep(key: str) -> Callable[..., None]:
        return lambda _m, args, out=None: captured.__setitem__(key, (out if out is not None else args[0]))

    layer0 = "bert.encoder.layer.0.output"
    base.get_submodule(f"{layer0}.LayerNorm").register_forward_pre_hook(keep("ln_base"))
    adapted.get_submodule(f"{layer0}.LayerNorm").register_forward_pre_hook(keep("ln_adapted"))
    adapted.get_submodule(f"{layer0}.dense.base_layer").register_forward_hook(keep("h"))
    batch = tiny_batch("bert")
    model_output(base, batch)
    model_output(adapted, batch)
    wrapper = adapted.get_submodule(f"{layer0}.dense")
    h = captured["h"]
    expected = adapter_formula(wrapper, h, "relu") - h
    torch.testing.assert_close(captured["ln_adapted"] - captured["ln_base"], expected, atol=1e-5, rtol=1e-4)
    assert expected.abs().max() > 1e-2


# -- placement --------------------------------------------------------------------------------------------
EXPECTED_TARGETS = {
    ("bert", "pfeiffer"): ["bert.encoder.layer.{i}.output.dense"],
    ("bert", "houlsby"): [
        "bert.encoder.layer.{i}.attention.output.dense",
        "bert.encoder.layer.{i}.output.dense",
    ],
    ("gpt2", "pfeiffer"): ["transformer.h.{i}.mlp.c_proj"],
    ("gpt2", "houlsby"): ["transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"],
    ("llama", "pfeiffer"): ["model.layers.{i}.mlp.down_proj"],
    ("llama", "houlsby"): ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"],
}
EXPECTED_NORMS = {
    "bert": ["bert.encoder.layer.{i}.attention.output.LayerNorm", "bert.encoder.layer.{i}.output.LayerNorm"],
    "gpt2": ["transformer.h.{i}.ln_1", "transformer.h.{i}.ln_2"],
    "llama": ["model.layers.{i}.input_layernorm", "model.layers.{i}.post_attention_layernorm"],
}


@pytest.mark.parametrize(("kind", "placement"), sorted(EXPECTED_TARGETS))
def test_default_placement_and_identity_at_init(kind: str, placement: str) -> None:
    model = TINY_MODELS[kind]()
    batch = tiny_batch(kind)
    before = model_output(model, batch)
    apply_peft(model, Adapter(placement=placement))
    expected = sorted(t.format(i=i) for i in range(2) for t in EXPECTED_TARGETS[kind, placement])
    assert sorted(wrapped_names(model)) == expected
    torch.testing.assert_close(model_output(model, batch), before, rtol=0, atol=0)
    trainable = set(trainable_parameter_names(model))
    adapters = {f"{t}.{p}" for t in expected for p in ("adapter_down.weight", "adapter_down.bias")}
    adapters |= {f"{t}.{p}" for t in expected for p in ("adapter_up.weight", "adapter_up.bias")}
    norms = {
        f"{n.format(i=i)}.{local}"
        for i in range(2)
        for n in EXPECTED_NORMS[kind]
        for local in ("weight", "bias")
        if f"{n.format(i=i)}.{local}" in dict(model.named_parameters())
    }
    assert trainable == (adapters | norms if placement == "houlsby" else adapters)
    for name, param in model.named_parameters():
        assert param.requires_grad == (name in trainable), name


def test_train_layernorms_overrides_placement_default() -> None:
    model = tiny_bert()
    apply_peft(model, Adapter(placement="houlsby", train_layernorms=False))
    assert not [n for n in trainable_parameter_names(model) if "LayerNorm" in n]
    model = tiny_bert()
    apply_peft(model, Adapter(placement="pfeiffer", train_layernorms=True))
    norms = [n for n in trainable_parameter_names(model) if "LayerNorm" in n]
    # the blocks' norms, never the embeddings' LayerNorm, which lies outside every block
    assert len(norms) == 8 and not [n for n in norms if "embeddings" in n]


def test_custom_targets_and_errors_leave_model_unchanged() -> None:
    model = MLP()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"no default placement for model_type=None; pass target_modules"):
        apply_peft(model, Adapter())
    with pytest.raises(TypeError, match=r"matched 'act' of type ReLU"):
        apply_peft(model, Adapter(target_modules=["act"]))
    with pytest.raises(ValueError, match=r"reduction_factor=64 leaves no bottleneck for 'fc2'.* 16 features"):
        apply_peft(model, Adapter(target_modules=["fc2"], reduction_factor=64))
    with pytest.raises(ValueError, match=r"matched no module"):
        apply_peft(model, Adapter(target_modules=["fc9"]))
    assert not is_attached(model) and not wrapped_names(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    apply_peft(model, Adapter(target_modules=["fc1", "fc2"], bottleneck_size=3))
    assert wrapped_names(model) == ["fc1", "fc2"]


def test_linear_like_module_with_out_features() -> None:
    class Projection(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out_features = 6
            self.weight = nn.Parameter(torch.randn(6, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.T

    model = nn.Sequential(Projection(), nn.Tanh())
    apply_peft(model, Adapter(target_modules=["0"], bottleneck_size=2))
    layer = model.get_submodule("0")
    assert isinstance(layer, BottleneckAdapterLayer) and layer.features == 6
    assert model(torch.randn(3, 4)).shape == (3, 6)


# -- training, save/load, merge, combination --------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "placement"), [("bert", "houlsby"), ("gpt2", "pfeiffer"), ("llama", "houlsby")]
)
def test_training_changes_only_adapter_params(tmp_path: Path, kind: str, placement: str) -> None:
    module = HFModule(kind)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = fast_trainer(tmp_path, callbacks=[PEFTCallback(Adapter(placement=placement), verbose=False)])
    trainer.fit(module, hf_loader(kind))
    trainable = set(trainable_parameter_names(module))
    changed, new = set(), set()
    for name, param in module.named_parameters():
        key = name.replace(".base_layer", "")
        if key not in before:
            new.add(name)
        elif not torch.equal(before[key], param):
            changed.add(name)
    assert new and all(".adapter_" in n for n in new)
    norms = {n for n in trainable if "norm" in n.lower() or ".ln_" in n}
    assert bool(norms) == (placement == "houlsby")
    # every adapter tensor and every trained norm moved; the base model is bit-identical
    assert changed | new == trainable
    # an adapter-only Lightning checkpoint rebuilds the same model
    trainer.save_checkpoint(tmp_path / "adapter.ckpt")
    saved = torch.load(tmp_path / "adapter.ckpt", weights_only=False)["state_dict"]
    assert set(saved) == trainable
    restored = load_peft_checkpoint(HFModule, tmp_path / "adapter.ckpt")
    batch = tiny_batch(kind)
    torch.testing.assert_close(model_output(restored.model, batch), model_output(module.eval().model, batch))


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = tiny_bert()
    apply_peft(model, Adapter(placement="houlsby", bottleneck_size=4, activation="gelu"))
    randomize_adapters(model)
    with torch.no_grad():
        model.bert.encoder.layer[1].output.LayerNorm.weight.mul_(1.5)
    batch = tiny_batch("bert")
    expected = model_output(model, batch)
    save_adapter(model, tmp_path / "adapter")
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.bert.encoder.layer.0.output.dense.adapter_up.weight" in keys
    assert "base_model.model.bert.encoder.layer.1.output.LayerNorm.weight" in keys
    assert not [k for k in keys if "base_layer" in k or "query" in k]
    fresh = tiny_bert()
    base_out = model_output(fresh, batch)
    load_adapter(fresh, tmp_path / "adapter")
    assert not torch.allclose(base_out, expected)
    torch.testing.assert_close(model_output(fresh, batch), expected, rtol=0, atol=0)


def test_merge_raises_and_leaves_model_unchanged() -> None:
    model = tiny_bert()
    apply_peft(model, Adapter(bottleneck_size=4))
    randomize_adapters(model)
    batch = tiny_batch("bert")
    expected = model_output(model, batch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="BottleneckAdapterLayer cannot be merged"):
        merge_and_unload(model)
    assert is_attached(model) and len(wrapped_names(model)) == 2
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model_output(model, batch), expected, rtol=0, atol=0)
    # taking the adapter out (without merging) gives back the original model
    remove_peft(model)
    assert isinstance(model.bert.encoder.layer[0].output.dense, nn.Linear)
    torch.testing.assert_close(model_output(model, batch), model_output(tiny_bert(), batch), rtol=0, atol=0)


def test_conflict_with_lora_on_same_layer() -> None:
    model = tiny_bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"LoRA and Adapter both target module 'bert.encoder.layer.0.output.dense'"
    ):
        apply_peft(model, [LoRA(target_modules=["dense"]), Adapter()])
    assert not is_attached(model) and not wrapped_names(model)
    assert all(p.requires_grad for p in model.parameters())
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_combines_with_lora_on_other_layers(tmp_path: Path) -> None:
    model = tiny_bert()
    apply_peft(model, [LoRA(r=2, target_modules=["query", "value"]), Adapter(bottleneck_size=4)])
    randomize_adapters(model)
    names = wrapped_names(model)
    assert sum(".output.dense" in n for n in names) == 2 and sum("query" in n for n in names) == 2
    batch = tiny_batch("bert")
    expected = model_output(model, batch)
    assert not torch.allclose(expected, model_output(tiny_bert(), batch))
    save_adapter(model, tmp_path / "both")
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path / "both")
    torch.testing.assert_close(model_output(fresh, batch), expected, rtol=0, atol=0)


# -- the real MiniLM ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "expected"),
    [
        (Adapter(placement="pfeiffer", bottleneck_size=24), 113_040),
        (Adapter(placement="houlsby", bottleneck_size=24), 226_080),
        (Adapter(placement="houlsby"), 226_080),  # 384 // 16 = 24
    ],
)
def test_minilm_counts(minilm: nn.Module, method: Adapter, expected: int) -> None:
    # per adapter: 384·24 + 24 + 24·384 + 384 = 18,840
    input_ids = torch.tensor([[101, 7592, 2088, 2003, 2204, 102]])
    before = minilm(input_ids=input_ids).logits.detach()
    apply_peft(minilm, method)
    try:
        params = dict(minilm.named_parameters())
        names = trainable_parameter_names(minilm)
        adapter_count = sum(params[n].numel() for n in names if ".adapter_" in n)
        assert adapter_count == expected
        norms = [n for n in names if "LayerNorm" in n]
        assert len(norms) == (24 if method.placement == "houlsby" else 0)  # 6 blocks × 2 norms × (γ, β)
        torch.testing.assert_close(minilm(input_ids=input_ids).logits.detach(), before, rtol=0, atol=0)
    finally:
        remove_peft(minilm)
