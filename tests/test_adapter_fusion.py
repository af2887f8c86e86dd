"""AdapterFusion (Pfeiffer et al. 2021) as a lightning-peft method: the formula, training through PEFTCallback
with the fused adapters frozen, and what it refuses. Outputs against AdapterHub's: tests/test_adapterhub.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import HFModule, fast_trainer, hf_loader, tiny_bert

from lightning_peft import Adapter, AdapterFusion, LoRA, PEFTCallback
from lightning_peft.core.record import is_attached
from lightning_peft.methods.fusion import FusionLayer
from lightning_peft.ops.composition import Parallel, Stack, parallel_forward, set_composition
from lightning_peft.ops.named_adapters import active_adapters, add_adapter, set_adapter


def perturb(model: torch.nn.Module, names: tuple[str, ...], seed: int = 0) -> None:
    """Move the named adapters' tensors away from their init (zero up projections make every adapter equal)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "adapter_name", None) in names and hasattr(module, "peft_parameter_names"):
                for local in module.peft_parameter_names():
                    param = module.get_parameter(local)
                    param.add_(0.3 * torch.randn(param.shape, generator=generator))


def fused_model(original_ln_before: bool = True) -> torch.nn.Module:
    model = tiny_bert().eval()
    for name in ("a", "b"):
        add_adapter(model, Adapter(bottleneck_size=4, original_ln_before=original_ln_before), name)
    perturb(model, ("a", "b"))
    add_adapter(model, AdapterFusion(adapters=["a", "b"]), "fusion")
    set_adapter(model, "fusion")
    return model


@pytest.mark.parametrize("original_ln_before", [True, False])
def test_fusion_computes_the_formula(original_ln_before: bool) -> None:
    model = fused_model(original_ln_before)
    block = model.bert.encoder.layer[0].output
    assert isinstance(block, FusionLayer)
    with torch.no_grad():
        for name in ("query", "key"):  # away from their init, so that the attention is not uniform
            getattr(block, name).weight.normal_(0.0, 0.3)
        block.value.weight.add_(0.1 * torch.randn_like(block.value.weight))
    plain, _, (a, b) = block.children_of()
    x, r = torch.randn(2, 5, plain.dense.in_features), torch.randn(2, 5, plain.dense.out_features)
    with torch.no_grad():
        h = plain.dropout(plain.dense(x))
        z = plain.LayerNorm(h + r) if original_ln_before else h
        ups = [c.bottleneck(z) if hasattr(c, "bottleneck") else c.adapter_delta(z) for c in (a, b)]
        q = block.query(z)
        scores = torch.stack([(q * block.key(u)).sum(-1) for u in ups], dim=-1).softmax(-1)  # (B, T, 2)
        mixed = sum(scores[..., i : i + 1] * block.value(u) for i, u in enumerate(ups))
        want = plain.LayerNorm(mixed + h + r)
        torch.testing.assert_close(block(x, r), want, atol=1e-6, rtol=0)
        set_adapter(model, "a")  # one adapter alone is something else
        assert (model.bert.encoder.layer[0].output(x, r) - want).abs().max() > 1e-3


class FusionModule(HFModule):
    """Tiny BERT with two frozen bottleneck adapters "a" and "b" loaded before training their fusion."""

    def __init__(self) -> None:
        super().__init__("bert")
        for name in ("a", "b"):
            add_adapter(self, Adapter(bottleneck_size=4, original_ln_before=True), name)
        perturb(self.model, ("a", "b"))


def test_fusion_trains_through_the_callback_with_the_fused_adapters_frozen(tmp_path: Path) -> None:
    module = FusionModule()
    before = {id(p): p.detach().clone() for p in module.parameters()}  # names change when the fusion wraps
    callback = PEFTCallback(AdapterFusion(adapters=["a", "b"]), adapter_name="fusion")
    trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=[callback])
    trainer.fit(module, hf_loader("bert"))
    assert active_adapters(module) == ["fusion"]
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    trained = {n for n, p in module.named_parameters() if id(p) in held}
    assert trained and all(n.rsplit(".", 2)[-2] in ("query", "key", "value") for n in trained), trained
    for name, param in module.named_parameters():
        moved = id(param) not in before or not torch.equal(param, before[id(param)])
        assert moved == (name in trained), name  # the fusion trains; the base and adapters a, b do not
    fusion = module.model.bert.encoder.layer[0].output
    assert not torch.equal(
        fusion.value.weight, torch.full_like(fusion.value.weight, 1e-6).fill_diagonal_(1.0)
    )


def test_fusion_refuses_what_it_cannot_fuse() -> None:
    model = tiny_bert()
    add_adapter(model, Adapter(bottleneck_size=4), "a")
    with pytest.raises(ValueError, match="'b' is not on"):
        add_adapter(model, AdapterFusion(adapters=["a", "b"]), "fusion")
    add_adapter(model, LoRA(r=2, target_modules=["query"]), "b")
    with pytest.raises(ValueError, match="same output blocks"):
        add_adapter(model, AdapterFusion(adapters=["a", "b"]), "fusion")
    with pytest.raises(ValueError, match="at least two"):
        AdapterFusion(adapters=["a"])
    with pytest.raises(ValueError, match="adapters=\\[\\]"):
        add_adapter(model, AdapterFusion(), "fusion")
    assert is_attached(model) and not any(isinstance(m, FusionLayer) for m in model.modules())


def test_parallel_gives_each_adapter_its_own_output_in_one_batch() -> None:
    model = tiny_bert().eval()
    add_adapter(model, Adapter(bottleneck_size=4, original_ln_before=True), "a")
    add_adapter(model, LoRA(r=2, target_modules=["query", "value"]), "b")
    perturb(model, ("a", "b"))
    batch = {
        "input_ids": torch.tensor([[2, 5, 9, 3], [2, 7, 3, 0]]),
        "attention_mask": torch.tensor([[1] * 4, [1, 1, 1, 0]]),
    }
    with torch.no_grad():
        both = parallel_forward(model, Parallel("a", "b"), **batch).logits  # (2·B, labels)
        alone = []
        for name in ("a", "b"):
            set_adapter(model, name)
            alone.append(model(**batch).logits)
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-6, rtol=0)
    assert (alone[0] - alone[1]).abs().max() > 1e-3


def test_stack_refuses_what_it_cannot_stack() -> None:
    model = tiny_bert()
    add_adapter(model, Adapter(bottleneck_size=4, original_ln_before=True), "a")
    add_adapter(model, Adapter(bottleneck_size=4, original_ln_before=True), "b")
    add_adapter(model, LoRA(r=2, target_modules=["query"]), "c")
    with pytest.raises(ValueError, match="order they were added"):
        set_composition(model, Stack("b", "a"))
    with pytest.raises(ValueError, match="'c'"):
        set_composition(model, Stack("a", "c"))
    set_composition(model, Stack("a", "b"))
    assert active_adapters(model) == ["a", "b"]
