"""What prompt tuning and prefix tuning share: a wrapper around the backbone of a transformers model.

Both methods put ``P`` virtual tokens in front of the real ones, so the attention mask, the positions and the
key/value cache of the backbone (``BertModel``, ``GPT2Model``, ``LlamaModel``: the module a task model reaches
through ``base_model``) all grow by ``P``. :class:`VirtualTokenLayer` replaces the backbone and rewrites the
keyword arguments of every call before delegating to it; the task head around it (classifier, LM head, loss,
``generate``) is untouched, so

* ``model.generate(...)`` works unchanged: its first step (no cache yet, or an empty one) gets the virtual
  tokens; its later steps find them in the cache and only need the mask and the positions shifted;
* ``lightning_module.model(**batch)`` keeps the shape of its outputs (logits line up with ``input_ids``);
* rollback is a plain module swap (:meth:`VirtualTokenLayer.unload`).

The attention mask passed in always covers the real tokens only (past and present), as for the bare model.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_peft.core.base_model import base_model_name, pretrained_model_class
from lightning_peft.methods.base import PEFTLayer

#: keyword under which the backbone takes its key/value cache (transformers ≥ 5.2x, then older releases)
CACHE_KEYS = ("cache", "past_key_values")


def find_outer(model: nn.Module, method: str) -> tuple[str, nn.Module]:
    """``(name, module)`` of the base transformers model in ``model`` (:func:`lightning_peft.core.base_model.base_model_name`)."""
    outer_name = base_model_name(model)  # raises when several transformers models are present
    if outer_name is None:
        raise ValueError(
            f"{method} adds virtual tokens to a transformers model, but {type(model).__name__} contains no "
            "transformers PreTrainedModel"
        )
    return outer_name, model.get_submodule(outer_name)


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def find_encoder_decoder(model: nn.Module, method: str) -> tuple[nn.Module, str, str]:
    """``(outer model, encoder name, decoder name)`` of an encoder-decoder transformers model (T5, BART)."""
    outer_name, outer = find_outer(model, method)
    parts = []
    for getter in ("get_encoder", "get_decoder"):
        get = getattr(outer, getter, None)
        sub = get() if callable(get) else None
        names = [n for n, m in outer.named_modules() if m is sub and n]
        if not names:
            raise ValueError(f"{method}: cannot find the {getter[4:]} of {type(outer).__name__}")
        parts.append(f"{outer_name}.{names[0]}" if outer_name else names[0])
    return outer, parts[0], parts[1]


def find_backbone(model: nn.Module, method: str) -> tuple[str, nn.Module, bool]:
    """The module to wrap: ``(name, outer transformers model, whether the backbone is that model itself)``.

    The outermost ``PreTrainedModel`` in ``model`` must be unique; its backbone is ``base_model`` (e.g.
    ``bert`` of ``BertForSequenceClassification``), or the innermost transformers model inside it that every
    forward path reaches (:func:`innermost_backbone`). A backbone without a head is wrapped itself, which needs
    a parent module to hold the wrapper.
    """
    outer_name, outer_model = find_outer(model, method)
    config = getattr(outer_model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{method} supports encoder-only and decoder-only models here; {type(outer_model).__name__} is an "
            "encoder-decoder model"
        )
    backbone = innermost_backbone(getattr(outer_model, "base_model", outer_model))
    if backbone is outer_model:
        if not outer_name:
            raise ValueError(
                f"{method} wraps the backbone of a transformers model (e.g. BertForSequenceClassification.bert), "
                f"but the model given is the bare {type(outer_model).__name__}, which cannot replace itself; "
                "apply the method to a module that contains it (e.g. your LightningModule)"
            )
        return outer_name, outer_model, True
    name = next(n for n, m in outer_model.named_modules() if m is backbone)
    return f"{outer_name}.{name}" if outer_name else name, outer_model, False


def _embeddings_of(module: nn.Module) -> nn.Module | None:
    get = getattr(module, "get_input_embeddings", None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:
        return None


def innermost_backbone(backbone: nn.Module) -> nn.Module:
    """The innermost transformers model inside ``backbone`` that receives the token inputs.

    Some task models bypass their ``base_model``: ``OPTForCausalLM.forward`` calls ``self.model.decoder``
    directly, not ``self.model``, so a wrapper around ``OPTModel`` would never run. The module that every
    path reaches is the innermost one that owns the input embedding and takes ``input_ids``/``inputs_embeds``
    (``OPTDecoder``); it is found by descending while exactly one such transformers model sits inside.
    """
    pretrained = pretrained_model_class()
    while pretrained is not None:
        embeddings = _embeddings_of(backbone)
        inner = [
            (n, m)
            for n, m in backbone.named_modules()
            if n
            and isinstance(m, pretrained)
            and embeddings is not None
            and _embeddings_of(m) is embeddings
            and {"input_ids", "inputs_embeds"} <= set(forward_parameters(m))
        ]
        outermost = [(n, m) for n, m in inner if not any(n.startswith(o + ".") for o, _ in inner if o != n)]
        if len(outermost) != 1:
            return backbone
        backbone = outermost[0][1]
    return backbone


def forward_parameters(module: nn.Module) -> list[str]:
    """Names of ``module.forward``'s parameters, in order (``*args``/``**kwargs`` left out)."""
    signature = inspect.signature(module.forward)
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in signature.parameters.values() if p.kind not in kinds]


