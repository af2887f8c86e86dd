"""Mixture-of-experts models: refuse targets that would silently leave the experts untrained.

transformers 5 stores the experts of Mixtral, Qwen2-MoE and similar models as 3-D parameters of one module
(``MixtralExperts.gate_up_proj``: (experts, 2·ffn, hidden); ``down_proj``: (experts, hidden, ffn)) instead of one
``nn.Linear`` per expert. The linear-layer methods (LoRA, DoRA, IA3, bottleneck adapters) wrap ``nn.Linear``
modules, so such experts are out of their reach. A target list that covers the experts, by name or through
``"all-linear"``, would otherwise attach to everything else and report success while every expert stays
frozen; :func:`refuse_unreachable_experts` makes that an error at attach that names the model class, the
expert weights and what to do instead. Targets that do not mention the experts (the attention projections,
the default) are fine: the experts then stay frozen by choice, as the feed-forward layers of a dense model.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def expert_weights(model: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(module name, parameter name, shape)`` of every 3-D parameter held by an experts module."""
    found = []
    for module_name, module in model.named_modules():
        if "expert" not in type(module).__name__.lower():
            continue
        for local, param in module.named_parameters(recurse=False):
            if param.dim() == 3:
                found.append((module_name, local, tuple(param.shape)))
    return found


def refuse_unreachable_experts(model: nn.Module, target_modules: Sequence[str] | str, method: str) -> None:
    """Raise ``TypeError`` when ``target_modules`` (or ``"all-linear"``) covers expert weights stored as 3-D
    parameters, which ``method`` cannot adapt."""
    from lightning_peft.participation import model_description
    from lightning_peft.targeting import ALL_LINEAR, matches_any

    experts = expert_weights(model)
    if not experts:
        return
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        covered = experts
        how = '"all-linear"'
    else:
        covered = [
            e
            for e in experts
            if matches_any(f"{e[0]}.{e[1]}", target_modules) or matches_any(e[0], target_modules)
        ]
        how = f"target_modules={target_modules!r}"
        if not covered:
            return
    module_name, local, shape = covered[0]
    owner = type(model.get_submodule(module_name)).__name__
    raise TypeError(
        f"{method}: {how} covers the experts of {model_description(model)}: {len(covered)} expert weight "
        f"tensors such as {module_name}.{local} of shape {shape}, stored as 3-D parameters of {owner} rather than "
        f"nn.Linear layers. {method} adapts nn.Linear layers only, so it would leave every expert untrained. "
        "Target the attention or other nn.Linear layers by name instead (e.g. target_modules=['q_proj', "
        "'k_proj', 'v_proj', 'o_proj']), or use prompt/prefix tuning."
    )
