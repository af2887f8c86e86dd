"""Many named adapters on one base: add, switch, disable, delete, mixed batches, save/load by name, and
training one adapter while the others stay loaded."""

from __future__ import annotations

import gc
import resource
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import HFModule, fast_trainer, hf_loader, model_output, snapshot, tiny_batch, tiny_bert
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_peft import (
    IA3,
    BitFit,
    DoRA,
    LoRA,
    PEFTCallback,
    PromptTuning,
    active_adapters,
    add_adapter,
    combine_adapters,
    count_parameters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
    trainable_parameter_names,
)
from lightning_peft.ops.parameters import peft_layers

ADAPTERS: dict[str, Any] = {
    "a": LoRA(r=2, target_modules=["query", "value"]),
    "b": IA3(target_modules=["key", "value", "intermediate.dense"], feedforward_modules=[]),
    "c": DoRA(r=2, target_modules=["value", "query"]),
}


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Move every adapter tensor away from its identity init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in peft_layers(model):
            for name, param in layer.named_parameters():
                if not name.startswith("base_layer."):
                    param.add_(0.3 * torch.randn(param.shape, generator=g))


def three_adapters() -> nn.Module:
    model = tiny_bert()
    for name, method in ADAPTERS.items():
        add_adapter(model, method, name)
    perturb(model)
    return model


def alone(name: str, model: nn.Module, tmp_path: Path) -> torch.Tensor:
    """The output of a fresh base with only adapter ``name`` (saved from ``model``) attached."""
    save_adapter(model, tmp_path / name, adapter_name=name)
    fresh = load_adapter(tiny_bert(), tmp_path / name)
    return model_output(fresh, tiny_batch("bert"))


def test_each_adapter_computes_exactly_what_it_computes_alone(tmp_path: Path) -> None:
    model = three_adapters()
    assert list_adapters(model) == ["a", "b", "c"] and active_adapters(model) == ["a"]
    batch = tiny_batch("bert")
    base = model_output(tiny_bert(), batch)
    for name in ADAPTERS:
        set_adapter(model, name)
        out = model_output(model, batch)
        assert not torch.allclose(out, base, atol=1e-5)  # the adapter takes part
        torch.testing.assert_close(out, alone(name, model, tmp_path), atol=1e-6, rtol=1e-5)
        trainable = set(trainable_parameter_names(model))
        assert trainable == {
            f"{path}.{local}"
            for path, layer in peft_layers(model)
            if layer.adapter_name == name
            for local in layer.peft_parameter_names()
        }
        assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    with disable_adapters(model):
        torch.testing.assert_close(model_output(model, batch), base, atol=0, rtol=0)
    assert active_adapters(model) == ["c"] and not torch.allclose(model_output(model, batch), base)


