"""LoRA numerics: the formula, HF PEFT as oracle, merge/unmerge, save/load and targeting."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import MLP, model_output, tiny_batch, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from lightning_peft import (
    LoRA,
    apply_peft,
    load_adapter,
    merge_adapter,
    merge_and_unload,
    save_adapter,
    trainable_parameter_names,
    unmerge_adapter,
)
from lightning_peft.methods.lora import LoRALinear
from lightning_peft.ops.parameters import peft_layers


def randomize_lora(model: nn.Module, seed: int = 0) -> None:
    """B starts at zero, which would hide bugs; give every LoRA tensor random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in peft_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_formula(use_rslora: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=3, alpha=4.0, dropout=0.0, use_rslora=use_rslora)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 7, 6)
    scale = 4.0 / math.sqrt(3) if use_rslora else 4.0 / 3
    expected = x @ base.weight.T + base.bias + scale * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)


def test_init_is_identity_and_kaiming() -> None:
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = LoRALinear(base, r=8, alpha=16, dropout=0.0, use_rslora=False)
    assert torch.count_nonzero(layer.lora_B) == 0
    # kaiming_uniform(a=sqrt(5)) on a (r, in) matrix: U(-1/sqrt(in), 1/sqrt(in))
    bound = 1 / math.sqrt(64)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), base(x))


def test_dropout_applies_only_to_lora_branch() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = LoRALinear(base, r=2, alpha=2, dropout=0.5, use_rslora=False).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 8)
    out1, out2 = layer(x), layer(x)
    assert not torch.allclose(out1, out2)  # dropout is active in training
    layer.eval()
    expected = base(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_outputs_unchanged_at_init(kind: str) -> None:
    model = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}[kind]()
    batch = tiny_batch(kind)
    before = model_output(model, batch)
    apply_peft(model, LoRA(r=4))
    torch.testing.assert_close(model_output(model, batch), before)


def _copy_into_peft(ours: nn.Module, theirs: nn.Module) -> None:
    their_params = dict(theirs.named_parameters())
    for name, layer in peft_layers(ours):
        their_params[f"base_model.model.{name}.lora_A.default.weight"].data.copy_(layer.lora_A)
        their_params[f"base_model.model.{name}.lora_B.default.weight"].data.copy_(layer.lora_B)


