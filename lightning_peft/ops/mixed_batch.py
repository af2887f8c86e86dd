"""Mixed batches: one adapter per sample in one forward pass or one ``generate()``, at the cost of one base pass.

``model(..., adapter_names=["a", "b", "__base__", ...])`` gives sample ``i`` the adapter ``adapter_names[i]``
(``"__base__"``: none). Every adapted layer computes, with ``R_a`` the rows that name adapter ``a``,

    y = base(x')                       the frozen layer once, on the whole batch
    y[R_a] ← adapted(x[R_a], y[R_a])   each adapter on its own rows only (a gather, its small matmuls, a scatter)

where ``x'`` is ``x`` with the input-side changes of each adapter on its rows ((IA)³ on feed-forward layers).
LoRA adds ``s · B A x_i``, DoRA rescales its rows by ``m / ‖W + s B A‖``, (IA)³ scales its rows, a bottleneck
adapter adds its MLP of its rows; ``"__base__"`` rows keep ``y``. Rows do not interact, so each sample gets
exactly what a batch of its own adapter gives, with or without gradients. The layer math is in each method's
``mixed_output``/``mixed_input`` (:class:`~lightning_peft.methods.base.PEFTLayer`); this module holds the
routing: which rows use which adapter, the hooks that read ``adapter_names`` from the root's ``forward``, and
``generate(..., adapter_names=[...])``, whose names follow the beams (row ``i·k + j`` of a batch expanded ``k``
times by ``num_beams`` or ``num_return_sequences`` belongs to sample ``i``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_peft.core.base_model import outermost_models
from lightning_peft.core.record import get_record
from lightning_peft.methods.base import ADAPTER_ROUTING, PEFTLayer

#: the name that selects no adapter in ``adapter_names``
BASE_NAME = "__base__"


class AdapterRouting:
    """The per-sample adapters of one forward pass or one ``generate`` call (the value of ``ADAPTER_ROUTING``).

    ``expand``: the batch may also reach the layers repeated ``expand`` times per sample (``generate`` with
    beams); ``previous``: the routing to restore afterwards; ``from_forward``: set by the root's forward hook
    (which ends it) rather than by ``generate``."""

    def __init__(
        self,
        names: Sequence[str],
        expand: int = 1,
        previous: AdapterRouting | None = None,
        from_forward: bool = True,
    ) -> None:
        self.names = list(names)
        self.expand = expand
        self.previous = previous
        self.from_forward = from_forward
        self._tables: dict[tuple[int, torch.device], dict[str, torch.Tensor]] = {}

    def rows(self, adapter_name: str, batch: int, device: torch.device) -> torch.Tensor:
        """Indices (int64, on ``device``) of the rows of a ``batch``-row input that use ``adapter_name``."""
        table = self._tables.get((batch, device))
        if table is None:
            table = self._tables[(batch, device)] = self._table(batch, device)
        found = table.get(adapter_name)
        return found if found is not None else table[BASE_NAME][:0]

    def _table(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        count = len(self.names)
        if batch == count:
            names = self.names
        elif self.expand > 1 and batch == count * self.expand:
            names = [n for n in self.names for _ in range(self.expand)]  # generate's repeat_interleave
        else:
            expanded = (
                f" (or {count * self.expand}: {self.expand} beams or sequences each)"
                if self.expand > 1
                else ""
            )
            raise ValueError(
                f"adapter_names has {count} entries but the batch has {batch} samples{expanded}; give one name "
                "per sample. (A layer that sees the tokens of the batch flattened, as mixture-of-experts layers do, "
                "cannot be routed per sample.)"
            )
        groups: dict[str, list[int]] = {BASE_NAME: []}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        return {name: torch.tensor(idx, dtype=torch.long, device=device) for name, idx in groups.items()}

    def call(self, layer: PEFTLayer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run ``layer`` on the mixed batch: its wrapped module alone when no row uses its adapter, else the
        layer's own row-wise ``forward`` (through ``nn.Module.__call__``, so its hooks run)."""
        if layer.merged:
            raise RuntimeError(
                f"adapter_names=... needs unmerged adapters, but {layer.adapter_name!r} is merged into the base "
                "weights; call unmerge_adapter(model) first"
            )
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if layer.routes_rows and x is not None:
            if self.rows(layer.adapter_name, x.shape[0], x.device).numel() == 0:
                return layer.base_layer(*args, **kwargs)  # (batch, ..., out)
            return nn.Module.__call__(
                layer, *args, **kwargs
            )  # forward reads the rows (PEFTLayer.routed_rows)
        return self._call_twice(layer, args, kwargs)

    def _call_twice(self, layer: PEFTLayer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Layers without a row-wise forward: the wrapped module for every row, the whole layer once more, and
        each row takes the output of its own choice."""
        base = layer.base_layer(*args, **kwargs)  # (batch, ...)
        if layer.adapter_name not in self.names:
            return base
        if not layer.supports_mixed_batch:
            raise ValueError(
                f"adapter_names=...: {type(layer).__name__} (adapter {layer.adapter_name!r}) changes the sequence "
                "length, so it cannot share a batch with samples that do not use it"
            )
        adapted = nn.Module.__call__(layer, *args, **kwargs)  # (batch, ...)
        rows = self.rows(layer.adapter_name, adapted.shape[0], adapted.device)
        use = torch.zeros(adapted.shape[0], dtype=torch.bool, device=adapted.device).index_fill_(
            0, rows, True
        )
        return torch.where(use.view(-1, *([1] * (adapted.dim() - 1))), adapted, base)


def check_names(model: nn.Module, names: Sequence[str], argument: str = "adapter_names") -> list[str]:
    """``names`` as a list, after checking that each is a loaded adapter or ``"__base__"`` and that no loaded
    adapter changes base tensors that every row would see."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"{argument} must be a list with one adapter name per sample, got {names!r}")
    names = list(names)
    record = get_record(model)
    known = list(record.adapters) if record is not None else []
    unknown = sorted({str(n) for n in names if n != BASE_NAME and n not in known})
    if unknown:
        raise ValueError(
            f"{argument} names unknown adapters {unknown}; loaded adapters are {known}, and "
            f"{BASE_NAME!r} means the base model"
        )
    in_place = [
        n
        for n, entry in (record.adapters.items() if record is not None else ())
        if entry.trained or entry.saved
    ]
    if in_place and (len(in_place) > 1 or set(names) != {in_place[0]}):
        raise ValueError(
            f"{argument}: adapter {in_place[0]!r} trains tensors of the base model in place (BitFit biases, "
            "LayerNorms of Houlsby adapters, modules_to_save), which every sample of the batch would see; such an "
            "adapter cannot be mixed per sample. Use Adapter(train_layernorms=False) or LoRA-type adapters"
        )
    return names


class RouteAdapters:
    """Forward pre-hook on the root: pops ``adapter_names`` and routes the batch (a picklable object)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        names = kwargs.pop("adapter_names", None)
        if names is not None:
            names = check_names(self.model, names)
            ADAPTER_ROUTING.set(AdapterRouting(names, previous=ADAPTER_ROUTING.get()))
        return args, kwargs


class EndRouting:
    """Forward hook on the root (also on errors): ends the routing its forward began, and only that one (the
    routing of a ``generate`` call spans many forward passes)."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        routing = ADAPTER_ROUTING.get()
        if isinstance(routing, AdapterRouting) and routing.from_forward:
            ADAPTER_ROUTING.set(routing.previous)


class RoutedGenerate:
    """``generate`` of an adapted transformers model, also accepting ``adapter_names=[...]`` (one per sample):
    the routing holds for the whole call, encoder included, and follows ``num_beams``/``num_return_sequences``."""

    def __init__(self, model: nn.Module, root: nn.Module) -> None:
        self.model = model
        self.root = root  # the module the record lives on (a LightningModule holding ``model``, or itself)
        self.__doc__ = getattr(type(model).generate, "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        names = kwargs.pop("adapter_names", None)
        generate = type(self.model).generate
        if names is None:
            return generate(self.model, *args, **kwargs)
        names = check_names(self.root, names)
        inputs = (
            args[0]
            if args
            else next((kwargs[k] for k in ("input_ids", "inputs", "inputs_embeds") if k in kwargs), None)
        )
        if isinstance(inputs, torch.Tensor) and inputs.shape[0] != len(names):
            raise ValueError(
                f"adapter_names has {len(names)} entries but the batch has {inputs.shape[0]} samples"
            )
        routing = AdapterRouting(
            names, expand=_expansion(self.model, kwargs), previous=ADAPTER_ROUTING.get(), from_forward=False
        )
        token = ADAPTER_ROUTING.set(routing)
        try:
            return generate(self.model, *args, **kwargs)
        finally:
            ADAPTER_ROUTING.reset(token)


def _expansion(model: nn.Module, kwargs: dict[str, Any]) -> int:
    """How many rows ``generate`` makes of each sample: max(num_beams, num_return_sequences)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
    sequences = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1
    return max(int(beams), int(sequences))


class _AttributeHandle:
    """Removes an instance attribute set by :func:`routing_hooks` (the interface of torch's hook handles)."""

    def __init__(self, module: nn.Module, name: str, value: Any) -> None:
        self.module, self.name, self.value = module, name, value

    def remove(self) -> None:
        if self.module.__dict__.get(self.name) is self.value:
            del self.module.__dict__[self.name]


def routing_hooks(model: nn.Module) -> list[Any]:
    """Install per-sample routing on ``model``: the root's forward hooks, and ``generate`` of the outermost
    transformers models inside it (the model itself, or a LightningModule's ``self.model``). Returns handles
    whose ``remove()`` undoes each."""
    handles: list[Any] = [
        model.register_forward_pre_hook(RouteAdapters(model), with_kwargs=True),
        model.register_forward_hook(EndRouting(), always_call=True),
    ]
    for name in outermost_models(model):
        inner = model.get_submodule(name) if name else model
        if callable(getattr(type(inner), "generate", None)) and "generate" not in inner.__dict__:
            wrapper = RoutedGenerate(inner, model)
            inner.__dict__["generate"] = wrapper
            handles.append(_AttributeHandle(inner, "generate", wrapper))
    return handles
