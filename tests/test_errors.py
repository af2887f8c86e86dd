"""Bad input gives a clear error naming the argument, and leaves the model exactly as it was."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import MLP, tiny_bert
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_peft import LoRA, PEFTCallback, apply_peft, load_adapter, save_adapter


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"r": -3}, "r must be a positive integer, got -3"),
        ({"r": 2.5}, "r must be a positive integer, got 2.5"),
        ({"alpha": 0}, "alpha must be a positive number, got 0"),
        ({"alpha": -1.0}, "alpha must be a positive number, got -1.0"),
        ({"dropout": 1.0}, r"dropout must be a float in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout must be a float in \[0, 1\), got -0.1"),
        ({"bias": "some"}, "bias must be one of 'none', 'all', 'lora_only', got 'some'"),
    ],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoRA(**kwargs)  # type: ignore[arg-type]


def test_callback_rejects_non_method() -> None:
    with pytest.raises(TypeError, match="method must be a PEFT method configuration"):
        PEFTCallback({"r": 8})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty list"):
        PEFTCallback([])


def fingerprint(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor], list[bool]]:
    modules = [(n, type(m).__name__) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    return modules, state, flags


def assert_unchanged(
    model: nn.Module, before: tuple[list[tuple[str, str]], dict[str, torch.Tensor], list[bool]]
) -> None:
    modules, state, flags = fingerprint(model)
    assert modules == before[0]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state)
    assert flags == before[2]
    assert not hasattr(model, "_lightning_peft_methods")


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], object], type[Exception], str]] = {
    "no match lists candidates": (
        tiny_bert,
        lambda m: apply_peft(m, LoRA(target_modules=["qkv"])),
        ValueError,
        r"target_modules=\['qkv'\].*matched no module.*Candidate layer names: \['self.query', 'self.key'",
    ),
    "unsupported layer type": (
        tiny_bert,
        lambda m: apply_peft(m, LoRA(target_modules=["query", "LayerNorm"])),
        TypeError,
        r"matched 'bert.embeddings.LayerNorm' of type LayerNorm, but LoRA supports only nn.Linear",
    ),
    "unknown modules_to_save": (
        tiny_bert,
        lambda m: apply_peft(m, LoRA(target_modules=["query"], modules_to_save=["head"])),
        ValueError,
        r"modules_to_save entry 'head' matched no module",
    ),
    "second method fails after first plans": (
        MLP,
        lambda m: apply_peft(m, [LoRA(target_modules=["fc1"]), LoRA(target_modules=["nothing"])]),
        ValueError,
        "matched no module",
    ),
    "two methods on one layer": (
        MLP,
        lambda m: apply_peft(m, [LoRA(target_modules=["fc1"]), LoRA(target_modules=["fc1", "fc2"])]),
        ValueError,
        "both target module 'fc1'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_error_leaves_model_untouched(case: str) -> None:
    factory, action, error, message = CASES[case]
    torch.manual_seed(0)
    model = factory()
    before = fingerprint(model)
    with pytest.raises(error, match=message):
        action(model)
    assert_unchanged(model, before)


def test_attaching_twice_is_refused() -> None:
    model = tiny_bert()
    apply_peft(model, LoRA(target_modules=["query"]))
    before = fingerprint(model)
    with pytest.raises(ValueError, match="already attached.*attaching twice is not allowed"):
        apply_peft(model, LoRA(target_modules=["value"]))
    modules, state, flags = fingerprint(model)
    assert modules == before[0] and flags == before[2]
    assert all(torch.equal(state[k], before[1][k]) for k in state)


def test_adapter_file_with_wrong_shapes_names_tensor(tmp_path: Path) -> None:
    model = tiny_bert()
    apply_peft(model, LoRA(r=4, target_modules=["query"]))
    save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight"
    tensors[key] = torch.zeros(3, 32)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    fresh = tiny_bert()
    before = fingerprint(fresh)
    with pytest.raises(
        ValueError, match=r"query.lora_A' has shape \(3, 32\) but the model expects \(4, 32\)"
    ):
        load_adapter(fresh, tmp_path)
    assert_unchanged(fresh, before)


def test_adapter_file_for_another_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mlp = MLP()
    apply_peft(mlp, LoRA(r=2, target_modules=["fc1"]))
    save_adapter(mlp, tmp_path)
    bert = tiny_bert()
    before = fingerprint(bert)
    with pytest.raises(ValueError, match="saved on a different base model .*architecture MLP != Bert"):
        load_adapter(bert, tmp_path)
    assert_unchanged(bert, before)
    with pytest.raises(ValueError, match="matched no module"):
        load_adapter(bert, tmp_path, allow_base_mismatch=True)
    assert_unchanged(bert, before)
    # a config that plans fine but whose tensors do not fit
    # our metadata in adapter_config.json takes precedence over the copy in the safetensors header
    config = {
        "lightning_peft": {"format_version": 1, "methods": [LoRA(r=2, target_modules=["fc2"]).to_dict()]}
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    other = MLP()
    before = fingerprint(other)
    with pytest.raises(ValueError, match="does not belong to the attached adapter"):
        load_adapter(other, tmp_path)
    assert_unchanged(other, before)
