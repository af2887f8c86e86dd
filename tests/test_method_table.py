"""One table, every method, three architectures.

For each (method, model): outputs unchanged at init where the method promises it; after a few optimizer
steps through PEFTCallback only the method's parameters changed; merged equals unmerged for mergeable
methods; a save/load round trip gives identical outputs; interrupted-and-resumed training equals
uninterrupted training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODELS, HFModule, fast_trainer, hf_loader, model_output, tiny_batch

from lightning_peft import (
    IA3,
    Adapter,
    BitFit,
    DoRA,
    LoRA,
    PEFTCallback,
    PEFTMethod,
    PrefixTuning,
    PromptTuning,
    apply_peft,
    load_adapter,
    merge_adapter,
    save_adapter,
    trainable_parameter_names,
    unmerge_adapter,
)

# name -> (factory, keeps outputs at init, mergeable)
METHODS: dict[str, tuple[Callable[[], PEFTMethod], bool, bool]] = {
    "lora": (lambda: LoRA(r=4, alpha=8), True, True),
    "dora": (lambda: DoRA(r=4, alpha=8), True, True),
    "adapter_pfeiffer": (lambda: Adapter(placement="pfeiffer", bottleneck_size=8), True, False),
    "adapter_houlsby": (lambda: Adapter(placement="houlsby", bottleneck_size=8), True, False),
    "prefix": (lambda: PrefixTuning(num_virtual_tokens=4), False, False),
    "prompt": (lambda: PromptTuning(num_virtual_tokens=4), False, False),
    "bitfit": (lambda: BitFit(), True, True),
    "ia3": (lambda: IA3(), True, True),
}
KINDS = list(TINY_MODELS)
CASES = [
    pytest.param(m, k, id=f"{m}-{k}")
    for m in METHODS
    for k in KINDS
    if not (m == "bitfit" and k == "llama")  # Llama has no biases: BitFit must refuse it (tested below)
]


def make_module(kind: str, method: PEFTMethod) -> HFModule:
    torch.manual_seed(0)
    module = HFModule(kind, lr=1e-2)
    apply_peft(module, method)  # attach up front so that the test can snapshot; the callback then no-ops
    return module


def fit(tmp_path: Path, module: HFModule, method: PEFTMethod, max_epochs: int, ckpt_path: str | None = None):
    trainer = fast_trainer(tmp_path, max_epochs=max_epochs, callbacks=[PEFTCallback(method)])
    trainer.fit(module, hf_loader(module.hparams.kind), ckpt_path=ckpt_path)
    return trainer


def adapter_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    return {n: params[n].detach().clone() for n in trainable_parameter_names(module)}


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_method_table(tmp_path: Path, name: str, kind: str) -> None:
    factory, keeps_outputs, mergeable = METHODS[name]
    batch = tiny_batch(kind)

    torch.manual_seed(0)
    reference = TINY_MODELS[kind](seed=0)
    module = make_module(kind, factory())
    module.eval()
    if keeps_outputs:
        torch.testing.assert_close(model_output(module.model, batch), model_output(reference, batch))

    # a few optimizer steps: exactly the method's parameters change
    trainable = set(trainable_parameter_names(module))
    assert trainable and trainable == {n for n, p in module.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    module.train()  # training in eval mode is what Lightning warns about
    fit(tmp_path / "straight", module, factory(), max_epochs=2)
    after = dict(module.named_parameters())
    frozen_changed = [n for n in before if n not in trainable and not torch.equal(before[n], after[n])]
    assert not frozen_changed
    unchanged = [n for n in trainable if torch.equal(before[n], after[n])]
    assert not unchanged, f"adapter tensors that did not train: {unchanged}"

    module.eval()
    trained_out = model_output(module.model, batch)
    if mergeable:
        merge_adapter(module)
        torch.testing.assert_close(model_output(module.model, batch), trained_out, atol=1e-5, rtol=1e-5)
        unmerge_adapter(module)
        torch.testing.assert_close(model_output(module.model, batch), trained_out, atol=1e-5, rtol=1e-5)

    save_adapter(module, tmp_path / "adapter")
    fresh = HFModule(kind)
    load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    torch.testing.assert_close(model_output(fresh.model, batch), trained_out, atol=1e-6, rtol=0)

    # interrupted at an epoch boundary, then resumed: the same adapter as the straight run
    first = make_module(kind, factory())
    trainer = fit(tmp_path / "first", first, factory(), max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = make_module(kind, factory())
    fit(tmp_path / "resumed", resumed, factory(), max_epochs=2, ckpt_path=str(tmp_path / "epoch1.ckpt"))
    straight, again = adapter_tensors(module), adapter_tensors(resumed)
    assert straight.keys() == again.keys()
    for n in straight:
        torch.testing.assert_close(again[n], straight[n], atol=1e-6, rtol=0)


def test_bitfit_refuses_a_model_without_biases() -> None:
    model = TINY_MODELS["llama"]()
    with pytest.raises(ValueError, match="bias"):
        apply_peft(model, BitFit())
    assert not any(p.requires_grad is False for p in model.parameters())