@pytest.mark.parametrize(
    ("kind", "targets", "use_rslora"),
    [("bert", ["query", "value"], False), ("bert", ["query", "value"], True), ("gpt2", ["c_attn"], False)],
)
def test_matches_hf_peft(kind: str, targets: list[str], use_rslora: bool) -> None:
    peft = pytest.importorskip("peft")
    factory = {"bert": tiny_bert, "gpt2": tiny_gpt2}[kind]
    ours, theirs_base = factory(), factory()
    apply_peft(ours, LoRA(r=4, alpha=8, target_modules=targets, use_rslora=use_rslora))
    randomize_lora(ours)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_rslora=use_rslora, lora_dropout=0.0
    )
    theirs = peft.get_peft_model(theirs_base, config)
    _copy_into_peft(ours, theirs)
    batch = tiny_batch(kind)
    torch.testing.assert_close(model_output(ours, batch), model_output(theirs, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_merge_unmerge_and_unload(kind: str) -> None:
    model = {"bert": tiny_bert, "gpt2": tiny_gpt2}[kind]()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    apply_peft(model, LoRA(r=4, target_modules="all-linear"))
    randomize_lora(model)
    batch = tiny_batch(kind)
    unmerged = model_output(model, batch)
    merge_adapter(model)
    torch.testing.assert_close(model_output(model, batch), unmerged, atol=1e-5, rtol=0)
    merged_state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="already merged"):
        merge_adapter(model)
    assert all(torch.equal(merged_state[k], v) for k, v in model.state_dict().items())
    unmerge_adapter(model)
    for name, layer in peft_layers(model):
        original = base_weights[f"{name}.weight"]
        torch.testing.assert_close(layer.base_layer.weight, original, atol=1e-6, rtol=0)
    plain = merge_and_unload(model)
    assert not any(True for _ in peft_layers(plain))
    assert set(plain.state_dict()) == set(base_weights)
    torch.testing.assert_close(model_output(plain, batch), unmerged, atol=1e-5, rtol=0)
    assert not hasattr(plain, "_lightning_peft_methods")


def test_merge_and_unload_restores_module_types() -> None:
    model = tiny_gpt2()
    types = {n: type(m) for n, m in model.named_modules()}
    apply_peft(model, LoRA(r=2, target_modules=["c_attn", "c_fc"]))
    merge_and_unload(model)
    assert {n: type(m) for n, m in model.named_modules()} == types


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = tiny_bert()
    apply_peft(model, LoRA(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    randomize_lora(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path)
    batch = tiny_batch("bert")
    torch.testing.assert_close(model_output(fresh, batch), model_output(model, batch), atol=0, rtol=0)
    assert trainable_parameter_names(fresh) == trainable_parameter_names(model)


def test_hf_peft_loads_our_adapter_and_we_load_theirs(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = tiny_bert()
    apply_peft(model, LoRA(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    randomize_lora(model)
    save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "ours"))
    batch = tiny_batch("bert")
    torch.testing.assert_close(model_output(theirs, batch), model_output(model, batch), atol=1e-6, rtol=0)
    # and the other way: a folder written by peft loads here
    theirs.save_pretrained(str(tmp_path / "theirs"))
    mine = tiny_bert()
    load_adapter(mine, tmp_path / "theirs")
    torch.testing.assert_close(model_output(mine, batch), model_output(model, batch), atol=1e-6, rtol=0)


def test_targeting_forms() -> None:
    def targets(model: nn.Module, **kwargs: object) -> list[str]:
        return LoRA(**kwargs).plan(model)  # type: ignore[arg-type]

    bert = tiny_bert()
    assert targets(bert, target_modules=["query"]) == [
        f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)
    ]
    assert targets(bert, target_modules=["layer.0.attention.self.query"]) == [
        "bert.encoder.layer.0.attention.self.query"
    ]
    assert targets(bert, target_modules=r".*layer\.1\.attention\.self\.(key|value)") == [
        "bert.encoder.layer.1.attention.self.key",
        "bert.encoder.layer.1.attention.self.value",
    ]
    assert targets(bert, target_modules=["query", "key"], exclude_modules=["layer.0.attention.self.key"]) == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.key",
    ]
    all_linear = targets(bert, target_modules="all-linear")
    assert "classifier" not in all_linear and "bert.pooler.dense" not in all_linear
    assert len(all_linear) == 2 * 6  # q, k, v, attention.output.dense, intermediate.dense, output.dense
    gpt2_all = targets(tiny_gpt2(), target_modules="all-linear")
    assert "lm_head" not in gpt2_all and len(gpt2_all) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    # architecture defaults
    assert [n.rsplit(".", 1)[-1] for n in targets(tiny_llama())] == ["q_proj", "v_proj"] * 2


def test_plain_module_and_bias_modes() -> None:
    torch.manual_seed(0)
    mlp = MLP()
    apply_peft(mlp, LoRA(r=2, target_modules=["fc1", "fc2"], bias="lora_only", modules_to_save=["head"]))
    names = trainable_parameter_names(mlp)
    assert names == [
        "fc1.lora_A",
        "fc1.lora_B",
        "fc1.base_layer.bias",
        "fc2.lora_A",
        "fc2.lora_B",
        "fc2.base_layer.bias",
        "head.weight",
        "head.bias",
    ]
    assert {n for n, p in mlp.named_parameters() if p.requires_grad} == set(names)
    other = MLP()
    apply_peft(other, LoRA(r=2, target_modules=["fc1"], bias="all"))
    assert {n for n, p in other.named_parameters() if p.requires_grad} == {
        "fc1.base_layer.bias",
        "fc1.lora_A",
        "fc1.lora_B",
        "fc2.bias",
        "head.bias",
    }
