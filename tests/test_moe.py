"""Mixture-of-experts models: targets that cover experts stored as 3-D parameters are refused at attach."""

from __future__ import annotations

import pytest
import torch
from zoo_models import ZOO

from lightning_peft import IA3, DoRA, LoRA, apply_peft, trainable_parameter_names

MOE = {z.name: z for z in ZOO if z.name in ("Mixtral", "Qwen2-MoE")}


@pytest.mark.parametrize("name", MOE)
@pytest.mark.parametrize(
    "method",
    [
        lambda: LoRA(r=2, target_modules="all-linear"),
        lambda: DoRA(r=2, target_modules=["experts"]),
        lambda: LoRA(
            r=2, target_modules=["down_proj"]
        ),  # Qwen2-MoE's shared expert has an nn.Linear down_proj
        lambda: IA3(target_modules=["gate_up_proj"], feedforward_modules=[]),
    ],
    ids=["all-linear", "experts", "down_proj", "gate_up_proj"],
)
def test_targets_covering_the_experts_are_refused_naming_model_and_weights(name: str, method: object) -> None:
    model = MOE[name].build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        TypeError, match=r"covers the experts of (Mixtral|Qwen2Moe)ForCausalLM.*3-D parameters"
    ):
        apply_peft(model, method())  # type: ignore[operator]
    assert all(p.requires_grad for p in model.parameters())  # untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", MOE)
def test_attention_targets_work_and_leave_the_experts_frozen_by_choice(name: str) -> None:
    model = MOE[name].build()
    apply_peft(model, LoRA(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    names = trainable_parameter_names(model)
    assert names and all("self_attn" in n for n in names)
    x = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in names)
