"""The base model inside a module, decided once for the whole package: which submodule is the transformers
model, its prefix and names relative to it, its ``model_type``, its HF PEFT task type (:data:`TASK_TYPES`, the one
table of tasks), and the per-architecture default targets.

Ground floor: imports nothing from the rest of lightning-peft. transformers is imported lazily, so a plain
``nn.Module`` works without touching it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

#: attribute a user sets on the root module to say which transformers model is the base, when it holds several
BASE_MODEL_ATTR = "peft_base_model"


@dataclass(frozen=True)
class TaskType:
    """What lightning-peft knows about one HF PEFT ``task_type``."""

    #: endings of the transformers class names that are models for this task (``BertForSequenceClassification``)
    class_suffixes: tuple[str, ...]
    #: the transformers Auto class that builds a base model for it from what an adapter records: a file names a
    #: task, never a class, so only these classes are ever built
    auto_class: str
    #: heads HF PEFT adds to ``modules_to_save`` for this task; loading fails if the file lacks an existing one
    heads: tuple[str, ...] = ()


#: every HF PEFT task type lightning-peft knows, in the order :func:`task_type_of` tries the class suffixes
TASK_TYPES: dict[str, TaskType] = {
    "SEQ_CLS": TaskType(
        ("ForSequenceClassification",), "AutoModelForSequenceClassification", ("classifier", "score")
    ),
    "TOKEN_CLS": TaskType(
        ("ForTokenClassification",), "AutoModelForTokenClassification", ("classifier", "score")
    ),
    "QUESTION_ANS": TaskType(("ForQuestionAnswering",), "AutoModelForQuestionAnswering", ("qa_outputs",)),
    "CAUSAL_LM": TaskType(("ForCausalLM", "LMHeadModel"), "AutoModelForCausalLM"),
    "SEQ_2_SEQ_LM": TaskType(("ForConditionalGeneration",), "AutoModelForSeq2SeqLM"),
    "FEATURE_EXTRACTION": TaskType((), "AutoModel"),  # a bare backbone (BertModel)
}


class AmbiguousBaseModelError(ValueError):
    """A module holds several separate transformers models and nothing says which one is the base."""


def pretrained_model_class() -> type | None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency, but plain-torch use keeps working
        return None
    return PreTrainedModel


def outermost_models(model: nn.Module) -> list[str]:
    """Names of the transformers models in ``model`` that no other transformers model contains
    (``""`` when ``model`` is one itself)."""
    pretrained = pretrained_model_class()
    if pretrained is None:  # pragma: no cover
        return []
    if isinstance(model, pretrained):
        return [""]
    found = [n for n, m in model.named_modules() if n and isinstance(m, pretrained)]
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


def base_model_name(model: nn.Module) -> str | None:
    """The name of *the* transformers model inside ``model`` (``""`` for ``model`` itself), or ``None`` when
    there is none. Raises :class:`AmbiguousBaseModelError` when there are several and ``model`` does not
    name one in its ``peft_base_model`` attribute."""
    chosen = getattr(model, BASE_MODEL_ATTR, None)
    outer = outermost_models(model)
    if isinstance(chosen, str):
        names = [n for n, _ in model.named_modules()]
        if chosen not in names:
            raise ValueError(
                f"{type(model).__name__}.{BASE_MODEL_ATTR}={chosen!r} names no submodule; transformers models "
                f"found: {outer}"
            )
        return chosen
    if len(outer) > 1:
        raise AmbiguousBaseModelError(
            f"{type(model).__name__} holds {len(outer)} separate transformers models {outer}; lightning-peft "
            f"cannot tell which one is the base model (adapter files name tensors relative to it). Set "
            f"{BASE_MODEL_ATTR} on the module to one of {outer}, e.g. self.{BASE_MODEL_ATTR} = {outer[0]!r}"
        )
    return outer[0] if outer else None


def base_prefix(model: nn.Module) -> str:
    """Prefix of the base transformers model's names inside ``model``: ``"model."`` for a LightningModule
    holding ``self.model``; ``""`` when ``model`` is itself the transformers model or a plain module."""
    name = base_model_name(model)
    return f"{name}." if name else ""


def base_model(model: nn.Module) -> nn.Module:
    """The base transformers model inside ``model`` (or ``model`` itself when there is none)."""
    name = base_model_name(model)
    return model.get_submodule(name) if name else model


def relative_name(name: str, prefix: str) -> str:
    """``name`` (a module or parameter name in the root module) relative to the base model whose names start
    with ``prefix`` (:func:`base_prefix`); names outside it are returned unchanged."""
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def model_type_of(model: nn.Module) -> str | None:
    """transformers ``config.model_type`` of the first configured module in ``model``."""
    for module in model.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(model_type, str):
            return model_type
    return None


def default_targets(model: nn.Module, table: Mapping[str, Sequence[str]], method: str) -> list[str]:
    """``table[model_type]`` for ``model``, or a ``ValueError`` naming the type and the known ones."""
    model_type = model_type_of(model)
    if model_type in table:
        return list(table[model_type])
    raise ValueError(
        f"target_modules=None: {method} on {model_description(model)} has no default targets for "
        f"model_type={model_type!r}; pass target_modules explicitly ({len(table)} model types have defaults, "
        "listed in lightning_peft/core/default_targets.py)"
    )


def model_description(model: nn.Module) -> str:
    """The class of the transformers model inside ``model`` (what the user recognises, also when ``model`` is
    a LightningModule holding it), else ``model``'s own class."""
    pretrained = pretrained_model_class()
    inner = [
        type(m).__name__ for m in model.modules() if pretrained is not None and isinstance(m, pretrained)
    ]
    return inner[0] if inner else type(model).__name__


def task_type_of(model: nn.Module, default: str | None = None) -> str | None:
    """HF PEFT's ``task_type`` for a transformers model, from its class name; ``default`` when no suffix of
    :data:`TASK_TYPES` matches (prompt learning passes ``"FEATURE_EXTRACTION"`` for a bare backbone)."""
    name = type(model).__name__
    for task, info in TASK_TYPES.items():
        if any(name.endswith(suffix) for suffix in info.class_suffixes):
            return task
    return default


def name_or_path(model: nn.Module) -> str | None:
    """``config._name_or_path`` of the base model, when it was loaded from somewhere."""
    return getattr(getattr(base_model(model), "config", None), "_name_or_path", None) or None


def config_value(model: nn.Module, key: str) -> Any:
    return getattr(getattr(base_model(model), "config", None), key, None)


def set_activation_checkpointing(model: nn.Module, enable: bool = True, **checkpoint_kwargs: Any) -> None:
    """Switch transformers' activation (gradient) checkpointing on or off for ``model``.

    transformers 5 renamed ``gradient_checkpointing_enable``/``_disable`` to ``activation_checkpointing_*`` and
    warns on the old names; older versions only have the old ones. ``checkpoint_kwargs`` go to
    ``torch.utils.checkpoint.checkpoint`` (e.g. ``use_reentrant=False``; transformers' default when omitted).
    """
    new = "activation_checkpointing_enable" if enable else "activation_checkpointing_disable"
    old = "gradient_checkpointing_enable" if enable else "gradient_checkpointing_disable"
    if not enable:
        getattr(model, new if hasattr(model, new) else old)()
    elif hasattr(model, new):
        getattr(model, new)(activation_checkpointing_kwargs=checkpoint_kwargs or None)
    else:
        getattr(model, old)(gradient_checkpointing_kwargs=checkpoint_kwargs or None)
