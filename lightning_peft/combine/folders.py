"""``combine_adapter_folders``: several saved LoRA/DoRA adapter folders of one base model → one new adapter folder.

The math is :mod:`lightning_peft.combine.deltas`, layer by layer. Around it:

* every folder is read onto ``model`` in turn (attached, read, taken out again), so the model is unchanged
  afterwards; an adapter that does not adapt a layer contributes a zero update there;
* tensors trained in full (``modules_to_save`` such as a new head, and biases trained with ``bias="all"`` or
  ``"lora_only"``) are combined as task vectors too: ``H = H_base + combine(H_i − H_base)`` (entrywise for
  TIES/DARE, a weighted sum otherwise);
* the result is a plain :class:`~lightning_peft.methods.lora.LoRA` (a :class:`~lightning_peft.methods.dora.DoRA`
  when a DoRA adapter is in the mix) with scaling 1 (``alpha = r``, per-layer ranks in ``rank_pattern``), written
  with :func:`~lightning_peft.files.save.save_adapter`, so HF PEFT loads it too.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lightning_peft.combine.deltas import LoRAFactors, check_combination, combine_deltas, combine_layer
from lightning_peft.core.base_model import relative_name
from lightning_peft.core.record import is_attached
from lightning_peft.files.load import load_adapter, read_adapter_for, state_from_file
from lightning_peft.files.reader import PathLike
from lightning_peft.files.save import save_adapter
from lightning_peft.methods.dora import DoRA, DoRALinear
from lightning_peft.methods.lora import LoRA, LoRALinear, weight_as_out_in
from lightning_peft.methods.lora_patterns import transformers_prefix
from lightning_peft.ops.attach import apply_peft, remove_peft
from lightning_peft.ops.named_adapters import list_adapters, without_adapters
from lightning_peft.ops.parameters import peft_layers
from lightning_peft.ops.state_dict import load_adapter_state

BIAS_ORDER = ("none", "lora_only", "all")


@dataclass
class ReadAdapter:
    """One adapter folder as per-layer factors plus the tensors it trains in full."""

    method: LoRA
    layers: dict[str, LoRAFactors] = field(default_factory=dict)
    full: dict[str, torch.Tensor] = field(default_factory=dict)


def read_lora_folder(model: nn.Module, folder: PathLike) -> ReadAdapter:
    """Attach the folder's adapter to ``model``, read its tensors (without loading them) and take it out."""
    adapter = read_adapter_for(model, folder)  # the same reading and base check as load_adapter
    methods = adapter.methods
    if len(methods) != 1 or not isinstance(methods[0], LoRA):
        names = [type(m).__name__ for m in methods]
        raise ValueError(
            f"combine_adapters combines LoRA and DoRA adapters only; {str(folder)!r} holds {names}"
        )
    apply_peft(model, methods)
    try:
        state = state_from_file(model, adapter)
        read = ReadAdapter(methods[0])
        owned: set[str] = set()
        for name, layer in peft_layers(model):
            if not isinstance(layer, LoRALinear):
                continue
            local = {p: f"{name}.{p}" for p in layer.peft_parameter_names()}
            owned.update(local.values())
            read.layers[name] = LoRAFactors(
                A=state[local["lora_A"]],
                B=state[local["lora_B"]],
                scaling=layer.scaling,
                magnitude=state[local["lora_magnitude_vector"]] if isinstance(layer, DoRALinear) else None,
                bias=state[local["lora_B_bias"]] if layer.lora_B_bias is not None else None,
            )
        # named as in the bare model: which layers are wrapped differs between the adapters and the result
        read.full = {bare_name(k): v for k, v in state.items() if k not in owned}
    finally:
        remove_peft(model)
    return read


def combine_adapter_folders(
    model: nn.Module,
    adapters: Sequence[PathLike],
    weights: Sequence[float],
    path: PathLike,
    how: str = "linear",
    *,
    rank: int | None = None,
    density: float = 0.5,
    majority_sign: str = "total",
    seed: int = 0,
) -> Path:
    """Combine the LoRA/DoRA adapter folders ``adapters`` (all for the base ``model``) with ``weights`` into a new
    adapter folder ``path``; ``how`` is one of ``"linear"``, ``"cat"``, ``"svd"``, ``"ties"``, ``"dare_linear"``,
    ``"dare_ties"`` (formulas in :mod:`lightning_peft.combine.deltas`). ``rank`` truncates the result (default: exact,
    except ``"svd"``: the largest input rank), ``density`` is the kept fraction for TIES/DARE, ``majority_sign``
    TIES' sign election (``"total"`` or ``"frequency"``), ``seed`` DARE's random drop. ``model`` must have no
    adapter attached and is left unchanged."""
    weights = check_combination(how, weights, len(adapters), density, majority_sign)
    if is_attached(model):
        raise ValueError(
            "combine_adapters needs the base model without an adapter attached; call remove_peft first"
        )
    read = [read_lora_folder(model, folder) for folder in adapters]
    names = sorted({name for r in read for name in r.layers})
    combined: dict[str, LoRAFactors] = {}
    for index, name in enumerate(names):
        layer = model.get_submodule(name)
        factors = [r.layers.get(name) or _zero(layer) for r in read]
        dora = any(f.magnitude is not None for f in factors)
        combined[name] = combine_layer(
            factors,
            weights,
            how,
            rank=rank,
            density=density,
            majority_sign=majority_sign,
            base_weight=weight_as_out_in(layer).detach() if dora else None,
            generator=torch.Generator().manual_seed(seed + index),
        )
    method = _combined_method(model, read, combined)
    full = _combined_full(model, read, weights, how, density, majority_sign, seed)
    state: dict[str, torch.Tensor] = {}
    apply_peft(model, method)
    # loading writes the combined heads/biases into the model's own tensors: keep the originals to put back
    originals = {
        n: t.detach().clone() for n, t in model.state_dict().items() if n in set(_trainable_full(model))
    }
    try:
        for name, factors in combined.items():
            state.update({f"{name}.lora_A": factors.A, f"{name}.lora_B": factors.B})
            if factors.magnitude is not None:
                state[f"{name}.lora_magnitude_vector"] = factors.magnitude
            if method.lora_bias:
                bias = factors.bias if factors.bias is not None else torch.zeros_like(factors.B[:, 0])
                state[f"{name}.lora_B_bias"] = bias
        for name, original in originals.items():
            # an adapter that did not train it contributes no change
            state[name] = full.get(bare_name(name), original)
        load_adapter_state(model, state, "combine_adapters")
        return save_adapter(model, path)
    finally:
        model.load_state_dict(originals, strict=False)
        remove_peft(model)


