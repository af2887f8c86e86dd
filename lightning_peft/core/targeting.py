"""Which modules a method attaches to.

``target_modules`` accepts:

* a list of names, each matching a module whose full dotted name equals it or ends with ``"." + name``
  (``"query"`` matches ``bert.encoder.layer.0.attention.self.query``; ``"output.dense"`` matches both
  ``attention.output.dense`` and ``layer.0.output.dense``);
* list entries that look like regular expressions (they contain one of ``*+?[](){}|^$\\``) are matched
  against the full dotted name with ``re.fullmatch``;
* a single string, which is a regular expression matched with ``re.fullmatch`` (as in HF PEFT);
* ``"all-linear"``: every ``nn.Linear`` and GPT-2 ``Conv1D`` except the output head.

``exclude_modules`` uses the same syntax and removes matches.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

from lightning_peft.core.base_model import model_description

ModuleTargets = list[str]
ALL_LINEAR = "all-linear"
_REGEX_CHARS = re.compile(r"[*+?\[\](){}|^$\\]")
#: names used for output heads by transformers models; never targeted by "all-linear"
HEAD_NAMES = (
    "classifier",
    "lm_head",
    "score",
    "qa_outputs",
    "cls",
    "pooler.dense",
    "embed_out",
    "output_layer",
)


def conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency, but keep plain-torch use working
        return None
    return Conv1D


def is_linear_like(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored as (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_features, out_features = module.weight.shape
    return int(in_features), int(out_features)


def name_matches(name: str, pattern: str) -> bool:
    if _REGEX_CHARS.search(pattern):
        return re.fullmatch(pattern, name) is not None
    return name == pattern or name.endswith("." + pattern)


def matches_any(name: str, patterns: Sequence[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name_matches(name, p) for p in patterns)


def output_head_names(model: nn.Module) -> set[str]:
    """Module names of the model's output head(s)."""
    heads = {name for name, _ in model.named_modules() if name and matches_any(name, list(HEAD_NAMES))}
    # a head is excluded together with everything below it (e.g. classifier.dense, classifier.out_proj)
    names = {name for name, _ in model.named_modules()}
    for _name, module in model.named_modules():
        get_out = getattr(module, "get_output_embeddings", None)
        if callable(get_out):
            try:
                out = get_out()
            except Exception:  # noqa: BLE001 - some models raise NotImplementedError here
                out = None
            if out is not None:
                heads |= {n for n, m in model.named_modules() if m is out}
    return {n for n in names if any(n == h or n.startswith(h + ".") for h in heads)}


def candidate_names(
    model: nn.Module, predicate: Callable[[nn.Module], bool] = is_linear_like, limit: int = 20
) -> list[str]:
    """Distinct short names of layers a user could target, for error messages."""
    seen: list[str] = []
    for name, module in model.named_modules():
        if not name or not predicate(module):
            continue
        parts = [p for p in name.split(".") if not p.isdigit()]
        short = ".".join(parts[-2:]) if len(parts) > 1 else parts[-1]
        if short not in seen:
            seen.append(short)
        if len(seen) >= limit:
            break
    return seen


def innermost(module: nn.Module) -> nn.Module:
    """The module an adapter layer (or a stack of them, one per named adapter) wraps; ``module`` otherwise."""
    while getattr(module, "is_peft_layer", False) and "base_layer" in module._modules:
        module = module._modules["base_layer"]  # type: ignore[assignment]
    return module


def inside_adapter_layers(model: nn.Module) -> set[str]:
    """Names of the modules below an adapter layer: what another adapter must not target on its own."""
    layers = [n for n, m in model.named_modules() if getattr(m, "is_peft_layer", False)]
    return {n for n, _ in model.named_modules() if any(n.startswith(f"{p}.") for p in layers if p)}


