"""FSDP1 (``FSDPStrategy``) support that can be checked without a GPU: the wrap policy's units, the
``use_orig_params`` setting, and the guards. Training under FSDP1 itself runs in tests/gpu/."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_MODELS, HFModule
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from lightning_peft import LoRA, PEFTCallback, apply_peft, available_methods, save_adapter
from lightning_peft.core.record import is_attached
from lightning_peft.distributed import configure_strategy, peft_auto_wrap_policy
from lightning_peft.methods import PEFTLayer, get_method_class

#: methods that act on their own (AdapterFusion fuses adapters already on the model: tests/test_adapterhub.py,
#: tests/test_adapter_fusion.py)
ALONE = [name for name in available_methods() if name != "adapter_fusion"]


def fsdp1_units(root: nn.Module, policy: object) -> list[tuple[str, list[str]]]:
    """What FSDP1 would build: (unit name, names of the parameters it manages), innermost units first.

    FSDP1 wraps bottom-up and a unit manages the parameters of its subtree that no inner unit manages; the
    root is always a unit. This mirrors torch's ``_validate_frozen_params`` bookkeeping."""
    targets = set(policy._run_policy(root, set(), {}))  # type: ignore[attr-defined]
    names = {id(m): n for n, m in root.named_modules()}
    units = [m for m in root.modules() if m in targets] + [root]
    units.sort(key=lambda m: -names[id(m)].count(".") if names[id(m)] else 1)  # deepest first, root last
    managed: set[int] = set()
    result = []
    for unit in units:
        prefix = names[id(unit)]
        own = []
        for name, param in unit.named_parameters(remove_duplicate=False):
            if id(param) not in managed:
                own.append(f"{prefix}.{name}" if prefix else name)
        managed.update(id(p) for p in unit.parameters())
        result.append((prefix or "<root>", own))
    return result


def mixed_in_one_module(module: nn.Module) -> set[str]:
    """Modules that themselves own frozen and trainable tensors (BitFit's biases): no unit can split them."""
    out = set()
    for name, sub in module.named_modules():
        flags = {p.requires_grad for p in sub.parameters(recurse=False)}
        if len(flags) == 2:
            out.add(name)
    return out


def check_units(module: nn.Module) -> list[tuple[str, list[str]]]:
    units = fsdp1_units(module, peft_auto_wrap_policy())
    params = dict(module.named_parameters(remove_duplicate=False))
    unavoidable = mixed_in_one_module(module)
    for unit, names in units:
        flags = {params[n].requires_grad for n in names}
        if len(flags) == 2:
            owners = {n.rsplit(".", 1)[0] for n in names}
            assert owners & unavoidable, f"unit {unit} mixes frozen and trainable tensors: {names}"
    return units


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_lora_units_are_uniformly_frozen_or_trainable(kind: str) -> None:
    module = HFModule(kind)
    head = {"bert": "classifier", "gpt2": "lm_head", "llama": "lm_head"}[kind]
    save = ["classifier"] if kind == "bert" else []
    targets = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}[kind]
    apply_peft(module, LoRA(r=4, target_modules=targets, modules_to_save=save))
    units = dict(check_units(module))
    layers = [n for n, m in module.named_modules() if isinstance(m, PEFTLayer)]
    params = dict(module.named_parameters())
    for layer in layers:  # every adapter: a unit of its own trainable tensors, its base layer another
        assert sorted(units[layer]) == [f"{layer}.lora_A", f"{layer}.lora_B"]
        base = units[f"{layer}.base_layer"]
        assert base and all(
            n.startswith(f"{layer}.base_layer.") and not params[n].requires_grad for n in base
        )
    blocks = [
        u for u in units if u.endswith((".layer.0", ".layer.1", ".h.0", ".h.1", ".layers.0", ".layers.1"))
    ]
    assert len(blocks) == 2  # the transformer blocks (from _no_split_modules)
    if kind == "bert":
        assert units["model.classifier"] == ["model.classifier.weight", "model.classifier.bias"]
    if kind == "gpt2":  # wte and lm_head share one tensor: never split across units
        root = units["<root>"]
        assert "model.transformer.wte.weight" in root and f"model.{head}.weight" in root


@pytest.mark.parametrize("name", ALONE)
def test_every_method_gets_units_without_avoidable_mixing(name: str) -> None:
    module = HFModule("bert")
    try:
        apply_peft(module, get_method_class(name)())
    except NotImplementedError:
        pytest.skip(f"{name} is not implemented yet")
    check_units(module)


def test_explicit_transformer_layer_cls() -> None:
    from transformers.models.bert.modeling_bert import BertLayer

    module = HFModule("bert")
    apply_peft(module, LoRA(r=4))
    units = [u for u, _ in fsdp1_units(module, peft_auto_wrap_policy(transformer_layer_cls={BertLayer}))]
    assert "model.bert.encoder.layer.0" in units and "model.bert.embeddings" not in units
    default = [u for u, _ in fsdp1_units(module, peft_auto_wrap_policy())]
    assert "model.bert.embeddings" in default  # _no_split_modules lists BertEmbeddings too


def test_use_orig_params_is_ensured() -> None:
    strategy = FSDPStrategy()
    strategy.kwargs.pop("use_orig_params")
    configure_strategy(SimpleNamespace(strategy=strategy))  # type: ignore[arg-type]
    assert strategy.kwargs["use_orig_params"] is True


def test_use_orig_params_false_fails_before_attaching() -> None:
    module = HFModule("bert")
    trainer = SimpleNamespace(strategy=FSDPStrategy(use_orig_params=False), loggers=[])
    with pytest.raises(ValueError, match=r"use_orig_params=False"):
        PEFTCallback(LoRA(r=4)).setup(trainer, module, "fit")  # type: ignore[arg-type]
    assert not is_attached(module) and all(p.requires_grad for p in module.parameters())


def test_save_adapter_refuses_an_fsdp1_model(tmp_path: object) -> None:
    class FullyShardedDataParallel(nn.Module):  # stands in for torch's FSDP1 wrapper (no GPU here)
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._fsdp_wrapped_module = inner

    model = TINY_MODELS["bert"]()
    apply_peft(model, LoRA(r=4))
    model.bert.encoder.layer[0] = FullyShardedDataParallel(model.bert.encoder.layer[0])
    with pytest.raises(RuntimeError, match="load_peft_checkpoint"):
        save_adapter(model, tmp_path)  # type: ignore[arg-type]
    assert torch.is_tensor(next(model.parameters()))
