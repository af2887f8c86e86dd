"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models", arXiv:2106.10199).

Only bias terms train. For every affine map ``y = W x + b`` (linear layers, LayerNorm's ``γ ⊙ x̂ + β``):

    y = W x + (b + Δb),      W frozen, Δb learned (stored in place: b itself is trained)

Nothing is inserted into the model: the chosen biases are declared trainable with
:func:`lightning_peft.core.record.mark_trainable`. Because the update lives in the base biases, a BitFit model is
"merged" by construction; ``merge_and_unload`` simply leaves the trained biases in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from lightning_peft.core.base_model import model_type_of
from lightning_peft.core.record import mark_trainable
from lightning_peft.core.targeting import ModuleTargets, matches_any
from lightning_peft.methods.base import PEFTLayer, PEFTMethod, _as_str_list, check_choice
from lightning_peft.methods.registry import register_method

BIAS_MODES = ("all", "attention", "pattern")
#: a module name component containing one of these marks an attention sub-layer in every architecture we
#: know (BERT/DistilBERT ``attention``, GPT-2 ``attn``/``crossattention``, Llama ``self_attn``, T5
#: ``SelfAttention``/``EncDecAttention``)
ATTENTION_MARKERS = ("attn", "attention")


def is_bias_name(local_name: str) -> bool:
    """``bias``, and fused biases such as ``nn.MultiheadAttention.in_proj_bias``."""
    return local_name == "bias" or local_name.endswith("_bias")


def ancestors_and_self(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def is_attention_module(name: str) -> bool:
    return any(marker in part.lower() for part in name.split(".") for marker in ATTENTION_MARKERS)


def biased_modules(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """(name, module, local bias names) for every module holding bias parameters, skipping the adapters'
    own layers inside PEFT wrappers (their parameters train anyway)."""
    wrappers = [n for n, m in model.named_modules() if isinstance(m, PEFTLayer)]
    found: list[tuple[str, nn.Module, list[str]]] = []
    for name, module in model.named_modules():
        if isinstance(module, PEFTLayer) or _adapter_owned(name, wrappers):
            continue
        local = [n for n, _ in module.named_parameters(recurse=False) if is_bias_name(n)]
        if local:
            found.append((name, module, local))
    return found


def _adapter_owned(name: str, wrappers: list[str]) -> bool:
    """Whether module ``name`` belongs to a PEFT wrapper's own layers rather than to its ``base_layer``."""
    for wrapper in wrappers:
        prefix = f"{wrapper}." if wrapper else ""
        if name == wrapper or not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        if rest != "base_layer" and not rest.startswith("base_layer."):
            return True
    return False


@register_method
@dataclass
class BitFit(PEFTMethod):
    """BitFit (Ben Zaken et al. 2022): train only bias terms, ``y = W x + (b + Δb)`` with ``W`` frozen."""

    method_name: ClassVar[str] = "bitfit"
    #: the update is the base biases themselves, so there is never anything left to fold in
    mergeable: ClassVar[bool] = True

    biases: str = "all"
    """Which biases train: "all" (every bias, LayerNorm biases included), "attention" (biases inside the
    attention sub-layers: BERT attention.* (query, key, value, attention output), GPT-2 attn.*, Llama-like
    self_attn.*) or "pattern" (biases inside the modules matched by target_modules)."""
    target_modules: list[str] | str | None = None
    """With biases="pattern": modules whose biases (their own and their submodules') train. Names or dotted
    suffixes, regexes, or one regex string."""
    exclude_modules: list[str] | str | None = None
    """Modules whose biases stay frozen (same syntax; also excludes their submodules), e.g. ["classifier"]."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter, e.g. ["classifier"] for a new head."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.biases, "biases", BIAS_MODES)
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = _as_str_list(self.target_modules, "target_modules")
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, str):
            self.exclude_modules = _as_str_list(self.exclude_modules, "exclude_modules")
        if self.biases == "pattern" and not self.target_modules:
            raise ValueError(
                f"biases='pattern' trains the biases of the modules named by target_modules, got "
                f"target_modules={self.target_modules!r}"
            )
        if self.biases != "pattern" and self.target_modules is not None:
            raise ValueError(
                f"target_modules is only used with biases='pattern', got biases={self.biases!r} and "
                f"target_modules={self.target_modules!r}; set biases='pattern' to train only those modules' biases"
            )

    def selected(self, model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
        """(module, local bias names) of the biases that train."""
        chosen: list[tuple[nn.Module, list[str]]] = []
        for name, module, local in biased_modules(model):
            path = ancestors_and_self(name) if name else [""]
            if any(matches_any(p, self.exclude_modules) for p in path if p):
                continue
            if self.biases == "attention" and not is_attention_module(name):
                continue
            if self.biases == "pattern" and not any(matches_any(p, self.target_modules) for p in path if p):
                continue
            chosen.append((module, local))
        return chosen

    def plan(self, model: nn.Module) -> ModuleTargets:
        """Validate only: BitFit wraps no module, so it never conflicts with methods that do."""
        if self.selected(model):
            return []
        model_type = model_type_of(model)
        described = type(model).__name__ + (f" (model_type={model_type!r})" if model_type else "")
        owners = [n for n, _, _ in biased_modules(model)]
        if not owners:
            raise ValueError(
                f"BitFit found no bias parameters in {described}: it searched every module for parameters "
                f"named 'bias' or '*_bias' and found none (models such as Llama have no bias terms). Use a "
                f"method that adds parameters, such as LoRA or IA3, for this model."
            )
        if self.biases == "pattern":
            matched = [n for n, _ in model.named_modules() if n and matches_any(n, self.target_modules)]
            what = (
                f"target_modules={self.target_modules!r} matched no module"
                if not matched
                else f"target_modules={self.target_modules!r} matched {matched[:5]}, which hold no bias"
            )
        else:
            what = f"biases={self.biases!r} found no bias inside a module whose name contains 'attn' or 'attention'"
        raise ValueError(
            f"BitFit: {what} (exclude_modules={self.exclude_modules!r}) in {described}. Modules with biases: "
            f"{_short_names(owners)}"
        )

    def inject(self, model: nn.Module, targets: ModuleTargets) -> None:
        for module, local in self.selected(model):
            mark_trainable(model, module, *local)


def _short_names(names: list[str], limit: int = 20) -> list[str]:
    seen: list[str] = []
    for name in names:
        parts = [p for p in name.split(".") if not p.isdigit()]
        short = ".".join(parts[-2:]) if parts else name
        if short not in seen:
            seen.append(short)
        if len(seen) >= limit:
            break
    return seen
