"""HF PEFT ``adapter_config.json`` interop shared by the LoRA family and IA3: our configurations written as
PEFT's (so ``PeftModel.from_pretrained`` loads our folders) and PEFT's read as ours."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from lightning_peft.core.base_model import TASK_TYPES, base_model, base_prefix, task_type_of
from lightning_peft.core.record import saved_module_names
from lightning_peft.core.targeting import _REGEX_CHARS
from lightning_peft.methods.base import PEFTLayer

if TYPE_CHECKING:
    from lightning_peft.methods.lora import LoRA

#: HF PEFT LoRA options lightning-peft does not implement, with the value that means "off"
UNSUPPORTED_LORA_OPTIONS: dict[str, Any] = {
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
}
#: init_lora_weights values that also rewrite the base weights (W_res = W − s·B₀A₀, or a quantised W): the saved
#: A, B only mean something on that modified base. Every other value (True, False, "gaussian", "eva",
#: "orthogonal", "mica") describes only where training started, so it never blocks a load.
BASE_CHANGING_LORA_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
#: peft_type values lightning-peft reads, with the method each becomes
SUPPORTED_PEFT_TYPES = {
    "LORA": "LoRA (DoRA with use_dora=true)",
    "IA3": "IA3",
    "PROMPT_TUNING": "PromptTuning",
    "PREFIX_TUNING": "PrefixTuning",
}


def unsupported_peft_type(config: dict[str, Any], source: str) -> ValueError:
    """The error for an adapter_config.json that no lightning-peft method reads."""
    supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_PEFT_TYPES.items())
    return ValueError(
        f"{source}: peft_type={config.get('peft_type')!r} is not supported by lightning-peft; supported "
        f"peft_type values: {supported}"
    )


def _relative(name: str, prefix: str) -> str | None:
    """``name`` relative to the transformers model, or ``None`` when it lies outside it."""
    if not prefix:
        return name
    return name[len(prefix) :] if name.startswith(prefix) else None


def _peft_list_match(name: str, patterns: Sequence[str]) -> bool:
    # HF PEFT's rule for a list of names: exact match or dotted suffix
    return any(name == p or name.endswith("." + p) for p in patterns)


def _is_plain_list(value: Any) -> bool:
    return isinstance(value, list) and not any(_REGEX_CHARS.search(p) for p in value)


def peft_module_list(
    model: nn.Module,
    wrapped: list[str],
    patterns: list[str] | str | None,
    exclude: list[str] | str | None = None,
    keep: Callable[[str], bool] | None = None,
) -> tuple[list[str], list[str] | None]:
    """``target_modules``/``exclude_modules`` for adapter_config.json that make HF PEFT wrap exactly ``wrapped``
    (module names in ``model``).

    The user's lists are kept when PEFT's matching rule selects the same modules; otherwise (regexes,
    ``"all-linear"``, default patterns, names relative to a LightningModule) the explicit module paths are
    written, which PEFT matches exactly. ``keep`` mirrors PEFT's ``layers_to_transform`` filter, which PEFT
    applies to suffix matches (not to exact names) of a list.
    """
    root, prefix = base_model(model), base_prefix(model)
    rel = sorted(r for r in (_relative(n, prefix) for n in wrapped) if r is not None)
    if _is_plain_list(patterns) and (exclude is None or _is_plain_list(exclude)):
        layers = {n for n, m in root.named_modules() if isinstance(m, PEFTLayer)}
        # names of the model as PEFT would see it before wrapping: nothing below an adapter layer
        names = [n for n, _ in root.named_modules() if n and not any(n.startswith(p + ".") for p in layers)]
        chosen = [
            n
            for n in names
            if _peft_list_match(n, patterns)
            and not _peft_list_match(n, exclude or [])
            and (keep is None or n in patterns or keep(n))
        ]
        if sorted(chosen) == rel:
            return list(patterns), (list(exclude) if exclude is not None else None)
    return rel, None


def peft_common_config(model: nn.Module, peft_type: str) -> dict[str, Any]:
    """Fields every HF PEFT adapter_config.json carries: type, task, base model, modules_to_save."""
    root, prefix = base_model(model), base_prefix(model)
    task_type = task_type_of(root)
    saved = [_relative(n, prefix) for n in saved_module_names(model)]
    task_heads = TASK_TYPES[task_type].heads if task_type in TASK_TYPES else ()
    heads = [n for n, _ in root.named_modules() if n.rpartition(".")[2] in task_heads]
    if any(h not in saved for h in heads):
        # an untrained head is not in the file; without a task_type PEFT keeps the base model's head
        task_type = None
    name_or_path = getattr(getattr(root, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": peft_type,
        "task_type": task_type,
        "base_model_name_or_path": name_or_path,
        "inference_mode": True,
        "modules_to_save": sorted(s for s in saved if s) or None,
    }


def has_conv1d_layers(model: nn.Module, layer_type: type[nn.Module]) -> bool:
    return any(isinstance(m, layer_type) and getattr(m, "fan_in_fan_out", False) for m in model.modules())


def lora_peft_config(method: LoRA, model: nn.Module, use_dora: bool) -> dict[str, Any]:
    """HF PEFT ``LoraConfig`` fields equivalent to ``method`` (a :class:`LoRA` or :class:`DoRA`) on ``model``."""
    from lightning_peft.methods.lora_patterns import in_layers

    wrapped = [n for n, m in model.named_modules() if type(m) is method.layer_class]
    layers, pattern = method.layers_to_transform, method.layers_pattern
    keep = None if layers is None else (lambda name: in_layers(name, layers, pattern))
    targets, exclude = peft_module_list(
        model, wrapped, method.resolved_targets(model), method.exclude_modules, keep=keep
    )
    explicit = targets != method.resolved_targets(model)  # module paths: the block filter is already in them
    return {
        **peft_common_config(model, "LORA"),
        "r": method.r,
        "lora_alpha": method.alpha,
        "lora_dropout": method.dropout,
        "target_modules": targets,
        "exclude_modules": exclude,
        "bias": method.bias,
        "use_rslora": method.use_rslora,
        "use_dora": use_dora,
        "fan_in_fan_out": has_conv1d_layers(model, method.layer_class),
        "init_lora_weights": True,
        # HF PEFT matches these keys by the same rule on the same (transformers-relative) names
        "rank_pattern": dict(method.rank_pattern),
        "alpha_pattern": dict(method.alpha_pattern),
        "layers_to_transform": None if explicit else layers,
        "layers_pattern": None if explicit else pattern,
        "lora_bias": method.lora_bias,
    }


def modules_to_save_from_peft(value: Any) -> list[str]:
    """PEFT's ``modules_to_save`` as ours. PEFT adds ``["classifier", "score"]`` for SEQ_CLS whatever exists in
    the model, so several names become one regex matching any of them (a missing one is then no error)."""
    names = [] if value is None else ([value] if isinstance(value, str) else list(value))
    if len(names) <= 1:
        return names
    return [r"(?:.*\.)?(?:" + "|".join(re.escape(n) for n in names) + ")"]


def check_supported_peft_options(config: dict[str, Any], options: dict[str, Any]) -> None:
    for key, off in options.items():
        value = config.get(key, off)
        if value is not None and value != off:
            raise ValueError(
                f"adapter_config.json: {config.get('peft_type')} option {key}={value!r} is not supported by "
                f"lightning-peft (only {key}={off!r})"
            )


def check_lora_init(config: dict[str, Any]) -> None:
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_LORA_INITS):
        raise ValueError(
            f"adapter_config.json: init_lora_weights={init!r} means the adapter was trained on a base model whose "
            "weights that initialisation rewrote, so its A and B do not apply to the original base. Convert it to a "
            "plain LoRA adapter first (HF PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )


def lora_kwargs_from_peft_config(config: dict[str, Any]) -> dict[str, Any]:
    """:class:`LoRA`/:class:`DoRA` keyword arguments from an HF PEFT LoRA ``adapter_config.json``. Options that
    only describe the initial values (``init_lora_weights``, ``inference_mode``, ...) are ignored."""
    check_supported_peft_options(config, UNSUPPORTED_LORA_OPTIONS)
    check_lora_init(config)
    return {
        "r": config.get("r", 8),
        "alpha": float(config.get("lora_alpha", 8)),
        "dropout": float(config.get("lora_dropout", 0.0)),
        "target_modules": config.get("target_modules"),
        "exclude_modules": config.get("exclude_modules"),
        "modules_to_save": modules_to_save_from_peft(config.get("modules_to_save")),
        "bias": config.get("bias", "none"),
        "use_rslora": bool(config.get("use_rslora", False)),
        "rank_pattern": dict(config.get("rank_pattern") or {}),
        "alpha_pattern": dict(config.get("alpha_pattern") or {}),
        "layers_to_transform": config.get("layers_to_transform"),
        "layers_pattern": config.get("layers_pattern")
        if config.get("layers_to_transform") is not None
        else None,
        "lora_bias": bool(config.get("lora_bias", False)),
    }
