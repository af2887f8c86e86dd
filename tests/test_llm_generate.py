"""generate() with adapters on a tiny Llama: merged and unmerged give the same tokens (LoRA, DoRA, IA3), and
prefix tuning generates through the KV cache exactly as without it."""

from __future__ import annotations

import pytest
import torch
from llm_tiny import tiny_chat_llama

from lightning_peft import (
    IA3,
    DoRA,
    LoRA,
    PEFTMethod,
    PrefixTuning,
    apply_peft,
    merge_adapter,
    merge_and_unload,
)

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 2]])


def randomized(method: PEFTMethod, seed: int = 1) -> torch.nn.Module:
    """A tiny Llama with ``method`` attached and its tensors moved off their (no-op) initial values."""
    model = tiny_chat_llama()
    apply_peft(model, method)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def greedy(model: torch.nn.Module, n: int = 16, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=n, do_sample=False, **kwargs
        )
    return out[0, IDS.shape[1] :]


METHODS = {
    "lora": LoRA(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    "dora": DoRA(r=4, target_modules=["q_proj", "v_proj", "up_proj"]),
    "ia3": IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_merged_and_unmerged_generate_give_the_same_tokens(name: str) -> None:
    model = randomized(METHODS[name])
    unmerged = greedy(model)
    assert not torch.equal(unmerged, greedy(tiny_chat_llama()))  # the adapter changes what is generated
    merge_adapter(model)
    assert torch.equal(greedy(model), unmerged)
    plain = merge_and_unload(model)
    assert torch.equal(greedy(plain), unmerged)


def test_prefix_tuning_generates_through_the_kv_cache() -> None:
    model = randomized(PrefixTuning(num_virtual_tokens=5))
    cached = greedy(model, use_cache=True)
    assert torch.equal(cached, greedy(model, use_cache=False))  # the prefix sits in the cache exactly once
    assert not torch.equal(cached, greedy(tiny_chat_llama()))  # and it takes part
    with torch.no_grad():  # the first generated token is the argmax of the full forward pass
        assert int(model(input_ids=IDS).logits[0, -1].argmax()) == int(cached[0])
