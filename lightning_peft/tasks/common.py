"""Helpers shared by the task modules: bitsandbytes loading arguments, the linear warm-up schedule, data paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

#: ``quantization=...`` of the task modules: transformers ``BitsAndBytesConfig`` arguments per name
QUANTIZATIONS: dict[str, dict[str, Any]] = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "nf4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "fp4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}

#: environment variable naming the folder that holds the data sets (``sst2/``, ``bbc_news/``)
DATA_ENV = "LIGHTNING_PEFT_DATA"


def quantization_kwargs(
    quantization: str | None,
    device_map: str | None = None,
    skip_modules: tuple[str, ...] = ("classifier",),
    **settings: Any,
) -> dict[str, Any]:
    """``from_pretrained`` arguments loading the base with bitsandbytes.

    Args:
        quantization: a key of :data:`QUANTIZATIONS`, or ``None`` (full precision: returns ``{}``).
        device_map: where to load (default: the GPU if there is one, else the CPU).
        skip_modules: modules kept in full precision (a new classification head, a causal LM's ``lm_head``).
        settings: override ``BitsAndBytesConfig`` arguments.
    """
    if quantization is None:
        return {}
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None or one of {sorted(QUANTIZATIONS)}, got {quantization!r}")
    from transformers import BitsAndBytesConfig

    config: dict[str, Any] = dict(QUANTIZATIONS[quantization], llm_int8_skip_modules=list(skip_modules))
    if config.get("load_in_4bit"):
        config["bnb_4bit_compute_dtype"] = torch.float32
    config.update(settings)
    device = device_map or ("cuda" if torch.cuda.is_available() else "cpu")
    return {"quantization_config": BitsAndBytesConfig(**config), "device_map": device}


def linear_warmup_decay(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio`` of ``total_steps`` optimizer steps, then linear decay to 0."""
    total = max(int(total_steps), 1)
    warmup = max(int(total * warmup_ratio), 1)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(total - warmup, 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def default_data_dir(name: str) -> Path:
    """Where data set ``name`` (``"sst2"``, ``"bbc_news"``) is looked for when no folder is given.

    ``$LIGHTNING_PEFT_DATA/<name>`` when that variable is set, else ``../shared/data/<name>`` relative to the
    current working directory (the layout of a checkout next to a ``shared`` folder). It does not depend on where
    the package is installed.
    """
    root = os.environ.get(DATA_ENV)
    base = Path(root).expanduser() if root else Path.cwd() / ".." / "shared" / "data"
    return (base / name).resolve()


def missing_data_error(folder: Path, wanted: str) -> FileNotFoundError:
    """The error raised when a data folder lacks a file: names the path and how to point elsewhere."""
    return FileNotFoundError(
        f"data_dir={str(folder)!r} has no {wanted}: pass data_dir (the folder with train/validation/test files) "
        f"or set {DATA_ENV} to the folder that holds the data sets (e.g. {DATA_ENV}=/path/to/data for "
        "/path/to/data/sst2)"
    )
