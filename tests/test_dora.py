"""DoRA: configuration, the formula, HF PEFT parity, merge, save/load, gradients and training."""

from __future__ import annotations

import copy
import json
import math
import re
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
    with_biases,
)
from torch import nn

from lightning_peft import PEFTCallback
from lightning_peft.files.load import load_adapter
from lightning_peft.files.save import save_adapter
from lightning_peft.methods import DoRA, LoRA
from lightning_peft.methods.dora import DoRALinear
from lightning_peft.ops.attach import apply_peft
from lightning_peft.ops.merging import merge_adapter, merge_and_unload, unmerge_adapter
from lightning_peft.ops.parameters import count_parameters, trainable_parameter_names
from lightning_peft.ops.state_dict import adapter_state_dict

peft = pytest.importorskip("peft")

PEFT_SUFFIX = {
    "lora_A": "lora_A.default.weight",
    "lora_B": "lora_B.default.weight",
    "lora_magnitude_vector": "lora_magnitude_vector.default.weight",
}
TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"]}


MODELS = {"bert": with_biases(tiny_bert), "gpt2": with_biases(tiny_gpt2)}


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial adapter values: random A, B and a magnitude that differs from ‖W + s·B A‖."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DoRALinear):
                module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=g) * 0.3)
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.3)
                noise = 1 + 0.2 * torch.randn(module.out_features, generator=g)
                module.lora_magnitude_vector.copy_(module.weight_norm() * noise)


def copy_to_peft(ours: nn.Module, theirs: nn.Module) -> None:
    """Copy our adapter tensors into the same places of an HF PEFT model (direct name mapping, no file I/O)."""
    peft_params = dict(theirs.named_parameters())
    copied = 0
    for name, tensor in adapter_state_dict(ours).items():
        prefix, _, local = name.rpartition(".")
        peft_name = f"base_model.model.{prefix}.{PEFT_SUFFIX[local]}"
        with torch.no_grad():
            peft_params[peft_name].copy_(tensor)
        copied += 1
    assert copied == sum(1 for n in peft_params if "lora_" in n)


def peft_model(kind: str, **kwargs: object) -> nn.Module:
    config = peft.LoraConfig(target_modules=TARGETS[kind], use_dora=True, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(MODELS[kind](), config)


# -- configuration -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"alpha": -1.0}, "alpha must be a positive number, got -1.0"),
        ({"dropout": 1.0}, "dropout must be a float in [0, 1), got 1.0"),
        ({"bias": "some"}, "bias must be one of 'none', 'all', 'lora_only', got 'some'"),
    ],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        DoRA(**kwargs)


def test_target_errors_leave_model_untouched() -> None:
    model = MODELS["bert"]()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"matched no module.*Candidate layer names: \['self.query'"):
        apply_peft(model, DoRA(target_modules=["qwery"]))
    with pytest.raises(TypeError, match="'bert.embeddings.word_embeddings' of type Embedding"):
        apply_peft(model, DoRA(target_modules=["query", "word_embeddings"]))
    assert not any(isinstance(m, DoRALinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no default targets for model_type=None"):
        apply_peft(MLP(), DoRA())


def test_is_a_lora_subclass_with_its_own_name() -> None:
    method = DoRA(r=4, target_modules=["query"])
    assert isinstance(method, LoRA) and method.to_dict()["method"] == "dora"
    layer = DoRALinear(nn.Linear(3, 5), r=2, alpha=4.0, dropout=0.0, use_rslora=False)
    assert sorted(layer.peft_parameter_names()) == ["lora_A", "lora_B", "lora_magnitude_vector"]
    assert (
        layer.peft_key("a.query", "lora_magnitude_vector") == "base_model.model.a.query.lora_magnitude_vector"
    )


# -- numerics ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_outputs_unchanged_at_init(kind: str) -> None:
    model = MODELS[kind]()
    batch = tiny_batch(kind)
    expected = model_output(model, batch)
    apply_peft(model, DoRA(r=4, target_modules=TARGETS[kind]))
    torch.testing.assert_close(model_output(model, batch), expected, atol=1e-6, rtol=0)


def reference_weight(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, s: float
) -> torch.Tensor:
    """W' = m · (W + s·B A) / ‖W + s·B A‖ (row norms), written directly from the paper."""
    combined = weight + s * b @ a
    return m[:, None] * combined / combined.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_linear_matches_formula(use_rslora: bool) -> None:
    torch.manual_seed(0)
    net = MLP()
    apply_peft(net, DoRA(r=3, alpha=5.0, target_modules=["fc1", "fc2"], use_rslora=use_rslora))
    randomize(net)
    layer = net.fc2
    assert layer.scaling == pytest.approx(5.0 / math.sqrt(3) if use_rslora else 5.0 / 3)
    x = torch.randn(7, 16)
    w = reference_weight(
        layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector, layer.scaling
    )
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.base_layer.bias), atol=1e-5, rtol=1e-5)


