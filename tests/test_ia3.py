"""(IA)^3: configuration and defaults, the formula, HF PEFT parity, merge, save/load, gradients and training."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    MLP,
    HFModule,
    fast_trainer,
    hf_loader,
    model_output,
    peft_loads_our_folder,
    snapshot,
    tiny_batch,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    with_biases,
)
from torch import nn

from lightning_peft import PEFTCallback
from lightning_peft.files.load import load_adapter
from lightning_peft.files.save import save_adapter
from lightning_peft.methods import IA3
from lightning_peft.methods.ia3 import IA3Layer
from lightning_peft.ops.attach import apply_peft
from lightning_peft.ops.merging import merge_adapter, merge_and_unload, unmerge_adapter
from lightning_peft.ops.parameters import trainable_parameter_names
from lightning_peft.ops.state_dict import adapter_state_dict

peft = pytest.importorskip("peft")


MODELS = {"bert": with_biases(tiny_bert), "gpt2": with_biases(tiny_gpt2), "llama": tiny_llama}
#: HF PEFT configs equal to our defaults (BERT: peft's "output.dense" also hits attention.output.dense)
PEFT_EQUIVALENT = {
    "bert": dict(
        target_modules=["key", "value", "output.dense"],
        feedforward_modules=["output.dense"],
        exclude_modules=["attention.output.dense"],
    ),
    "gpt2": {},
    "llama": {},
}


def layers(model: nn.Module) -> dict[str, IA3Layer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Layer)}


def randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model).values():
            layer.ia3_l.copy_(1 + 0.3 * torch.randn(layer.ia3_l.shape, generator=g))


def copy_to_peft(ours: nn.Module, theirs: nn.Module) -> None:
    peft_params = dict(theirs.named_parameters())
    state = adapter_state_dict(ours)
    for name, tensor in state.items():
        with torch.no_grad():
            peft_params[f"base_model.model.{name}.default"].copy_(tensor)
    assert len(state) == sum(1 for n in peft_params if "ia3_l" in n)


def peft_model(kind: str, **kwargs: object) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(MODELS[kind](), peft.IA3Config(**kwargs))


# -- configuration and targets -------------------------------------------------------------------------------
def test_config_validation() -> None:
    with pytest.raises(TypeError, match="target_modules must be a list of strings, got 5"):
        IA3(target_modules=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="feedforward_modules must be a list of strings, got \\[1\\]"):
        IA3(feedforward_modules=[1])  # type: ignore[list-item]
    assert IA3(target_modules=("key",)).target_modules == ["key"]


def test_plan_errors_leave_model_untouched() -> None:
    model = MODELS["bert"]()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"matched no module.*Candidate layer names: \['self.query'"):
        apply_peft(model, IA3(target_modules=["kee"]))
    with pytest.raises(TypeError, match="'bert.embeddings.LayerNorm' of type LayerNorm"):
        apply_peft(model, IA3(target_modules=["key", "embeddings.LayerNorm"]))
    with pytest.raises(
        ValueError, match="feedforward_modules entry 'intermediate.dense' matches none of the IA3"
    ):
        apply_peft(model, IA3(target_modules=["key", "value"], feedforward_modules=["intermediate.dense"]))
    with pytest.raises(ValueError, match="no default targets for model_type=None"):
        apply_peft(MLP(), IA3())
    assert not layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("bert", {"attention.self.key": False, "attention.self.value": False, "output.dense": True}),
        ("gpt2", {"attn.c_attn": False, "mlp.c_proj": True}),
        ("llama", {"self_attn.k_proj": False, "self_attn.v_proj": False, "mlp.down_proj": True}),
    ],
)
def test_default_targets(kind: str, expected: dict[str, bool]) -> None:
    model = MODELS[kind]()
    apply_peft(model, IA3())
    found = layers(model)
    prefix = {"bert": "bert.encoder.layer", "gpt2": "transformer.h", "llama": "model.layers"}[kind]
    want = {f"{prefix}.{i}.{suffix}": ff for i in range(2) for suffix, ff in expected.items()}
    assert {n: m.is_feedforward for n, m in found.items()} == want
    for layer in found.values():
        shape = (1, layer.in_features) if layer.is_feedforward else (layer.out_features, 1)
        assert tuple(layer.ia3_l.shape) == shape and torch.equal(layer.ia3_l, torch.ones(shape))


# -- numerics ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_outputs_unchanged_at_init(kind: str) -> None:
    model = MODELS[kind]()
    batch = tiny_batch(kind)
    expected = model_output(model, batch)
    apply_peft(model, IA3())
    torch.testing.assert_close(model_output(model, batch), expected, atol=0, rtol=0)


def test_plain_module_matches_formula() -> None:
    torch.manual_seed(0)
    net = MLP()
    apply_peft(net, IA3(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]))
    randomize(net)
    x = torch.randn(5, 8)
    l1, l2 = net.fc1.ia3_l.view(-1), net.fc2.ia3_l.view(-1)
    w1, b1 = net.fc1.base_layer.weight, net.fc1.base_layer.bias
    w2, b2 = net.fc2.base_layer.weight, net.fc2.base_layer.bias
    h = torch.relu(l1 * (x @ w1.T + b1))  # output side: l ⊙ (W x + b)
    h = torch.relu((l2 * h) @ w2.T + b2)  # feed-forward: W (l ⊙ x) + b
    expected = F.linear(h, net.head.weight, net.head.bias)
    torch.testing.assert_close(net(x), expected, atol=1e-6, rtol=1e-6)


def test_conv1d_matches_formula() -> None:
    model = MODELS["gpt2"]()
    apply_peft(model, IA3())
    randomize(model)
    attn, mlp = model.transformer.h[0].attn.c_attn, model.transformer.h[0].mlp.c_proj
    x = torch.randn(2, 3, 32)
    # Conv1D computes x @ W + b with W stored (in, out)
    want = attn.ia3_l.view(-1) * (x @ attn.base_layer.weight + attn.base_layer.bias)
    torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)
    h = torch.randn(2, 3, 128)
    want = (mlp.ia3_l.view(-1) * h) @ mlp.base_layer.weight + mlp.base_layer.bias
    torch.testing.assert_close(mlp(h), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_matches_peft(kind: str) -> None:
    ours = MODELS[kind]()
    apply_peft(ours, IA3())
    randomize(ours)
    theirs = peft_model(kind, **PEFT_EQUIVALENT[kind])
    copy_to_peft(ours, theirs)
    batch = tiny_batch(kind)
    torch.testing.assert_close(model_output(ours, batch), model_output(theirs, batch), atol=1e-5, rtol=0)


# -- merge ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_merge_unmerge_and_unload(kind: str) -> None:
    model = MODELS[kind]()
    apply_peft(model, IA3())
    randomize(model)
    batch = tiny_batch(kind)
    found = layers(model)
    base = {
        n: (m.base_layer.weight.detach().clone(), m.base_layer.bias.detach().clone())
        for n, m in found.items()
    }
    expected = model_output(model, batch)
    merge_adapter(model)
    torch.testing.assert_close(model_output(model, batch), expected, atol=1e-5, rtol=0)
    for name, layer in found.items():
        # output-side layers fold l into the bias too; feed-forward ones leave it alone
        assert torch.equal(layer.base_layer.bias, base[name][1]) == layer.is_feedforward
    unmerge_adapter(model)
    for name, layer in found.items():
        torch.testing.assert_close(layer.base_layer.weight, base[name][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.base_layer.bias, base[name][1], atol=1e-5, rtol=0)
    base_type = type(next(iter(found.values())).base_layer)
    merge_and_unload(model)
    assert not layers(model)
    assert all(type(model.get_submodule(n)) is base_type for n in found)
    torch.testing.assert_close(model_output(model, batch), expected, atol=1e-5, rtol=0)


def test_unmerge_is_exact_with_a_zero_scale() -> None:
    torch.manual_seed(0)
    layer = IA3Layer(nn.Linear(4, 3), is_feedforward=False)
    with torch.no_grad():
        layer.ia3_l[1] = 0.0
    weight, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    x = torch.randn(2, 4)
    expected = layer(x)
    with torch.no_grad():
        layer.merge()
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, weight) and torch.equal(layer.base_layer.bias, bias)


# -- files ---------------------------------------------------------------------------------------------------
def test_save_load_roundtrip_on_fresh_base(tmp_path: Path) -> None:
    model = MODELS["bert"]()
    apply_peft(model, IA3(modules_to_save=["classifier"]))
    randomize(model)
    batch = tiny_batch("bert")
    expected = model_output(model, batch)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    # our default skips attention.output.dense, so PEFT gets explicit module paths
    assert "bert.encoder.layer.1.output.dense" in config["feedforward_modules"]
    assert set(config["feedforward_modules"]) <= set(config["target_modules"])
    fresh = load_adapter(MODELS["bert"](), tmp_path)
    torch.testing.assert_close(model_output(fresh, batch), expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("kind", "head", "task_type"),
    [("bert", True, "SEQ_CLS"), ("bert", False, None), ("gpt2", False, "CAUSAL_LM")],
)
def test_peft_loads_our_folder(tmp_path: Path, kind: str, head: bool, task_type: str | None) -> None:
    # without the trained head in the file, SEQ_CLS would make PEFT look for it: no task_type then
    model = MODELS[kind]()
    apply_peft(model, IA3(modules_to_save=["classifier"] if head else []))
    randomize(model)
    loaded = peft_loads_our_folder(model, MODELS[kind](), tmp_path, kind, head, task_type)
    assert sum(1 for n, _ in loaded.named_parameters() if "ia3_l" in n) == len(layers(model))


def test_we_load_a_peft_ia3_folder(tmp_path: Path) -> None:
    # peft's own BERT default: "output.dense" is feed-forward and also matches attention.output.dense
    theirs = peft_model("bert")
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.3 * torch.randn_like(param))
    theirs.save_pretrained(str(tmp_path))
    loaded = load_adapter(MODELS["bert"](), tmp_path)
    assert len(layers(loaded)) == 8
    batch = tiny_batch("bert")
    torch.testing.assert_close(model_output(loaded, batch), model_output(theirs, batch), atol=1e-5, rtol=0)


def test_peft_config_interop() -> None:
    assert IA3.from_peft_config({"peft_type": "LORA"}) is None
    method = IA3.from_peft_config(
        {
            "peft_type": "IA3",
            "target_modules": ["k", "wo"],
            "feedforward_modules": ["wo"],
            "modules_to_save": None,
        }
    )
    assert method == IA3(target_modules=["k", "wo"], feedforward_modules=["wo"])
    # an init-only option never blocks a load
    assert IA3.from_peft_config(
        {"peft_type": "IA3", "init_ia3_weights": False, "target_modules": ["k"]}
    ) == IA3(target_modules=["k"], feedforward_modules=[])
    model = MODELS["gpt2"]()
    method = IA3()
    apply_peft(model, method)
    config = method.peft_config(model)
    assert config["target_modules"] == ["c_attn", "mlp.c_proj"] and config["feedforward_modules"] == [
        "mlp.c_proj"
    ]
    assert config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"


# -- gradients and training ----------------------------------------------------------------------------------
def test_one_step_changes_only_adapter_params() -> None:
    model = MODELS["bert"]()
    apply_peft(model, IA3())
    trainable = set(trainable_parameter_names(model))
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("ia3_l") for n in trainable)
    before = snapshot(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**tiny_batch("bert")).loss.backward()
    optimizer.step()
    after = model.state_dict()
    for name, value in before.items():
        assert (not torch.equal(value, after[name])) == (name in trainable), name


def test_training_with_callback(tmp_path: Path) -> None:
    module = HFModule("bert", lr=1e-2)
    before = snapshot(module)
    trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=[PEFTCallback(IA3(), verbose=False)])
    trainer.fit(module, train_dataloaders=hf_loader("bert"))
    found = layers(module)
    assert len(found) == 6 and all(not torch.equal(m.ia3_l, torch.ones_like(m.ia3_l)) for m in found.values())
    after = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if "ia3_l" not in k}
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


# -- the real model ------------------------------------------------------------------------------------------
def test_minilm_trainable_count(minilm: nn.Module) -> None:
    model = copy.deepcopy(minilm)
    counts = apply_peft(model, IA3())
    # 6 layers × (key 384 + value 384 + FFN output.dense input 1536); attention.output.dense is not a target
    assert counts.trainable == 13_824 == 6 * (384 + 384 + 1536)
