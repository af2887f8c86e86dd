"""One source of truth for an adapter folder's configuration: ``adapter_config.json``.

``save_adapter`` also records the method configurations in the safetensors header (``__metadata__``), because
HF PEFT's JSON cannot express everything lightning-peft's configurations hold (name patterns, for example).
When both are present they must agree on everything the JSON states; a user who edits ``r`` or ``peft_type``
in the JSON gets an error naming the field instead of the header silently winning.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lightning_peft.files.names import LABEL_NAMES_KEY
from lightning_peft.methods.base import PEFTMethod
from lightning_peft.methods.registry import method_from_dict

#: LoRA's and DoRA's fields (DoRA is LoRA with a magnitude; their JSON keys are the same)
_LORA_JSON_FIELDS: dict[str, str] = {
    "r": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "bias": "bias",
    "use_rslora": "use_rslora",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
    "layers_to_transform": "layers_to_transform",
    "lora_bias": "lora_bias",
}

#: method name -> {configuration field: HF PEFT adapter_config.json key} for the fields PEFT's JSON carries
PEFT_JSON_FIELDS: dict[str, dict[str, str]] = {
    "lora": _LORA_JSON_FIELDS,
    "dora": _LORA_JSON_FIELDS,
    "prefix": {"num_virtual_tokens": "num_virtual_tokens", "encoder_hidden_size": "encoder_hidden_size"},
    "prompt": {"num_virtual_tokens": "num_virtual_tokens"},
    "ia3": {},
}


#: fields that only decide an adapter's *initial* values, per method name. A file provides the values, so a
#: configuration read from a file has them reset: a prompt's init text would otherwise make loading fetch the
#: tokenizer that the file names (a path or a hub name chosen by whoever wrote the file)
INIT_ONLY_FIELDS: dict[str, dict[str, Any]] = {
    "prompt": {"init": "random", "init_text": None, "tokenizer_name_or_path": None},
}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; errors name the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def methods_from(meta: Any, source: str) -> list[PEFTMethod]:
    """Method configurations from our metadata ``{"methods": [...]}``; errors name ``source``."""
    methods = meta.get("methods") if isinstance(meta, dict) else None
    if not isinstance(methods, list) or not methods:
        raise ValueError(
            f"{source}: 'methods' must be a non-empty list of method configurations, got {methods!r}"
        )
    try:
        built = [method_from_dict(d) for d in methods]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from None
    return [dataclasses.replace(m, **INIT_ONLY_FIELDS.get(m.method_name, {})) for m in built]


def _differing_field(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    return next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), None)


def reconcile(
    config: dict[str, Any],
    json_methods: list[PEFTMethod] | None,
    header: str | None,
    config_file: Path,
    ours: bool = False,
) -> list[PEFTMethod]:
    """The configuration of a folder whose JSON gave ``json_methods`` (``ours``: lightning-peft's own JSON;
    otherwise HF PEFT's, ``None`` when it names no known method), checked against the safetensors header's
    ``header`` metadata."""
    if header is None:
        if json_methods is None:
            raise AssertionError("reconcile needs the JSON's methods when there is no header")
        return json_methods
    header_meta = _loads(header, config_file)
    header_methods = methods_from(header_meta, f"{config_file.parent} (safetensors header)")
    if json_methods is not None and ours:
        for index, (ours, theirs) in enumerate(zip(json_methods, header_methods)):
            field = _differing_field(ours.to_dict(), theirs.to_dict())
            if field is not None:
                _mismatch(
                    config_file,
                    f"methods[{index}].{field}",
                    ours.to_dict().get(field),
                    theirs.to_dict().get(field),
                )
        if len(json_methods) != len(header_methods):
            _mismatch(config_file, "methods", len(json_methods), len(header_methods))
        return json_methods
    # an HF PEFT JSON: compare what it states with the header's single method
    described = json_methods[0] if json_methods else None
    header_method = header_methods[0]
    if len(header_methods) != 1 or described is None or type(described) is not type(header_method):
        found = (
            type(header_method).__name__
            if len(header_methods) == 1
            else [type(m).__name__ for m in header_methods]
        )
        _mismatch(config_file, "peft_type", config.get("peft_type"), found)
    for field, key in PEFT_JSON_FIELDS.get(header_method.method_name, {}).items():
        if key in config and getattr(described, field) != getattr(header_method, field):
            _mismatch(config_file, key, config[key], getattr(header_method, field))
    written = header_meta.get("peft_config") if isinstance(header_meta, dict) else None
    if isinstance(written, dict):  # the JSON as save_adapter wrote it: every other field must be unchanged
        for key in sorted((set(written) | set(config)) - DESCRIPTIVE_JSON_KEYS):
            if config.get(key) != written.get(key):
                _mismatch(config_file, key, config.get(key), written.get(key))
    return header_methods


#: adapter_config.json keys that describe where the adapter came from rather than what it computes: users and
#: tools (``lightning-peft fit`` adds ``label_names``) may change them
DESCRIPTIVE_JSON_KEYS = frozenset(
    {"base_model_name_or_path", "revision", "inference_mode", LABEL_NAMES_KEY, "auto_mapping", "peft_version"}
)


def _loads(text: str, config_file: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{config_file.parent}: the safetensors header's configuration is not JSON ({error})"
        ) from None


def _mismatch(config_file: Path, field: str, json_value: Any, header_value: Any) -> None:
    raise ValueError(
        f"{config_file}: field {field!r} is {json_value!r} here but {header_value!r} in the safetensors header of "
        "the same folder; adapter_config.json is the configuration, so the two must agree (was the JSON edited "
        "by hand? Save the adapter again, or edit the JSON back)"
    )
