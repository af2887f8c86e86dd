"""Prompt and prefix tuning on encoder-decoder models (T5, BART) against HF PEFT (the test oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from zoo_models import ZOO

from lightning_peft import PrefixTuning, PromptTuning, apply_peft, load_adapter, save_adapter

peft = pytest.importorskip("peft")
SEQ2SEQ = {z.name: z for z in ZOO if z.kind == "encoder-decoder"}
P = 3


def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(3, 90, (2, 6), generator=generator)
    mask = torch.ones_like(x)
    mask[1, 4:] = 0  # padding in the second row
    return {
        "input_ids": x,
        "attention_mask": mask,
        "labels": torch.randint(3, 90, (2, 4), generator=generator),
    }


def oracle(name: str, config: object, prompt: torch.Tensor) -> nn.Module:
    model = peft.get_peft_model(SEQ2SEQ[name].build(), config).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight[: prompt.shape[0]] = prompt
    return model


def adapter_tensor(model: nn.Module) -> torch.Tensor:
    (tensor,) = [p for p in model.parameters() if p.requires_grad]
    return tensor.detach()


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_prompt_tuning_on_the_encoder_input_equals_hf_peft(name: str) -> None:
    model = SEQ2SEQ[name].build()
    apply_peft(model, PromptTuning(num_virtual_tokens=P))
    config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P)
    reference = oracle(name, config, adapter_tensor(model))
    batch = inputs()
    with torch.no_grad():
        ours, theirs = model(**batch), reference(**batch)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "max_new_tokens": 4}
    assert torch.equal(
        model.generate(**kwargs, do_sample=False), reference.generate(**kwargs, do_sample=False)
    )


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_prefix_tuning_equals_hf_peft_and_its_files_load_there(name: str, tmp_path: Path) -> None:
    model = SEQ2SEQ[name].build()
    apply_peft(model, PrefixTuning(num_virtual_tokens=P))
    with torch.no_grad():  # a trained-looking prefix
        adapter_tensor(model).copy_(torch.randn_like(adapter_tensor(model)))
    config = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P)
    reference = oracle(name, config, adapter_tensor(model))
    batch = inputs()
    with torch.no_grad():
        ours = model(**batch)
        torch.testing.assert_close(ours.logits, reference(**batch).logits, atol=1e-5, rtol=0)
    save_adapter(model, tmp_path)
    loaded_by_peft = peft.PeftModel.from_pretrained(SEQ2SEQ[name].build(), tmp_path).eval()
    loaded = load_adapter(SEQ2SEQ[name].build(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded_by_peft(**batch).logits, ours.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded(**batch).logits, ours.logits, atol=0, rtol=0)


def greedy(model: nn.Module, batch: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Greedy decoding with full forward passes and no cache."""
    decoded = torch.full((2, 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                decoder_input_ids=decoded,
                use_cache=False,
            ).logits
            decoded = torch.cat([decoded, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return decoded


@pytest.mark.parametrize("cross", [False, True])
def test_prefix_generate_with_the_cache_equals_greedy_decoding_by_hand(cross: bool) -> None:
    model = SEQ2SEQ["T5"].build()
    apply_peft(model, PrefixTuning(num_virtual_tokens=P, cross_attention_prefix=cross))
    batch = inputs()
    generated = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=4,
        do_sample=False,
    )
    assert torch.equal(generated, greedy(model, batch, 4))


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_the_cross_attention_prefix_reaches_the_cross_attention(name: str) -> None:
    plain, cross = SEQ2SEQ[name].build(), SEQ2SEQ[name].build()
    apply_peft(plain, PrefixTuning(num_virtual_tokens=P))
    apply_peft(cross, PrefixTuning(num_virtual_tokens=P, cross_attention_prefix=True))
    with torch.no_grad():
        adapter_tensor(cross).copy_(adapter_tensor(plain))
    batch = inputs()
    loss = cross(**batch).loss
    loss.backward()
    (theta,) = [p for p in cross.parameters() if p.requires_grad]
    width = (
        theta.shape[1] // 2
    )  # the columns of prefix layer 1: the cross-attention blocks of decoder layer 0
    assert float(theta.grad[:, width:].abs().sum()) > 0
    plain(**batch).loss.backward()
    (theta_plain,) = [p for p in plain.parameters() if p.requires_grad]
    assert float(theta_plain.grad[:, width:].abs().sum()) == 0  # HF PEFT's layout: reserved, unused
