"""Mixed batches (``model(..., adapter_names=[...])``): one base pass, each adapter on its own rows, outputs and
gradients equal to per-sample runs, for every method that routes (LoRA, DoRA, (IA)³ on attention and
feed-forward layers, Pfeiffer and Houlsby adapters), on tiny BERT and tiny Llama, with padding and
``"__base__"`` rows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import tiny_bert, tiny_llama
from torch import nn

from lightning_peft import (
    IA3,
    Adapter,
    BitFit,
    DoRA,
    LoRA,
    add_adapter,
    apply_peft,
    disable_adapters,
    merge_adapter,
    set_adapter,
)
from lightning_peft.core.targeting import innermost
from lightning_peft.ops.parameters import peft_layers

#: one adapter of each routing method per model kind; several share a layer, so the stacks are routed too
ADAPTERS: dict[str, dict[str, Callable[[], Any]]] = {
    "bert": {
        "lora": lambda: LoRA(r=2, target_modules=["query", "value"]),
        "dora": lambda: DoRA(r=2, target_modules=["value", "key"]),
        "ia3": lambda: IA3(target_modules=["key", "value", "intermediate.dense"], feedforward_modules=[]),
        "ia3_ff": lambda: IA3(target_modules=["value", "output.dense"], feedforward_modules=["output.dense"]),
        "pfeiffer": lambda: Adapter(bottleneck_size=4),
        "houlsby": lambda: Adapter(placement="houlsby", bottleneck_size=4, train_layernorms=False),
    },
    "llama": {
        "lora": lambda: LoRA(r=2, target_modules=["q_proj", "v_proj"]),
        "dora": lambda: DoRA(r=2, target_modules=["v_proj", "o_proj"]),
        "ia3": lambda: IA3(target_modules=["k_proj", "v_proj"], feedforward_modules=[]),
        "ia3_ff": lambda: IA3(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "pfeiffer": lambda: Adapter(bottleneck_size=4),
        "houlsby": lambda: Adapter(placement="houlsby", bottleneck_size=4, train_layernorms=False),
    },
}
NAMES = ["dora", "__base__", "lora", "ia3_ff", "pfeiffer", "ia3", "houlsby", "lora", "__base__", "dora"]


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Move every adapter tensor away from its identity init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in peft_layers(model):
            for name, param in layer.named_parameters():
                if not name.startswith("base_layer."):
                    param.add_(0.3 * torch.randn(param.shape, generator=g))


def adapted(kind: str) -> nn.Module:
    model = (tiny_bert if kind == "bert" else tiny_llama)()
    for name, method in ADAPTERS[kind].items():
        add_adapter(model, method(), name)
    perturb(model)
    return model


def batch_for(kind: str, size: int = len(NAMES), seq: int = 7) -> dict[str, torch.Tensor]:
    """Random tokens with padding: right padding for BERT, left padding for Llama, on several rows."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (size, seq), generator=g)
    mask = torch.ones(size, seq, dtype=torch.long)
    for row, pad in [(r, p) for r, p in ((0, 3), (3, 2), (8, 4)) if r < size]:
        if kind == "bert":
            mask[row, seq - pad :] = 0
        else:
            mask[row, :pad] = 0
        ids[row][mask[row] == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run_alone(model: nn.Module, name: str, batch: dict[str, torch.Tensor], row: int) -> torch.Tensor:
    """Logits of sample ``row`` alone (a batch of one) with only adapter ``name`` active, no routing."""
    one = {k: v[row : row + 1] for k, v in batch.items()}
    if name == "__base__":
        with disable_adapters(model):
            return model(**one).logits[0]
    set_adapter(model, name)
    return model(**one).logits[0]


def all_adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    found = {}
    for path, layer in peft_layers(model):
        for local in layer.peft_parameter_names():
            found[f"{path}.{local}"] = layer.get_parameter(local)
    return found


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_mixed_batch_equals_each_sample_alone_with_its_adapter(kind: str) -> None:
    model = adapted(kind)
    batch = batch_for(kind)
    with torch.no_grad():
        mixed = model(**batch, adapter_names=NAMES).logits
        for row, name in enumerate(NAMES):
            alone = run_alone(model, name, batch, row)
            torch.testing.assert_close(mixed[row], alone, atol=1e-6, rtol=1e-6, msg=f"row {row} ({name})")
        base = torch.stack([run_alone(model, "__base__", batch, r) for r in range(len(NAMES))])
    for row, name in enumerate(NAMES):  # every adapter takes part: its rows differ from the base
        assert (name == "__base__") == torch.allclose(mixed[row], base[row], atol=1e-5), (row, name)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_training_on_a_mixed_batch_gives_the_gradients_of_per_sample_runs(kind: str) -> None:
    model = adapted(kind).train()
    batch = batch_for(kind)
    weights = torch.randn(len(NAMES), *model(**batch, adapter_names=NAMES).logits.shape[1:])
    params = all_adapter_parameters(model)

    def grads() -> dict[str, torch.Tensor]:
        out = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
        for p in params.values():
            p.grad = None
        return out

    for row, name in enumerate(NAMES):  # each sample alone, its adapter active; gradients accumulate
        if name == "__base__":
            continue  # no adapter, no gradient
        (run_alone(model, name, batch, row) * weights[row]).sum().backward()
        for p in params.values():  # set_adapter freezes the others; keep all trainable for the mixed run
            p.requires_grad_(True)
    expected = grads()
    (model(**batch, adapter_names=NAMES).logits * weights).sum().backward()
    got = grads()
    assert any(g.abs().sum() > 0 for g in expected.values())
    for name in params:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
    for adapter in ADAPTERS[kind]:  # every adapter has rows in the batch: each gets gradients
        owned = [
            n
            for p, layer in peft_layers(model)
            if layer.adapter_name == adapter
            for n in params
            if n.startswith(p + ".")
        ]
        assert any(torch.count_nonzero(got[n]) for n in owned), adapter


def test_the_base_layers_run_once_and_each_adapter_only_on_its_rows() -> None:
    model = adapted("bert")
    batch = batch_for("bert")
    calls: Counter[str] = Counter()
    bases = {innermost(layer) for _, layer in peft_layers(model)}
    names = {id(m): n for n, m in model.named_modules()}
    handles = [m.register_forward_hook(lambda m, a, o: calls.update([names[id(m)]])) for m in bases]
    rows_seen: dict[str, list[int]] = {}
    for path, layer in peft_layers(model):
        if hasattr(layer, "lora_forward"):
            original = layer.lora_forward

            def spy(x: torch.Tensor, original: Any = original, path: str = path) -> torch.Tensor:
                rows_seen.setdefault(path, []).append(x.shape[0])
                return original(x)

            layer.lora_forward = spy  # type: ignore[method-assign]
    with torch.no_grad():
        model(**batch, adapter_names=NAMES)
    for handle in handles:
        handle.remove()
    assert calls and set(calls.values()) == {1}  # each frozen layer once, however many adapters it holds
    lora_layers = [p for p, layer in peft_layers(model) if layer.adapter_name == "lora"]
    assert lora_layers and all(rows_seen[p] == [NAMES.count("lora")] for p in lora_layers)


def test_samples_of_one_adapter_take_its_plain_forward() -> None:
    model = adapted("llama")
    batch = batch_for("llama", size=3)
    set_adapter(model, "dora")
    with torch.no_grad():
        plain = model(**batch).logits
        routed = model(**batch, adapter_names=["dora"] * 3).logits
        set_adapter(model, "lora")
        base_only = model(**batch, adapter_names=["__base__"] * 3).logits
        with disable_adapters(model):
            base = model(**batch).logits
    torch.testing.assert_close(routed, plain, atol=0, rtol=0)
    torch.testing.assert_close(base_only, base, atol=0, rtol=0)
    with torch.no_grad():  # the routing ends with the forward pass
        torch.testing.assert_close(model(**batch).logits, model(**batch).logits)
        assert not torch.allclose(model(**batch).logits, base)


def test_mixed_batch_errors_name_the_problem() -> None:
    model = adapted("bert")
    batch = batch_for("bert", size=4)
    with pytest.raises(ValueError, match=r"unknown adapters \['zz'\]"):
        model(**batch, adapter_names=["zz", "lora", "lora", "lora"])
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 4 samples"):
        model(**batch, adapter_names=["lora", "dora"])
    with pytest.raises(TypeError, match="one adapter name per sample"):
        model(**batch, adapter_names="lora")
    set_adapter(model, "lora")
    merge_adapter(model)
    with pytest.raises(RuntimeError, match="needs unmerged adapters"):
        model(**batch, adapter_names=["lora", "dora", "__base__", "lora"])


@pytest.mark.parametrize(
    "method",
    [BitFit(), Adapter(placement="houlsby", bottleneck_size=4), LoRA(r=2, bias="all")],
    ids=["bitfit", "houlsby_layernorms", "lora_bias_all"],
)
def test_adapters_that_change_base_tensors_cannot_be_mixed(method: Any) -> None:
    model = tiny_bert()
    apply_peft(model, method)
    batch = batch_for("bert", size=2)
    with pytest.raises(ValueError, match="trains tensors of the base model in place"):
        model(**batch, adapter_names=["default", "__base__"])
    with torch.no_grad():  # all rows on that one adapter are what the adapter computes
        torch.testing.assert_close(
            model(**batch, adapter_names=["default"] * 2).logits, model(**batch).logits
        )


@pytest.mark.parametrize("shape", [(4, 3, 5), (4, 300, 200)], ids=["serial", "parallel"])
@pytest.mark.parametrize("in_place", [True, False])
def test_adding_to_rows_on_both_sides_of_the_serial_threshold(shape: tuple[int, ...], in_place: bool) -> None:
    from lightning_peft.methods.base import SERIAL_SCATTER_NUMEL, add_to_rows

    result = torch.randn(shape)
    delta = torch.randn(2, *shape[1:], requires_grad=True)
    assert (delta.numel() < SERIAL_SCATTER_NUMEL) == (shape[1] == 3)
    expected = result.clone()
    expected[2] += delta[0].detach()
    expected[0] += delta[1].detach()
    before = result.clone()
    out = add_to_rows(result, torch.tensor([2, 0]), delta, in_place=in_place)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert (out.data_ptr() == result.data_ptr()) == in_place
    if not in_place:
        assert torch.equal(result, before)
    weights = torch.randn(shape)
    (out * weights).sum().backward()
    torch.testing.assert_close(delta.grad, weights[[2, 0]], atol=0, rtol=0)


def test_a_mixed_lora_batch_equals_hf_peft_s() -> None:
    """The oracle: HF PEFT holding the same two LoRA adapters computes the same mixed batch."""
    import peft

    model = tiny_bert()
    add_adapter(model, LoRA(r=2, alpha=4.0, target_modules=["query", "value"]), "a")
    add_adapter(model, LoRA(r=4, alpha=8.0, target_modules=["query"]), "b")
    perturb(model)
    theirs = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]), adapter_name="a"
    )
    theirs.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"]))
    theirs.eval()  # HF PEFT refuses adapter_names in training mode
    with torch.no_grad():
        for path, layer in peft_layers(model):
            target = theirs.base_model.model.get_submodule(path.replace(".base_layer", ""))
            target.lora_A[layer.adapter_name].weight.copy_(layer.lora_A)
            target.lora_B[layer.adapter_name].weight.copy_(layer.lora_B)
        batch = batch_for("bert", size=5)
        names = ["b", "__base__", "a", "b", "a"]
        ours = model(**batch, adapter_names=names).logits
        torch.testing.assert_close(ours, theirs(**batch, adapter_names=names).logits, atol=1e-6, rtol=1e-6)
