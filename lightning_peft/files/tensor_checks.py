"""Checks on the values read from an adapter file, before any of them reaches the model.

Every error names the file, the tensor and what was expected versus what was found:

* a truncated or corrupt ``adapter_model.safetensors`` (the header is parsed here first, as JSON, and every
  tensor's byte range is checked against the file's size, before :mod:`lightning_peft.files.reader` loads it);
* a tensor whose dtype cannot hold the parameter's values (an integer or boolean tensor for a floating-point
  parameter); floating-point dtypes may differ, the values are cast as ``load_state_dict`` does;
* NaN or Inf values, refused unless ``allow_nonfinite=True``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: bytes per element of the dtypes a safetensors header may name
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
#: the largest header we read (safetensors itself refuses more than 100 MB)
MAX_HEADER_BYTES = 100_000_000


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header dict, number of data bytes after it), or a ValueError naming what is wrong."""
    size = path.stat().st_size
    if size < 8:
        raise ValueError(
            f"{path}: truncated file: expected at least 8 bytes (the header length), found {size}"
        )
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(
                f"{path}: truncated or corrupt file: the header claims {length} bytes, the file holds {size - 8}"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: corrupt file: its header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt file: its header is a {type(header).__name__}, expected an object")
    return header, size - 8 - length


def check_tensor_file(path: str | os.PathLike) -> None:
    """Check a safetensors file's structure before it is loaded: a readable header, known dtypes, byte ranges
    that fit the shapes and the file's size. Errors name the file and the tensor."""
    path = Path(path)
    header, data_bytes = read_header(path)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ValueError(f"{path}: tensor {name!r}: corrupt header entry {info!r}")
        dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise ValueError(
                f"{path}: tensor {name!r}: unknown dtype {dtype!r}; expected one of {sorted(DTYPE_SIZES)}"
            )
        expected = DTYPE_SIZES[dtype] * _numel(shape)
        if end - start != expected:
            raise ValueError(
                f"{path}: tensor {name!r}: shape {shape} of {dtype} needs {expected} bytes, "
                f"the header gives it {end - start}"
            )
        if end > data_bytes:
            raise ValueError(
                f"{path}: truncated file: tensor {name!r} needs bytes {start}..{end} of the data, "
                f"the file holds {data_bytes}"
            )


def _numel(shape: Any) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN/Inf values, naming the tensor and how many values are bad."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = ~torch.isfinite(tensor)
            if bool(bad.any()):
                nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
                raise ValueError(
                    f"{source}: tensor {name!r} holds non-finite values ({nan} NaN, {inf} Inf of "
                    f"{tensor.numel()}); expected finite numbers. Pass allow_nonfinite=True to load it anyway"
                )


def check_dtypes(
    model: nn.Module, state: dict[str, torch.Tensor], file_keys: dict[str, str], source: str
) -> None:
    """A floating-point parameter needs a floating-point tensor (``state`` is keyed by parameter name;
    ``file_keys`` maps those names to the file's keys, for the message)."""
    from lightning_peft.ops.state_dict import state_dict_key

    params = {state_dict_key(n): p for n, p in model.named_parameters()}
    for name, tensor in state.items():
        param = params.get(name)
        if param is not None and param.is_floating_point() and not tensor.is_floating_point():
            raise ValueError(
                f"{source}: tensor {file_keys.get(name, name)!r} has dtype {tensor.dtype}; expected a "
                f"floating-point tensor (the model's parameter is {param.dtype})"
            )