def bare_name(name: str) -> str:
    """A parameter name without the ``base_layer`` infix of an adapter wrapper."""
    return name.replace(".base_layer.", ".")


def _zero(layer: nn.Module) -> LoRAFactors:
    weight = weight_as_out_in(layer)
    out_features, in_features = weight.shape
    empty = {"dtype": weight.dtype, "device": weight.device}
    return LoRAFactors(torch.zeros(0, in_features, **empty), torch.zeros(out_features, 0, **empty), 1.0)


def _combined_method(model: nn.Module, read: list[ReadAdapter], combined: dict[str, LoRAFactors]) -> LoRA:
    prefix = transformers_prefix(model)
    ranks = {name: f.rank for name, f in combined.items()}
    r = max(ranks.values())
    other = {re.escape(relative_name(n, prefix)): k for n, k in ranks.items() if k != r}
    cls = DoRA if any(f.magnitude is not None for f in combined.values()) else LoRA
    return cls(
        r=r,
        alpha=float(r),  # scaling 1: the combined factors carry every adapter's own scaling
        target_modules=list(combined),
        rank_pattern=other,
        alpha_pattern={k: float(v) for k, v in other.items()},
        lora_bias=any(f.bias is not None for f in combined.values()),
        bias=max((x.method.bias for x in read), key=BIAS_ORDER.index),
        modules_to_save=list(dict.fromkeys(m for x in read for m in x.method.modules_to_save)),
    )


def _trainable_full(model: nn.Module) -> list[str]:
    from lightning_peft.ops.parameters import trainable_parameter_names

    owned = {f"{n}.{p}" for n, layer in peft_layers(model) for p in layer.peft_parameter_names()}
    return [n for n in trainable_parameter_names(model) if n not in owned]


def _combined_full(
    model: nn.Module,
    read: list[ReadAdapter],
    weights: list[float],
    how: str,
    density: float,
    majority_sign: str,
    seed: int,
) -> dict[str, torch.Tensor]:
    """modules_to_save and trained biases: base + the combination of the task vectors (value − base)."""
    base = model.state_dict()
    combined: dict[str, torch.Tensor] = {}
    keys = sorted({k for r in read for k in r.full})
    for index, key in enumerate(keys):
        original = base[key].double()
        deltas = [
            r.full[key].double() - original if key in r.full else torch.zeros_like(original) for r in read
        ]
        generator = torch.Generator().manual_seed(seed + 100_003 + index)
        delta = combine_deltas(deltas, weights, how, density, majority_sign, generator)
        combined[key] = (original + delta).to(base[key].dtype)
    return combined


def combine_adapters(
    model: nn.Module,
    adapter_names: Sequence[str],
    weights: Sequence[float],
    new_name: str,
    how: str = "linear",
    *,
    rank: int | None = None,
    density: float = 0.5,
    majority_sign: str = "total",
    seed: int = 0,
) -> None:
    """Combine the named LoRA/DoRA adapters ``adapter_names`` loaded on ``model`` with ``weights`` into a new
    adapter ``new_name`` on the same model (added switched off, like :func:`~lightning_peft.add_adapter`).
    ``how`` and the options are those of :func:`combine_adapter_folders`, whose formulas take each adapter's
    own scaling (rsLoRA included), rank, ``lora_bias`` and DoRA magnitude into account."""
    if new_name in list_adapters(model):
        raise ValueError(f"combine_adapters: new_name={new_name!r} is already loaded; choose another name")
    with tempfile.TemporaryDirectory() as tmp:
        folders = [
            save_adapter(model, Path(tmp) / f"in{i}", adapter_name=n) for i, n in enumerate(adapter_names)
        ]
        out = Path(tmp) / "combined"
        with without_adapters(model):
            combine_adapter_folders(
                model,
                folders,
                weights,
                out,
                how,
                rank=rank,
                density=density,
                majority_sign=majority_sign,
                seed=seed,
            )
        load_adapter(model, out, adapter_name=new_name)
