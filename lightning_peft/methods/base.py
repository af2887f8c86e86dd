"""The shared interface every PEFT method implements.

A method is two things:

* a configuration dataclass deriving from :class:`PEFTMethod`. It validates its own fields in
  ``__post_init__``, finds its targets in a model without touching it (:meth:`PEFTMethod.plan`) and then
  attaches itself (:meth:`PEFTMethod.inject`);
* zero or more :class:`PEFTLayer` modules that it puts into the model. A layer knows which of its own
  parameters are the adapter's (:meth:`PEFTLayer.peft_parameter_names`), how to merge itself into the base
  weights and back, and how to give the base layer back (:meth:`PEFTLayer.unload`).

Everything else (freezing, trainable-parameter bookkeeping, checkpoint filtering, merge of a whole model,
save/load) is generic and lives in :mod:`lightning_peft.ops.attach`, so a new method is one new file plus one
registration line in :mod:`lightning_peft.methods`.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from lightning_peft.core.record import DEFAULT_ADAPTER_NAME
from lightning_peft.core.targeting import ModuleTargets


class MixedBatchRouting(Protocol):
    """Per-sample adapters of the forward pass or ``generate`` in progress (``adapter_names=[...]``); built by
    :mod:`lightning_peft.ops.mixed_batch`, read by every :class:`PEFTLayer` call."""

    def call(self, layer: PEFTLayer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run ``layer`` on the mixed batch."""

    def rows(self, adapter_name: str, batch: int, device: torch.device) -> torch.Tensor:
        """Indices (int64, on ``device``) of the rows of a ``batch``-row input that use ``adapter_name``."""


#: the routing of the mixed batch in progress (``model(..., adapter_names=[...])``), or None
ADAPTER_ROUTING: ContextVar[MixedBatchRouting | None] = ContextVar(
    "lightning_peft_adapter_routing", default=None
)
#: attributes of the wrapped layer that a wrapper exposes as its own: transformers code reads them on the module
#: it holds (T5's feed-forward reads ``self.wo.weight.dtype``, other models ``.bias``, ``.in_features``)
WRAPPED_ATTRIBUTES = frozenset({"weight", "bias", "in_features", "out_features", "dtype", "device"})

#: a merge factor this close to zero cannot be divided out exactly; layers then keep a copy of the base weight
EXACT_UNMERGE_EPS = 1e-4


