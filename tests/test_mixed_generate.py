"""``generate(..., adapter_names=[...])``: each sample's tokens equal those of generating it alone with its adapter
active, on decoders (tiny Llama, tiny GPT-2) and encoder-decoders (tiny T5, tiny BART), with the KV cache, and
with beam search, where the names follow the beams."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import HFModule, tiny_gpt2, tiny_llama
from torch import nn

from lightning_peft import IA3, DoRA, LoRA, add_adapter, disable_adapters, remove_peft, set_adapter
from lightning_peft.ops.parameters import peft_layers


def tiny_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_bart() -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=100,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        tie_word_embeddings=False,  # tied, a tiny random BART repeats its start token
    )
    return BartForConditionalGeneration(config).eval()


#: model factory, and two adapters of different methods on it
MODELS: dict[str, tuple[Callable[..., nn.Module], Any, Any]] = {
    "llama": (
        tiny_llama,
        LoRA(r=2, target_modules=["q_proj", "v_proj"]),
        IA3(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
    "gpt2": (tiny_gpt2, LoRA(r=2, target_modules=["c_attn"]), DoRA(r=2, target_modules=["c_attn", "c_proj"])),
    "t5": (
        tiny_t5,
        LoRA(r=2, target_modules=["q", "v"]),
        IA3(target_modules=["k", "wo"], feedforward_modules=["wo"]),
    ),
    "bart": (
        tiny_bart,
        LoRA(r=2, target_modules=["q_proj", "v_proj"]),
        DoRA(r=2, target_modules=["out_proj", "fc1", "fc2"]),
    ),
}
NAMES = ["b", "a", "__base__", "b", "a"]


def perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in peft_layers(model):
            for name, param in layer.named_parameters():
                if not name.startswith("base_layer."):
                    param.add_(1.0 * torch.randn(param.shape, generator=g))


def two_adapters(kind: str, owner: nn.Module | None = None) -> nn.Module:
    factory, first, second = MODELS[kind]
    model = owner if owner is not None else factory()
    add_adapter(model, first, "a")
    add_adapter(model, second, "b")
    perturb(model)
    return model


def prompts(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (len(NAMES), 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[3, :1] = 0  # left padding (decoders); encoders just mask those tokens
    ids[mask == 0] = 0
    return ids, mask


def generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    config = model.generation_config
    config.eos_token_id = config.forced_eos_token_id = config.forced_bos_token_id = None
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, **kwargs
    )


def alone(
    model: nn.Module,
    name: str,
    ids: torch.Tensor,
    mask: torch.Tensor,
    row: int,
    owner: nn.Module | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Sample ``row`` generated as a batch of its own, with only adapter ``name`` active (no routing);
    ``owner``: the module holding the adapters (default ``model``)."""
    owner = model if owner is None else owner
    one = (ids[row : row + 1], mask[row : row + 1])
    if name == "__base__":
        with disable_adapters(owner):
            return generate(model, *one, **kwargs)
    set_adapter(owner, name)
    return generate(model, *one, **kwargs)


@pytest.mark.parametrize("kind", list(MODELS))
def test_greedy_generation_gives_each_sample_its_adapter(kind: str) -> None:
    model = two_adapters(kind)
    ids, mask = prompts(kind)
    mixed = generate(model, ids, mask, adapter_names=NAMES)
    for row, name in enumerate(NAMES):
        assert torch.equal(mixed[row], alone(model, name, ids, mask, row)[0]), (row, name)
    # the adapters change the tokens, so the test can tell them apart
    with disable_adapters(model):
        base = generate(model, ids, mask)
    assert any(not torch.equal(mixed[r], base[r]) for r, n in enumerate(NAMES) if n == "a")
    assert any(not torch.equal(mixed[r], base[r]) for r, n in enumerate(NAMES) if n == "b")


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_beam_search_names_follow_the_beams(kind: str) -> None:
    model = two_adapters(kind)
    ids, mask = prompts(kind)
    beams = dict(num_beams=3, num_return_sequences=2)
    mixed = generate(model, ids, mask, adapter_names=NAMES, **beams)
    assert mixed.shape[0] == 2 * len(NAMES)
    for row, name in enumerate(NAMES):  # rows 2i and 2i + 1 are sample i's
        expected = alone(model, name, ids, mask, row, **beams)
        assert torch.equal(mixed[2 * row : 2 * row + 2], expected), (row, name)
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 5 samples"):
        generate(model, ids, mask, adapter_names=["a", "b"], **beams)


def test_generate_on_the_inner_model_of_a_lightning_module() -> None:
    module = HFModule("llama").eval()
    two_adapters("llama", owner=module)  # the adapters' record lives on the LightningModule
    ids, mask = prompts("llama")
    mixed = generate(module.model, ids, mask, adapter_names=NAMES)
    for row, name in enumerate(NAMES):
        assert torch.equal(mixed[row], alone(module.model, name, ids, mask, row, owner=module)[0]), (
            row,
            name,
        )
    with pytest.raises(ValueError, match=r"unknown adapters \['zz'\]"):
        generate(module.model, ids, mask, adapter_names=["zz"] * len(NAMES))


def test_plain_generate_is_unchanged_and_removing_the_adapters_removes_the_wrapper() -> None:
    model = two_adapters("llama")
    ids, mask = prompts("llama")
    set_adapter(model, "b")
    routed = generate(model, ids, mask, adapter_names=["b"] * len(NAMES))
    assert torch.equal(generate(model, ids, mask), routed)
    assert "generate" in model.__dict__
    remove_peft(model)
    assert "generate" not in model.__dict__
    with pytest.raises(ValueError, match="adapter_names"):
        generate(model, ids, mask, adapter_names=NAMES)