def cache_keyword(module: nn.Module) -> str | None:
    names = forward_parameters(module)
    return next((key for key in CACHE_KEYS if key in names), None)


def require_inputs(backbone: nn.Module, names: tuple[str, ...], method: str) -> None:
    accepted = forward_parameters(backbone)
    missing = [n for n in names if n not in accepted]
    if missing:
        raise ValueError(
            f"{method}: {type(backbone).__name__}.forward does not accept {missing}, which the method needs "
            f"(it accepts {accepted})"
        )


def input_embedding_weight(backbone: nn.Module, method: str) -> torch.Tensor:
    """The (vocabulary, hidden) input embedding matrix of a transformers backbone."""
    get = getattr(backbone, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except NotImplementedError:
        embedding = None
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{method}: {type(backbone).__name__} has no input embedding matrix (get_input_embeddings)"
        )
    return weight


def prepend_ones(mask: torch.Tensor, count: int) -> torch.Tensor:
    """(B, S) mask -> (B, count + S): the virtual tokens are always attended."""
    if mask.dim() != 2:
        raise ValueError(
            f"prompt/prefix tuning needs a 2D attention_mask (batch, sequence), got shape {tuple(mask.shape)}"
        )
    ones = torch.ones(mask.shape[0], count, dtype=mask.dtype, device=mask.device)
    return torch.cat([ones, mask], dim=1)


class VirtualTokenLayer(PEFTLayer):
    """Replaces a transformers backbone; subclasses rewrite its inputs in :meth:`forward`.

    Attribute reads that the wrapper does not answer itself go to the backbone, so code that reaches into
    ``model.bert.embeddings`` or calls ``model.transformer.get_input_embeddings()`` keeps working.
    """

    #: local parameter name -> HF PEFT file key; these keys are global (no module path), as in HF PEFT
    peft_names: ClassVar[dict[str, str]] = {}

    def __init__(self, base_layer: nn.Module, num_virtual_tokens: int, wraps_outer: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_virtual_tokens = num_virtual_tokens
        # whether base_layer is the outermost transformers model (then paths below it are already relative)
        self.wraps_outer = wraps_outer
        self._arg_names = forward_parameters(base_layer)
        self._cache_key = cache_keyword(base_layer) or CACHE_KEYS[0]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            # dunders stay the wrapper's own: copy/pickle protocols must act on the wrapper, not the backbone
            if name == "base_layer" or name.startswith("__") or "base_layer" not in modules:
                raise
            return getattr(modules["base_layer"], name)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """All arguments as keywords (task heads pass ``input_ids`` positionally)."""
        if len(args) > len(self._arg_names):
            raise TypeError(f"{type(self.base_layer).__name__}.forward got {len(args)} positional arguments")
        bound = dict(kwargs)
        for name, value in zip(self._arg_names, args):
            if name in bound:
                raise TypeError(f"{type(self.base_layer).__name__}.forward got multiple values for {name!r}")
            bound[name] = value
        return bound

    def pop_cache(self, kwargs: dict[str, Any]) -> Any:
        value = None
        for key in CACHE_KEYS:
            if kwargs.get(key) is not None:
                value = kwargs.pop(key)
            else:
                kwargs.pop(key, None)
        return value

    @staticmethod
    def batch_and_length(kwargs: dict[str, Any]) -> tuple[int, int, torch.device]:
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is None:
            raise ValueError("prompt/prefix tuning needs input_ids or inputs_embeds")
        return int(inputs.shape[0]), int(inputs.shape[1]), inputs.device

    @staticmethod
    def cache_length(cache: Any) -> int:
        return 0 if cache is None else int(cache.get_seq_length())

    def peft_key(self, module_path: str, local_name: str) -> str:
        if local_name in self.peft_names:
            return self.peft_names[local_name]
        if local_name.startswith("base_layer."):
            # a tensor of the wrapped model (modules_to_save, biases): name it as if there were no wrapper
            rest = local_name[len("base_layer.") :]
            path = rest if self.wraps_outer or not module_path else f"{module_path}.{rest}"
            return f"base_model.model.{path}"
        return super().peft_key(module_path, local_name)

    def unload(self) -> nn.Module:
        return self.base_layer

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}"


class EncoderMaskLayer(VirtualTokenLayer):
    """Wraps the decoder of an encoder-decoder model whose encoder reads ``P`` extra (virtual) tokens: the
    cross-attention mask the task model hands the decoder covers the real tokens only, so ``P`` leading ones
    are added when the encoder states are ``P`` longer than it. No parameters of its own."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = self.bind(args, kwargs)
        states, mask = kwargs.get("encoder_hidden_states"), kwargs.get("encoder_attention_mask")
        if (
            states is not None
            and mask is not None
            and mask.shape[-1] + self.num_virtual_tokens == states.shape[1]
        ):
            kwargs["encoder_attention_mask"] = prepend_ones(mask, self.num_virtual_tokens)
        return self.base_layer(**kwargs)