def test_mixed_batch_routes_each_sample(tmp_path: Path) -> None:
    model = three_adapters()
    batch = tiny_batch("bert", batch=4)
    per_adapter = {}
    for name in ADAPTERS:
        set_adapter(model, name)
        per_adapter[name] = model_output(model, batch)
    with disable_adapters(model):
        per_adapter["__base__"] = model_output(model, batch)
    names = ["c", "__base__", "a", "b"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    mixed = model(**inputs, adapter_names=names).logits
    expected = torch.stack([per_adapter[n][i] for i, n in enumerate(names)])
    torch.testing.assert_close(mixed, expected, atol=1e-6, rtol=1e-5)
    # the routing ends with the forward pass
    torch.testing.assert_close(model_output(model, batch), per_adapter["c"])
    with pytest.raises(ValueError, match=r"unknown adapters \['zz'\].*\['a', 'b', 'c'\]"):
        model(**inputs, adapter_names=["zz", "a", "a", "a"])
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 4"):
        model(**inputs, adapter_names=["a", "b"])


def test_several_lora_adapters_active_add_up() -> None:
    model = tiny_bert()
    add_adapter(model, LoRA(r=2, target_modules=["query"]), "x")
    add_adapter(model, LoRA(r=4, alpha=3.0, target_modules=["query"], use_rslora=True), "y")
    perturb(model)
    set_adapter(model, ["x", "y"])
    layer_y = model.bert.encoder.layer[0].attention.self.query
    layer_x, linear = layer_y.base_layer, layer_y.base_layer.base_layer
    inputs = torch.randn(3, 5, 32)
    expected = linear(inputs) + sum(inputs @ layer.delta_weight().T for layer in (layer_x, layer_y))
    torch.testing.assert_close(layer_y(inputs), expected, atol=1e-6, rtol=1e-5)
    add_adapter(model, IA3(target_modules=["query"], feedforward_modules=[]), "z")
    with pytest.raises(ValueError, match="only LoRA adapters can be active together"):
        set_adapter(model, ["x", "z"])


@pytest.mark.parametrize(
    "method",
    [
        BitFit(),
        PromptTuning(num_virtual_tokens=2),
        LoRA(target_modules=["query"], modules_to_save=["classifier"]),
    ],
    ids=["bitfit", "prompt", "modules_to_save"],
)
def test_adapters_that_cannot_be_switched_off_are_refused(method: Any) -> None:
    model = tiny_bert()
    add_adapter(model, LoRA(r=2, target_modules=["value"]), "a")
    before = snapshot(model)
    types_before = [type(m) for m in model.modules()]
    with pytest.raises(
        ValueError, match="cannot share BertForSequenceClassification with other named adapters"
    ):
        add_adapter(model, method, "b")
    assert list_adapters(model) == ["a"] and [type(m) for m in model.modules()] == types_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_save_writes_default_at_the_root_and_others_in_subfolders(tmp_path: Path) -> None:
    model = tiny_bert()
    add_adapter(model, LoRA(r=2, target_modules=["query"]), "default")
    add_adapter(model, IA3(target_modules=["value"], feedforward_modules=[]), "other")
    perturb(model)
    save_adapter(model, tmp_path / "all")
    assert (tmp_path / "all" / "adapter_config.json").is_file()
    assert (tmp_path / "all" / "other" / "adapter_model.safetensors").is_file()
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path / "all")
    load_adapter(fresh, tmp_path / "all" / "other", adapter_name="other")
    assert list_adapters(fresh) == ["default", "other"] and active_adapters(fresh) == ["default"]
    batch = tiny_batch("bert")
    for name in ("default", "other"):
        set_adapter(model, name), set_adapter(fresh, name)
        torch.testing.assert_close(model_output(fresh, batch), model_output(model, batch))


def test_delete_frees_the_adapter(tmp_path: Path) -> None:
    model = tiny_bert()
    add_adapter(model, LoRA(r=2, target_modules=["query"]), "keep")
    save_adapter(model, tmp_path / "big")  # save a big one by attaching it to a scratch model
    scratch = tiny_bert()
    add_adapter(scratch, LoRA(r=16, target_modules=["query", "key", "value", "dense"]), "big")
    save_adapter(scratch, tmp_path / "big")
    total = count_parameters(model).total
    rss: list[int] = []
    for i in range(100):
        load_adapter(model, tmp_path / "big", adapter_name="big")
        assert count_parameters(model).total > total
        delete_adapter(model, "big")
        assert count_parameters(model).total == total and list_adapters(model) == ["keep"]
        if i in (10, 99):
            gc.collect()
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert rss[1] - rss[0] < 20_000  # KiB: a leak of the adapter (~1 MB each time) would be 90 MB
    delete_adapter(model, "keep")  # the last one: the model is the base again
    assert not list(peft_layers(model)) and list_adapters(model) == []


class TwoAdapterModule(HFModule):
    """A module whose frozen adapter ``a`` is loaded before training adapter ``b``."""

    def __init__(self, adapter_dir: str) -> None:
        super().__init__("bert")
        self.model.eval()  # dropout-free tiny BERT either way; keeps outputs comparable
        load_adapter(self, adapter_dir, adapter_name="a")