def wrap_target(model: nn.Module, name: str, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Replace the module ``name`` by ``make(module)``. When an adapter already wraps it (another named
    adapter), the new layer is built for the innermost module and then wraps the existing adapter, so that
    it computes its update on the layer's input and adds it to everything below."""
    current = model.get_submodule(name)
    layer = make(innermost(current))
    if current is not innermost(current):
        layer.base_layer = current
    replace_module(model, name, layer)
    return layer


def find_targets(
    model: nn.Module,
    target_modules: Sequence[str] | str,
    exclude_modules: Sequence[str] | str | None = None,
    *,
    supported: Callable[[nn.Module], bool] = is_linear_like,
    supported_desc: str = "nn.Linear or transformers Conv1D",
    method: str = "this method",
    skip: Callable[[str, nn.Module], bool] | None = None,
) -> ModuleTargets:
    """Names of the modules matched by ``target_modules`` minus ``exclude_modules``.

    Raises ``ValueError`` when nothing matches (listing candidates) and ``TypeError`` when a matched
    module has a type the method cannot wrap.
    """
    refuse_unreachable_experts(model, target_modules, method)  # experts stored as 3-D parameters
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        heads = output_head_names(model)
        names = [n for n, m in model.named_modules() if n and is_linear_like(innermost(m)) and n not in heads]
    else:
        names = [n for n, _ in model.named_modules() if n and matches_any(n, target_modules)]
    hidden = inside_adapter_layers(model)
    names = [n for n in names if n not in hidden and not matches_any(n, exclude_modules)]
    modules = {n: innermost(m) for n, m in model.named_modules()}
    if skip is not None:
        names = [n for n in names if not skip(n, modules[n])]
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no module of "
            f"{type(model).__name__} for {method}. Candidate layer names: {candidate_names(model, supported)}"
        )
    # a pattern may match containers too (e.g. "attention" matches the block); keep the supported leaves
    # when the user gave a list of names, but reject a matched module whose type is plainly wrong
    bad = [n for n in names if not supported(modules[n])]
    if bad:
        example = bad[0]
        raise TypeError(
            f"target_modules={target_modules!r} matched {example!r} of type {type(modules[example]).__name__}, "
            f"but {method} supports only {supported_desc}. Candidate layer names: "
            f"{candidate_names(model, supported)}"
        )
    return names


# -- mixture-of-experts models ---------------------------------------------------------------------------
# Mixture-of-experts models: refuse targets that would silently leave the experts untrained.
#
# transformers 5 stores the experts of Mixtral, Qwen2-MoE and similar models as 3-D parameters of one module
# (``MixtralExperts.gate_up_proj``: (experts, 2·ffn, hidden); ``down_proj``: (experts, hidden, ffn)) instead of one
# ``nn.Linear`` per expert. The linear-layer methods (LoRA, DoRA, IA3, bottleneck adapters) wrap ``nn.Linear``
# modules, so such experts are out of their reach. A target list that covers the experts, by name or through
# ``"all-linear"``, would otherwise attach to everything else and report success while every expert stays
# frozen; :func:`refuse_unreachable_experts` makes that an error at attach that names the model class, the
# expert weights and what to do instead. Targets that do not mention the experts (the attention projections,
# the default) are fine: the experts then stay frozen by choice, as the feed-forward layers of a dense model.


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


def resolve_modules(model: nn.Module, patterns: Sequence[str], argument: str) -> list[str]:
    """Module names for ``modules_to_save``-style lists (exact name or dotted suffix); error when one is missing."""
    names: list[str] = []
    all_names = [n for n, _ in model.named_modules() if n]
    for pattern in patterns:
        found = [n for n in all_names if name_matches(n, pattern)]
        if not found:
            raise ValueError(
                f"{argument} entry {pattern!r} matched no module of {type(model).__name__}. "
                f"Top-level modules: {[n for n in all_names if '.' not in n][:20]}"
            )
        # keep only outermost matches so that a head is counted once
        for n in found:
            if not any(n.startswith(o + ".") for o in found if o != n) and n not in names:
                names.append(n)
    return names


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_parent(model, name)
    setattr(parent, child, new)
