"""AdapterHub's prediction heads (``head_config.json`` + ``pytorch_model_head.bin``) as ``modules_to_save``.

A head is loaded only where it computes what the model's own head computes, so that the model's classifier can
take its weights:

* a static head (``"config": null``, saved from a ``...ForSequenceClassification`` model): the model's own
  ``classifier`` weights, loaded into ``modules_to_save=["classifier"]``;
* a flexible ``classification`` head with ``layers=2``, ``activation_function="tanh"``, ``use_pooler=False``
  and biases: ``Linear → tanh → Linear`` on the first token, which is BERT's pooler followed by its classifier:
  loaded into ``modules_to_save=["pooler.dense", "classifier"]``.

Any other head is refused, saying how to keep the model's own head instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from lightning_peft.files.adapterhub.config import AdapterHubOptionError

HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")


def keep_own_head(source: str) -> str:
    return (
        f"to keep the model's own head, move {HEAD_CONFIG} and {' / '.join(HEAD_WEIGHTS)} out of the folder "
        f"({source})"
    )


def head_modules(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: str
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(``modules_to_save``, their tensors keyed by module path) for an AdapterHub head; refused otherwise."""
    head = config.get("config")
    if head is None:  # a static head: the model's own modules, under their own names
        names = sorted({key.rsplit(".", 1)[0] for key in tensors})
        if names != ["classifier"]:
            raise ValueError(
                f"{source}: the saved head holds {names}, not a classifier; {keep_own_head(source)}"
            )
        return ["classifier"], dict(tensors)
    wanted = {"head_type": "classification", "layers": 2, "activation_function": "tanh", "use_pooler": False}
    for option, value in wanted.items():
        if head.get(option) != value:
            raise AdapterHubOptionError(
                f"{source}: the AdapterHub head's {option}={head.get(option)!r} (lightning-peft maps a "
                f"classification head with layers=2, tanh and use_pooler=False onto BERT's pooler and "
                f"classifier); {keep_own_head(source)}"
            )
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"heads\.[^.]+\.(\d+)\.(weight|bias)", key)
        module = {"1": "pooler.dense", "4": "classifier"}.get(match.group(1)) if match else None
        if match is None or module is None:
            raise ValueError(
                f"{source}: head tensor {key!r} is not one lightning-peft maps; {keep_own_head(source)}"
            )
        out[f"{module}.{match.group(2)}"] = tensor
    if len(out) != 4:
        raise ValueError(f"{source}: the head needs 2 weights and 2 biases, found {sorted(out)}")
    return ["pooler.dense", "classifier"], out