def test_conv1d_matches_formula() -> None:
    model = MODELS["gpt2"]()
    apply_peft(model, DoRA(r=4, target_modules=["c_attn"]))
    randomize(model)
    layer = model.transformer.h[0].attn.c_attn
    w = reference_weight(
        layer.base_layer.weight.T, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector, layer.scaling
    )
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.base_layer.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kind", "use_rslora"), [("bert", False), ("bert", True), ("gpt2", False)])
def test_matches_peft(kind: str, use_rslora: bool) -> None:
    ours = MODELS[kind]()
    apply_peft(ours, DoRA(r=4, alpha=8.0, target_modules=TARGETS[kind], use_rslora=use_rslora))
    randomize(ours)
    theirs = peft_model(kind, r=4, lora_alpha=8, use_rslora=use_rslora)
    copy_to_peft(ours, theirs)
    batch = tiny_batch(kind)
    torch.testing.assert_close(model_output(ours, batch), model_output(theirs, batch), atol=1e-5, rtol=0)


def test_dropout_formulation_matches_peft_in_training() -> None:
    ours = MODELS["bert"]()
    apply_peft(ours, DoRA(r=4, alpha=8.0, dropout=0.3, target_modules=["query", "value"]))
    randomize(ours)
    theirs = peft_model("bert", r=4, lora_alpha=8, lora_dropout=0.3)
    copy_to_peft(ours, theirs)
    ours.train()
    theirs.train()
    inputs = {k: v for k, v in tiny_batch("bert").items() if k != "labels"}
    torch.manual_seed(3)
    ours_out = ours(**inputs).logits
    torch.manual_seed(3)
    theirs_out = theirs(**inputs).logits
    torch.testing.assert_close(ours_out, theirs_out, atol=1e-5, rtol=0)
    # dropout really acted: the eval-mode output differs
    assert not torch.allclose(ours_out, model_output(ours.eval(), tiny_batch("bert")), atol=1e-4)


# -- merge ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_merge_unmerge_and_unload(kind: str) -> None:
    model = MODELS[kind]()
    apply_peft(model, DoRA(r=4, target_modules=TARGETS[kind]))
    randomize(model)
    batch = tiny_batch(kind)
    base = {
        n: m.base_layer.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, DoRALinear)
    }
    expected = model_output(model, batch)
    merge_adapter(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DoRALinear)}
    assert all(m.merged for m in layers.values())
    assert not torch.allclose(next(iter(layers.values())).base_layer.weight, next(iter(base.values())))
    torch.testing.assert_close(model_output(model, batch), expected, atol=1e-5, rtol=0)
    unmerge_adapter(model)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, base[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(model_output(model, batch), expected, atol=1e-5, rtol=0)
    base_type = type(next(iter(layers.values())).base_layer)
    merge_and_unload(model)
    assert not any(isinstance(m, DoRALinear) for m in model.modules())
    assert all(type(model.get_submodule(n)) is base_type for n in layers)
    torch.testing.assert_close(model_output(model, batch), expected, atol=1e-5, rtol=0)


def test_unmerge_is_exact_when_a_magnitude_is_zero() -> None:
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(6, 4), r=2, alpha=2.0, dropout=0.0, use_rslora=False)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude_vector[1] = 0.0
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 6)
    expected = layer(x)
    with torch.no_grad():
        layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


