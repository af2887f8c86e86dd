"""Per-layer LoRA options shared with HF PEFT: ``rank_pattern``/``alpha_pattern`` (a different rank or alpha
for some layers) and ``layers_to_transform``/``layers_pattern`` (adapt only some transformer blocks).

The matching rules are HF PEFT's, so that one ``adapter_config.json`` means the same thing to both libraries:

* a ``rank_pattern``/``alpha_pattern`` key is a regular expression that must match the end of a module's
  dotted name at a dot boundary, ``re.match(rf"(.*\\.)?({key})$", name)``; the first matching key, in the
  dict's order, wins;
* a module's block index is the first numbered segment of its name (``encoder.layer.3.attention...`` → 3,
  ``transformer.h.0.attn...`` → 0), or the number after one of ``layers_pattern`` when given.

Names are taken relative to the transformers model inside the module given (HF PEFT's names), so a
LightningModule holding ``self.model`` matches the same layers as the bare model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

_FIRST_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def transformers_prefix(model: nn.Module) -> str:
    """``"model."`` when ``model`` holds the transformers model as ``model.model``; ``""`` otherwise (also when
    it holds several and has not said which is the base: names are then matched in full)."""
    from lightning_peft.core.base_model import AmbiguousBaseModelError, base_prefix

    try:
        return base_prefix(model)
    except AmbiguousBaseModelError:
        return ""


def pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """The first key of ``patterns`` that matches ``name`` by HF PEFT's rule, or ``None``."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", name)), None)


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    key = pattern_key(patterns, name)
    return default if key is None else patterns[key]


def layer_index(name: str, layers_pattern: Sequence[str] | None) -> int | None:
    """The transformer block ``name`` lies in, by HF PEFT's rule; ``None`` when it has no numbered segment."""
    if not layers_pattern:
        match = _FIRST_INDEX.match(name)
    else:
        match = None
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))


def in_layers(
    name: str, layers_to_transform: Sequence[int] | None, layers_pattern: Sequence[str] | None
) -> bool:
    if layers_to_transform is None:
        return True
    return layer_index(name, layers_pattern) in set(layers_to_transform)


def inside_modules_to_save(name: str, modules_to_save: Sequence[str]) -> bool:
    """Whether ``name`` is one of ``modules_to_save`` or lies inside one. Such a module trains in full, so (as in
    HF PEFT) no adapter layer goes there: RoBERTa's ``classifier.dense`` is no target of ``["dense"]`` when the
    head is in ``modules_to_save``."""
    from lightning_peft.core.targeting import matches_any

    parts = name.split(".")
    return bool(modules_to_save) and any(
        matches_any(".".join(parts[:i]), list(modules_to_save)) for i in range(1, len(parts) + 1)
    )


# -- validation (called from LoRA.__post_init__) ------------------------------------------------------------
def check_pattern_dict(value: Any, argument: str, integer: bool) -> dict[str, Any]:
    """``rank_pattern``/``alpha_pattern``: regex keys (checked to compile), positive values."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{argument} must be a dict of module-name regex -> value, got {value!r}")
    checked: dict[str, Any] = {}
    for key, number in value.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{argument} keys must be non-empty strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as error:
            raise ValueError(f"{argument} key {key!r} is not a valid regular expression: {error}") from error
        bad = isinstance(number, bool) or not isinstance(number, (int, float)) or not number > 0
        if integer:
            bad = (
                bad or not isinstance(number, int) or (isinstance(number, float) and not number.is_integer())
            )
        if bad:
            kind = "a positive integer" if integer else "a positive number"
            raise ValueError(f"{argument}[{key!r}] must be {kind}, got {number!r}")
        checked[key] = int(number) if integer else float(number)
    return checked


def check_layers_to_transform(value: Any) -> list[int] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(values, Sequence)
        or isinstance(values, str)
        or not values
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
    ):
        raise ValueError(
            f"layers_to_transform must be a non-negative integer or a non-empty list of them, got {value!r}"
        )
    return sorted(set(values))


def check_layers_pattern(value: Any, layers_to_transform: list[int] | None) -> list[str] | None:
    if value is None or value == [] or value == "":
        return None
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, Sequence) or not all(isinstance(v, str) and v for v in values):
        raise TypeError(f"layers_pattern must be a string or a list of strings, got {value!r}")
    if layers_to_transform is None:
        raise ValueError(f"layers_pattern={value!r} is only used with layers_to_transform, which is None")
    return list(values)