class PEFTLayer(nn.Module):
    """Base class for every module a PEFT method inserts into a model."""

    #: whether :meth:`merge` folds the adapter into the base weights
    mergeable: ClassVar[bool] = False
    #: local parameter name -> name used in HF PEFT's adapter_model.safetensors (when they differ)
    peft_names: ClassVar[dict[str, str]] = {}
    #: whether several transformer layers use one of its parameters (prefix tuning's prefix matrix), which
    #: DDP cannot reduce under reentrant activation checkpointing without ``static_graph``
    shared_across_layers: ClassVar[bool] = False

    #: lets the ground-floor target matching recognise adapter layers without importing this class
    is_peft_layer: ClassVar[bool] = True
    #: whether one batch may mix samples that use this layer's adapter with samples that do not
    #: (``adapter_names=`` on the model's forward); false for layers that change the sequence length
    supports_mixed_batch: ClassVar[bool] = True
    #: whether ``forward`` computes a mixed batch with one pass of the wrapped module (:meth:`mixed_forward`);
    #: other layers run the wrapped module once more for the rows of their adapter
    routes_rows: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.merged = False
        #: whether the layer's initial value depends on base weights that may still change before training
        #: (meta-device materialisation, base weights loaded after attaching): :meth:`init_from_base` then
        #: runs once more at the start of training. Cleared by that, and by loading the adapter's tensors.
        self.init_pending = False
        #: the named adapter this layer belongs to, and whether it runs in ``forward``
        self.adapter_name = DEFAULT_ADAPTER_NAME
        self.active = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        routing = ADAPTER_ROUTING.get()
        if routing is None:
            if self.active or self.merged:
                return super().__call__(*args, **kwargs)
            return self.base_layer(*args, **kwargs)  # a switched-off adapter: the wrapped module alone
        # a mixed batch (``adapter_names=``): lightning_peft.ops.mixed_batch decides what runs on which rows
        return routing.call(self, args, kwargs)

    # -- mixed batches: one base pass, each adapter on its own rows ----------------------------------------
    def routed_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """Inside a mixed batch, the indices of the rows of ``x`` (dim 0) that this layer's adapter serves;
        ``None`` outside one, and when the adapter serves every row (the plain ``forward`` is then exact)."""
        routing = ADAPTER_ROUTING.get()
        if routing is None:
            return None
        rows = routing.rows(self.adapter_name, x.shape[0], x.device)
        return None if rows.numel() == x.shape[0] else rows

    def mixed_forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The layer on a mixed batch: the wrapped module runs once on every row, the adapter only on ``rows``:

            y = base(x'),  x'_i = adapted input of row i if i ∈ rows else x_i;  then y_i ← adapted y_i for i ∈ rows

        so each row gets exactly what it would get in a batch of its own adapter."""
        result = self.base_layer(self.mixed_input(x, rows))  # (batch, ..., out)
        return self.mixed_output(x, result, rows)  # (batch, ..., out)

    def mixed_input(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``x`` with the adapter's change of its own rows' input (default: none)."""
        return x

    def mixed_output(self, x: torch.Tensor, result: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``result`` (the wrapped module's output for every row) with the adapter applied to ``rows``."""
        raise NotImplementedError(f"{type(self).__name__} does not compute mixed batches row by row")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in WRAPPED_ATTRIBUTES:
                raise
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None:
                raise
            if name in ("dtype", "device") and not hasattr(base, name):
                tensor = getattr(base, "weight", None)
                if not isinstance(tensor, torch.Tensor):
                    tensor = next(base.parameters(), None)
                if tensor is None:
                    raise
                return getattr(tensor, name)
            return getattr(base, name)

    def reset_parameters(self) -> None:
        """Put the adapter's own parameters at their documented initial value (Lightning calls this on every
        module after materialising a meta-device model). Layers with parameters override it."""

    def init_from_base(self) -> None:
        """Recompute the parts of the initial value that depend on the base weights (see ``init_pending``)."""
        self.init_pending = False

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # loading the adapter's own tensors replaces the initial value: nothing to recompute any more
        if any(prefix + local in state_dict for local in self.peft_parameter_names() if "." not in local):
            self.init_pending = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def peft_parameter_names(self) -> list[str]:
        """Local names of the parameters that belong to the adapter (trained and saved)."""
        return [name for name, _ in self.named_parameters() if not name.startswith("base_layer.")]

    def peft_key(self, module_path: str, local_name: str) -> str:
        """Key of one of this layer's tensors in an HF-PEFT-format ``adapter_model.safetensors``.

        ``module_path`` is the layer's name relative to the transformers model (or the root module).
        """
        local = self.peft_names.get(local_name, local_name)
        return f"base_model.model.{module_path}.{local}" if module_path else f"base_model.model.{local}"

    def saved_tensors(self) -> dict[str, torch.Tensor] | None:
        """Tensors (local name -> tensor) that ``save_adapter`` writes instead of this layer's own parameters,
        or ``None`` (default) to write the parameters themselves. Used when the trained form differs from the
        used form, e.g. prefix tuning's reparameterisation MLP, folded into plain prefixes."""
        return None

    def merge(self) -> None:
        """Fold the adapter into the base layer's weights (only for mergeable layers)."""
        raise TypeError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        raise TypeError(f"{type(self).__name__} cannot be merged into the base weights")

    def unload(self) -> nn.Module | None:
        """The module to put back in place of this layer on ``merge_and_unload``.

        ``None`` means "remove this layer" (used by layers that are extra children, not wrappers).
        """
        raise TypeError(f"{type(self).__name__} cannot be unloaded from the model")


#: below this many elements a row scatter-add runs serially (``index_put_``): ``index_add_`` opens a parallel
#: region per call (about 20 µs, far more on a busy machine), ``index_put_(accumulate=True)`` is serial and
#: slow for large slices; torch's own parallel grain size
SERIAL_SCATTER_NUMEL = 32768


def add_to_rows(
    result: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor, in_place: bool = True
) -> torch.Tensor:
    """``result[rows[j]] += delta[j]`` along dim 0 (``rows`` unique), in place unless ``in_place=False``."""
    if delta.numel() < SERIAL_SCATTER_NUMEL:
        put = result.index_put_ if in_place else result.index_put
        return put((rows,), delta, accumulate=True)
    return result.index_add_(0, rows, delta) if in_place else result.index_add(0, rows, delta)


def kaiming_uniform_(tensor: torch.Tensor, fan_in: int) -> None:
    """``torch.nn.init.kaiming_uniform_(tensor, a=√5)`` (nn.Linear's default) written with tensor methods:
    ``Trainer.init_module(empty_init=True)`` turns ``torch.nn.init`` into no-ops, but a new adapter is never
    loaded from the base checkpoint, so it must always be initialised. Same bound, same random draws."""
    if tensor.device.type == "meta":
        return
    a = math.sqrt(5)
    std = math.sqrt(2.0 / (1 + a**2)) / math.sqrt(fan_in) if fan_in > 0 else 0.0
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        tensor.uniform_(-bound, bound)


class AdapterLinear(nn.Linear):
    """An ``nn.Linear`` owned by an adapter: initialised like ``nn.Linear`` also under ``empty_init``."""

    def reset_parameters(self) -> None:
        kaiming_uniform_(self.weight, self.in_features)
        if self.bias is not None and self.bias.device.type != "meta":
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)


class ZeroLinear(nn.Linear):
    """An ``nn.Linear`` that starts, and on ``reset_parameters`` restarts, at zero (an adapter's last layer,
    so that the adapter is the identity at init, also after meta-device materialisation)."""

    def reset_parameters(self) -> None:
        if self.weight.device.type == "meta":
            return
        with torch.no_grad():
            self.weight.zero_()
            if self.bias is not None:
                self.bias.zero_()


@dataclass(kw_only=True)
class PEFTMethod(ABC):  # noqa: B024 - ABC (with no abstract methods): jsonargparse then accepts subclasses by class_path
    """Base configuration shared by all PEFT methods."""

    #: registry name, also written to adapter_config.json
    method_name: ClassVar[str] = ""
    #: whether the method's layers can be folded into the base weights
    mergeable: ClassVar[bool] = False

    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter, e.g. ``["classifier"]`` for a new head. Matched
    like ``target_modules`` entries: exact name or dotted suffix."""

    def __post_init__(self) -> None:
        self.modules_to_save = _as_str_list(self.modules_to_save, "modules_to_save")

    # -- the interface -------------------------------------------------------------------------------
    def plan(self, model: nn.Module) -> ModuleTargets:
        """Find and validate this method's targets in ``model`` without modifying it.

        Raises ``ValueError``/``TypeError`` for anything that would make :meth:`inject` fail, so that a
        model is never left half-modified.
        """
        raise NotImplementedError

    def inject(self, model: nn.Module, targets: ModuleTargets) -> None:
        """Attach the method to the ``targets`` found by :meth:`plan`."""
        raise NotImplementedError

    # -- serialisation -------------------------------------------------------------------------------
    def saved_config(self) -> PEFTMethod:
        """The configuration describing what ``save_adapter`` writes (default: this one); differs when a
        layer's :meth:`PEFTLayer.saved_tensors` changes form (prefix tuning trained with a projection)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method_name, **dataclasses.asdict(self)}

    def peft_config(self, model: nn.Module) -> dict[str, Any] | None:
        """The equivalent HF PEFT ``adapter_config.json`` fields, or ``None`` when PEFT has no equivalent."""
        return None

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> PEFTMethod | None:
        """Build this method from an HF PEFT ``adapter_config.json``, or ``None`` if it is not this method's."""
        return None


def _as_str_list(value: Any, argument: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{argument} must be a list of strings, got {value!r}")
    return list(value)


def check_positive_int(value: Any, argument: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{argument} must be a positive integer, got {value!r}")


def check_positive_float(value: Any, argument: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{argument} must be a positive number, got {value!r}")


def check_probability(value: Any, argument: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{argument} must be a float in [0, 1), got {value!r}")


def check_choice(value: Any, argument: str, choices: Sequence[str]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{argument} must be one of {allowed}, got {value!r}")