# -- files ---------------------------------------------------------------------------------------------------
def test_save_load_roundtrip_on_fresh_base(tmp_path: Path) -> None:
    model = MODELS["bert"]()
    apply_peft(model, DoRA(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    randomize(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    batch = tiny_batch("bert")
    expected = model_output(model, batch)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True and config["r"] == 4
    fresh = load_adapter(MODELS["bert"](), tmp_path)
    torch.testing.assert_close(model_output(fresh, batch), expected, atol=0, rtol=0)
    assert count_parameters(fresh).trainable == count_parameters(model).trainable


@pytest.mark.parametrize(
    ("kind", "head", "task_type"),
    [("bert", True, "SEQ_CLS"), ("bert", False, None), ("gpt2", False, "CAUSAL_LM")],
)
def test_peft_loads_our_folder(tmp_path: Path, kind: str, head: bool, task_type: str | None) -> None:
    # without the trained head in the file, SEQ_CLS would make PEFT look for it: no task_type then
    model = MODELS[kind]()
    saved = ["classifier"] if head else []
    apply_peft(model, DoRA(r=4, alpha=8.0, target_modules=TARGETS[kind], modules_to_save=saved))
    randomize(model)
    peft_loads_our_folder(model, MODELS[kind](), tmp_path, kind, head, task_type)


def test_we_load_a_peft_dora_folder(tmp_path: Path) -> None:
    # SEQ_CLS: peft saves the classifier and writes modules_to_save=["classifier", "score"]
    theirs = peft_model("bert", r=4, lora_alpha=8, task_type="SEQ_CLS")
    ours_ref = MODELS["bert"]()
    apply_peft(ours_ref, DoRA(r=4, alpha=8.0, target_modules=["query", "value"]))
    randomize(ours_ref, seed=5)
    copy_to_peft(ours_ref, theirs)
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    theirs.save_pretrained(str(tmp_path))
    batch = tiny_batch("bert")
    loaded = load_adapter(MODELS["bert"](), tmp_path)
    wrapped = [n for n, m in ours_ref.named_modules() if isinstance(m, DoRALinear)]
    assert all(isinstance(loaded.get_submodule(n), DoRALinear) for n in wrapped)
    assert "classifier.weight" in trainable_parameter_names(loaded)
    torch.testing.assert_close(model_output(loaded, batch), model_output(theirs, batch), atol=1e-5, rtol=0)


def test_peft_config_interop() -> None:
    assert DoRA.from_peft_config({"peft_type": "LORA", "use_dora": False, "r": 4}) is None
    assert DoRA.from_peft_config({"peft_type": "IA3"}) is None
    method = DoRA.from_peft_config(
        {
            "peft_type": "LORA",
            "use_dora": True,
            "r": 4,
            "lora_alpha": 32,
            "target_modules": ["q"],
            "bias": "all",
        }
    )
    assert method == DoRA(r=4, alpha=32.0, target_modules=["q"], bias="all")
    patterned = DoRA.from_peft_config({"peft_type": "LORA", "use_dora": True, "rank_pattern": {"q": 2}})
    assert patterned is not None and patterned.rank_pattern == {"q": 2}
    with pytest.raises(ValueError, match=r"target_parameters=\['w'\] is not supported"):
        DoRA.from_peft_config({"peft_type": "LORA", "use_dora": True, "target_parameters": ["w"]})
    # regexes and names peft cannot match become explicit module paths
    model = MODELS["bert"]()
    method = DoRA(r=2, target_modules=r".*layer\.0\.attention\.self\.(query|value)")
    apply_peft(model, method)
    config = method.peft_config(model)
    assert config["target_modules"] == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.value",
    ]
    # the untrained classifier is not saved, so no SEQ_CLS (PEFT would look for it in the file)
    assert config["task_type"] is None and config["fan_in_fan_out"] is False


# -- gradients and training ----------------------------------------------------------------------------------
def test_one_step_changes_only_adapter_params() -> None:
    model = MODELS["bert"]()
    apply_peft(model, DoRA(r=4, target_modules=["query", "value"]))
    randomize(model)
    trainable = set(trainable_parameter_names(model))
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_A", "lora_B", "lora_magnitude_vector")) for n in trainable)
    before = snapshot(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**tiny_batch("bert")).loss.backward()
    optimizer.step()
    after = model.state_dict()
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        assert changed == (name in trainable), name


def test_norm_is_detached_in_backward() -> None:
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(6, 5), r=2, alpha=3.0, dropout=0.0, use_rslora=False)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude_vector.mul_(1.3)
    x = torch.randn(4, 6)
    target = torch.randn(4, 5)

    def grads(detach: bool) -> list[torch.Tensor]:
        a = layer.lora_A.detach().clone().requires_grad_()
        b = layer.lora_B.detach().clone().requires_grad_()
        m = layer.lora_magnitude_vector.detach().clone().requires_grad_()
        combined = layer.base_layer.weight + layer.scaling * b @ a
        norm = combined.norm(dim=1, keepdim=True)
        w = m[:, None] * combined / (norm.detach() if detach else norm)
        ((F.linear(x, w, layer.base_layer.bias) - target) ** 2).sum().backward()
        return [a.grad, b.grad, m.grad]

    ((layer(x) - target) ** 2).sum().backward()
    ours = [layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude_vector.grad]
    for got, want in zip(ours, grads(detach=True)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # the reference can tell the two apart: with the norm in the graph A's gradient differs
    assert not torch.allclose(ours[0], grads(detach=False)[0], atol=1e-4)


def test_training_with_callback(tmp_path: Path) -> None:
    module = HFModule("bert", lr=1e-2)
    before = snapshot(module)
    callback = PEFTCallback(DoRA(r=4, target_modules=["query", "value"]), verbose=False)
    trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=[callback])
    trainer.fit(module, train_dataloaders=hf_loader("bert"))
    layers = [m for m in module.modules() if isinstance(m, DoRALinear)]
    assert len(layers) == 4
    assert all(torch.isfinite(m.lora_B).all() and m.lora_B.abs().sum() > 0 for m in layers)
    base_keys = {k.replace(".base_layer.", ".") for k in module.state_dict() if "lora_" not in k}
    after = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items()}
    assert base_keys == set(before)
    assert all(torch.equal(before[k], after[k]) for k in base_keys)
    # the trained adapter of a LightningModule (prefix "model.") is readable by HF PEFT
    save_adapter(module, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["query", "value"] and config["use_dora"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "adapter"))
    batch = tiny_batch("bert")
    torch.testing.assert_close(
        model_output(loaded, batch), model_output(module.model.eval(), batch), atol=1e-5, rtol=0
    )


# -- the real model ------------------------------------------------------------------------------------------
def test_minilm_trainable_count(minilm: nn.Module) -> None:
    model = copy.deepcopy(minilm)
    counts = apply_peft(model, DoRA(r=8, target_modules=["query", "value"]))
    # 6 layers × 2 targets × (A 8·384 + B 384·8 + m 384)
    assert counts.trainable == 78_336 == 6 * 2 * (8 * 384 * 2 + 384)
