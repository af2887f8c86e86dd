"""Will a serving engine load this adapter as it is, or must it be merged into the base model first?

Serving engines load LoRA adapters in HF PEFT's layout but accept only part of what PEFT (and lightning-peft)
can write. :func:`check_serving` applies each engine's rules (:data:`ENGINE_RULES`) to an adapter's method
configurations and tensor names and returns a :class:`ServingVerdict`: the adapter serves as is, must be merged
first (``lightning-peft merge``: the merged folder is a plain transformers model that every engine serves), or
cannot be served by the engine at all (a method that neither the engine loads nor merging removes).

The rules are the ones each engine's own code states; the ``source`` of each rule names where:

* **vLLM** (``vllm/lora/peft_helper.py``, ``vllm/config/lora.py``): ``PEFTHelper`` raises "vLLM only supports
  modules_to_save being None" and "vLLM does not yet support DoRA"; ``--max-lora-rank`` must be one of
  8, 16, 32, 64, 128, 256, 320, 512 and bounds every adapter's ``r``; the scaling is computed once per adapter
  from ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), so per-module ``rank_pattern``/``alpha_pattern`` would be
  scaled wrongly. Only LoRA is loaded.
* **llama.cpp** (``convert_lora_to_gguf.py``): every tensor must be a ``lora_A`` or ``lora_B`` weight ("Not a
  lora_A or lora_B tensor" for ``modules_to_save`` such as ``lm_head``; a DoRA ``lora_magnitude_vector`` is an
  unrecognised tensor). Only LoRA is converted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_peft.methods.base import PEFTMethod

Verdict = Literal["serves as-is", "merge first", "unsupported"]


@dataclass(frozen=True)
class EngineRules:
    """What one serving engine loads of a LoRA adapter."""

    #: the engine's name on the command line
    name: str
    #: the largest LoRA rank the engine can be configured for (``None``: no limit known)
    max_rank: int | None
    #: the values the engine's rank limit (e.g. vLLM's ``--max-lora-rank``) may take (empty: any)
    rank_settings: tuple[int, ...]
    #: whether per-module ranks/alphas (``rank_pattern``, ``alpha_pattern``) are applied correctly
    per_module_scaling: bool
    #: where the rules come from (file of the engine's source)
    source: str


ENGINE_RULES: dict[str, EngineRules] = {
    "vllm": EngineRules(
        name="vllm",
        max_rank=512,
        rank_settings=(8, 16, 32, 64, 128, 256, 320, 512),
        per_module_scaling=False,
        source="vllm/lora/peft_helper.py (PEFTHelper._validate_features), vllm/config/lora.py (max_lora_rank)",
    ),
    "llama.cpp": EngineRules(
        name="llama.cpp",
        max_rank=None,
        rank_settings=(),
        per_module_scaling=True,
        source="convert_lora_to_gguf.py (only lora_A / lora_B tensors)",
    ),
}

#: methods an engine loads as a LoRA adapter
LORA_METHODS = ("lora",)
#: methods whose update folds into the base weights (``merge_and_unload``)
MERGEABLE = ("lora", "dora", "ia3", "bitfit")
#: tensor-name endings of a plain LoRA adapter file
LORA_TENSORS = ("lora_A.weight", "lora_B.weight")


@dataclass
class ServingVerdict:
    """The answer for one adapter and one engine."""

    engine: str
    verdict: Verdict
    #: why the adapter does not serve as is (empty when it does)
    reasons: list[str] = field(default_factory=list)
    #: what to do about it, and conditions to serve as is (e.g. the rank setting)
    advice: list[str] = field(default_factory=list)

    @property
    def serves_as_is(self) -> bool:
        return self.verdict == "serves as-is"

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "verdict": self.verdict,
            "reasons": self.reasons,
            "advice": self.advice,
        }

    def __str__(self) -> str:
        lines = [f"{self.engine}: {self.verdict.upper()}"]
        lines += [f"  - {reason}" for reason in self.reasons]
        lines += [f"  > {line}" for line in self.advice]
        return "\n".join(lines)


def _ranks(method: PEFTMethod) -> list[int]:
    return [int(getattr(method, "r", 0)), *(int(r) for r in getattr(method, "rank_pattern", {}).values())]


def check_serving(
    methods: Sequence[PEFTMethod], tensor_names: Iterable[str] = (), engine: str = "vllm"
) -> ServingVerdict:
    """Apply ``engine``'s rules to an adapter made of ``methods`` whose file holds ``tensor_names``."""
    if engine not in ENGINE_RULES:
        raise ValueError(f"engine={engine!r} is not known; known engines: {sorted(ENGINE_RULES)}")
    if not methods:
        raise ValueError("methods is empty: an adapter has at least one method configuration")
    rules = ENGINE_RULES[engine]
    names = [type(m).__name__ for m in methods]
    kinds = [m.method_name for m in methods]
    reasons: list[str] = []
    other = [n for n, k in zip(names, kinds) if k not in (*LORA_METHODS, "dora")]  # DoRA: its own reason
    if other:
        reasons.append(f"{engine} loads only LoRA adapters; this adapter uses {' + '.join(other)}")
    for method in methods:
        if getattr(method, "modules_to_save", None):
            reasons.append(
                f"modules_to_save={list(method.modules_to_save)}: {engine} refuses fully trained modules in an "
                "adapter"
            )
    if "dora" in kinds:
        reasons.append(f"DoRA's magnitude vectors (lora_magnitude_vector) are not loaded by {engine}")
    lora = [m for m in methods if m.method_name in (*LORA_METHODS, "dora")]
    for method in lora:
        if getattr(method, "lora_bias", False):
            reasons.append(f"lora_bias=True adds lora_B biases, which {engine} does not load")
        too_big = [r for r in _ranks(method) if rules.max_rank is not None and r > rules.max_rank]
        if too_big:
            reasons.append(f"rank {max(too_big)} exceeds {engine}'s largest rank setting {rules.max_rank}")
        patterns = {k: v for k in ("rank_pattern", "alpha_pattern") if (v := getattr(method, k, None))}
        if patterns and not rules.per_module_scaling:
            reasons.append(
                f"{' and '.join(patterns)} set: {engine} scales every module by one lora_alpha / r, so modules "
                "with their own rank or alpha would be scaled wrongly"
            )
    stray = sorted(
        {n for n in tensor_names if not n.endswith(LORA_TENSORS)} if engine == "llama.cpp" else set()
    )
    if stray and not any("modules_to_save" in r or "DoRA" in r for r in reasons):
        reasons.append(f"tensors other than lora_A/lora_B weights, e.g. {stray[:2]}")
    advice: list[str] = []
    if not reasons:
        ranks = sorted({r for m in lora for r in _ranks(m)})
        if rules.rank_settings and ranks:
            setting = min(s for s in rules.rank_settings if s >= max(ranks))
            advice.append(f"start {engine} with a rank limit >= {max(ranks)} (--max-lora-rank {setting})")
        return ServingVerdict(engine, "serves as-is", [], advice)
    if all(k in MERGEABLE for k in kinds):
        advice.append(
            "merge it first: lightning-peft merge --adapter PATH OUT, then serve OUT as a plain model"
        )
        return ServingVerdict(engine, "merge first", reasons, advice)
    blocked = [n for n, k in zip(names, kinds) if k not in MERGEABLE]
    advice.append(
        f"{' + '.join(blocked)} cannot be merged into the base weights: serve it with transformers "
        "(lightning-peft generate / chat), or train a LoRA instead"
    )
    return ServingVerdict(engine, "unsupported", reasons, advice)


def check_adapter_serving(path: Any, engines: Sequence[str] = ("vllm",)) -> list[ServingVerdict]:
    """:func:`check_serving` for the adapter at ``path`` (folder, ``.safetensors`` or adapter-only ``.ckpt``)."""
    from lightning_peft.files.reader import read_adapter

    adapter = read_adapter(path)
    return [check_serving(adapter.methods, adapter.tensors, engine) for engine in engines]
