"""Name → method-class registry, used for YAML/JSON round trips and adapter_config.json."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lightning_peft.methods.base import PEFTMethod

_REGISTRY: dict[str, type[PEFTMethod]] = {}


def register_method(cls: type[PEFTMethod]) -> type[PEFTMethod]:
    """Register a method class under its ``method_name`` (usable as a decorator)."""
    if not cls.method_name:
        raise ValueError(f"{cls.__name__}.method_name must be a non-empty string")
    _REGISTRY[cls.method_name] = cls
    # a method saved as a hyperparameter must load with torch.load(weights_only=True), Lightning's default
    torch.serialization.add_safe_globals([cls])
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[PEFTMethod]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"method must be one of {available_methods()}, got {name!r}") from None


def method_from_dict(data: dict[str, Any]) -> PEFTMethod:
    """Rebuild a configuration written by ``PEFTMethod.to_dict``."""
    if not isinstance(data, dict):
        raise ValueError(f"a method configuration must be a JSON object, got {type(data).__name__}: {data!r}")
    data = dict(data)
    name = data.pop("method", "")
    if not isinstance(name, str):
        raise ValueError(f"method must be one of {available_methods()}, got {name!r}")
    # only a registered class is ever built: nothing named in a file is imported or called
    cls = get_method_class(name)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(
            f"{name}: unknown field {unknown[0]!r} in the configuration; allowed: {sorted(fields)}"
        )
    return cls(**data)