def test_training_one_adapter_leaves_the_others_frozen_and_out_of_checkpoints(tmp_path: Path) -> None:
    scratch = tiny_bert()
    add_adapter(scratch, LoRA(r=2, target_modules=["query", "value"]), "a")
    perturb(scratch)
    save_adapter(scratch, tmp_path / "a")

    def run(folder: Path, epochs: int, ckpt: Path | None = None, module: Any = None) -> TwoAdapterModule:
        module = module or TwoAdapterModule(str(tmp_path / "a"))
        checkpoint = ModelCheckpoint(dirpath=folder, filename="last")
        callback = PEFTCallback(LoRA(r=4, target_modules=["value", "key"]), adapter_name="b")
        trainer = fast_trainer(
            folder, max_epochs=epochs, callbacks=[callback, checkpoint], enable_checkpointing=True
        )
        trainer.fit(module, hf_loader("bert"), ckpt_path=ckpt)
        held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        assert held == {id(p) for n, p in module.named_parameters() if _in_adapter(module, n, "b")}
        return module

    module = TwoAdapterModule(str(tmp_path / "a"))
    before = {id(p): p.detach().clone() for p in module.parameters()}  # the base and adapter a
    trained = run(tmp_path / "one", 1, module=module)
    assert list_adapters(trained) == ["a", "b"] and active_adapters(trained) == ["b"]
    for param in trained.parameters():
        if id(param) in before:
            assert torch.equal(param, before[id(param)])  # frozen: base and adapter a
    b_tensors = {n for n, _ in trained.named_parameters() if _in_adapter(trained, n, "b")}
    assert b_tensors and all(".lora_" in n for n in b_tensors)
    saved = torch.load(tmp_path / "one" / "last.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == set(trainable_parameter_names(trained)) == b_tensors
    assert saved["lightning_peft"]["adapter_name"] == "b"

    straight = run(tmp_path / "two", 2)
    resumed = run(tmp_path / "resumed", 2, ckpt=tmp_path / "one" / "last.ckpt")
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=0, rtol=0)


def _in_adapter(module: nn.Module, name: str, adapter: str) -> bool:
    owner = module.get_submodule(name.rsplit(".", 1)[0])
    return getattr(owner, "adapter_name", None) == adapter and not name.split(".")[-1].startswith(
        "base_layer"
    )


@pytest.mark.parametrize("how", ["linear", "cat"])
def test_combine_named_adapters_into_a_new_one(how: str) -> None:
    model = tiny_bert()
    add_adapter(model, LoRA(r=2, target_modules=["query", "value"]), "a")
    add_adapter(model, LoRA(r=3, alpha=5.0, use_rslora=True, target_modules=["query"]), "b")
    perturb(model)
    combine_adapters(model, ["a", "b"], [0.5, 0.8], "ab", how=how)
    assert list_adapters(model) == ["a", "b", "ab"] and active_adapters(model) == ["a"]
    for path in ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"):
        deltas = {}
        layer = model.get_submodule(path)
        while getattr(layer, "is_peft_layer", False):
            deltas[layer.adapter_name] = layer.delta_weight()
            layer = layer.base_layer
        expected = 0.5 * deltas["a"] + 0.8 * deltas.get("b", torch.zeros_like(deltas["a"]))
        torch.testing.assert_close(deltas["ab"], expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="already loaded"):
        combine_adapters(model, ["a", "b"], [1.0, 1.0], "ab")


def test_merging_folds_in_only_the_active_adapter_and_unmerges_exactly() -> None:
    from helpers import tiny_gpt2

    from lightning_peft import merge_adapter, unmerge_adapter

    model = tiny_gpt2()  # Conv1D layers: the stack must keep GPT-2's (in, out) weight layout
    add_adapter(model, DoRA(r=2, target_modules=["c_attn"]), "d")
    add_adapter(model, LoRA(r=2, target_modules=["c_attn", "c_proj"]), "l")
    perturb(model)
    batch = tiny_batch("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("d", "l", "d"):
        set_adapter(model, name)
        unmerged = model_output(model, batch)
        merge_adapter(model)
        torch.testing.assert_close(model_output(model, batch), unmerged, atol=1e-5, rtol=1e-5)
        unmerge_adapter(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=1e-6)
