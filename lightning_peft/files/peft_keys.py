"""Tensor-name differences between HF PEFT's adapter files and the names lightning-peft derives from a model.

HF PEFT wraps a model in ``LoraModel``/``IA3Model`` for the tuner methods, so every saved tensor is named
``base_model.model.<path>``. Prompt-learning methods (prompt and prefix tuning) keep the transformers model itself
as ``base_model``: their ``modules_to_save`` (a SEQ_CLS head) are saved as ``base_model.<path>`` beside the global
``prompt_embeddings``. lightning-peft names everything the tuner way internally and translates here, on the way
to and from the file.
"""

from __future__ import annotations

from typing import Any

import torch

TUNER_PREFIX = "base_model.model."
PROMPT_LEARNING_PREFIX = "base_model."
PROMPT_LEARNING_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")


def to_file_keys(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rename for the ``adapter_config.json`` about to be written (``config``)."""
    if config.get("peft_type") not in PROMPT_LEARNING_TYPES:
        return tensors
    return {
        (PROMPT_LEARNING_PREFIX + k[len(TUNER_PREFIX) :] if k.startswith(TUNER_PREFIX) else k): v
        for k, v in tensors.items()
    }


def from_file_keys(tensors: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Rename a file's keys to those lightning-peft expects (``expected``); unknown keys are left alone so that
    the caller's checks name them."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if (
            key not in expected
            and key.startswith(PROMPT_LEARNING_PREFIX)
            and not key.startswith(TUNER_PREFIX)
        ):
            candidate = TUNER_PREFIX + key[len(PROMPT_LEARNING_PREFIX) :]
            key = candidate if candidate in expected else key
        renamed[key] = value
    return renamed
