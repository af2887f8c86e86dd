"""AdapterHub's adapter configurations (``adapter_config.json`` ``"config"``) as lightning-peft methods.

Each AdapterHub option either has an exact counterpart (the outputs then equal AdapterHub's) or is refused with
:class:`AdapterHubOptionError`, naming the option and its value, before the model is touched:

* bottleneck (``seq_bn``, ``double_seq_bn``, ``par_bn``, ``scaled_par_bn``...) → :class:`~lightning_peft.Adapter`
  with its block options (``original_ln_before``, ``residual_before_ln``, ``parallel``, ``scaling``,
  ``ln_before``, ``ln_after``, ``adapter_residual_before_ln``);
* ``lora`` with ``composition_mode="add"`` → :class:`~lightning_peft.LoRA` (scaling alpha / r);
* ``lora`` with ``composition_mode="scale"`` (AdapterHub's ``ia3``) → :class:`~lightning_peft.IA3` scaling the
  outputs of every target, ``l = alpha · lora_B``;
* ``prefix_tuning`` (flat or MLP-reparametrised, the MLP evaluated once) → :class:`~lightning_peft.PrefixTuning`;
* ``union`` (``mam``, ``unipelt``): each part as above.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lightning_peft.methods.adapter import Adapter
from lightning_peft.methods.base import PEFTMethod
from lightning_peft.methods.ia3 import IA3
from lightning_peft.methods.lora import LoRA
from lightning_peft.methods.prefix import PrefixTuning

#: model types whose module names the reader knows (BERT's layout: encoder.layer.N.attention.self.query ...)
MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
#: AdapterHub non_linearity (lower case, transformers' ACT2FN names) -> lightning-peft Adapter activation
ACTIVATIONS = {
    "relu": "relu",
    "swish": "silu",
    "silu": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "leakyrelu": "leaky_relu",
}
#: learned scaling factors (a scalar, a vector over channels): folded exactly into the up projection
LEARNED_SCALING = ("learned", "channel")
ATTN_MATRICES = {"q": "query", "k": "key", "v": "value"}
#: options that only act in training; their value is accepted and reported (they do not change the outputs)
TRAINING_ONLY = ("dropout", "stochastic_depth", "init_weights", "init_weights_seed")


class AdapterHubOptionError(ValueError):
    """An AdapterHub option that lightning-peft cannot reproduce exactly."""


def refuse(source: str, option: str, value: Any, why: str) -> AdapterHubOptionError:
    return AdapterHubOptionError(f"{source}: AdapterHub option {option}={value!r} is not supported: {why}")


def layer_regex(tail: str, leave_out: list[int]) -> str:
    """A regex (fullmatch) for ``layer.N.<tail>`` in every block except those in ``leave_out``."""
    skip = "(?!(?:{})\\.)".format("|".join(str(i) for i in sorted(leave_out))) if leave_out else ""
    # other named adapters' wrappers may sit in between (``output.base_layer.dense``)
    tail = tail.replace(r"\.", r"\.(?:base_layer\.)*")
    return rf"(?:.*\.)?layer\.{skip}\d+\.(?:base_layer\.)*(?:{tail})"


def architecture(config: Mapping[str, Any]) -> str:
    """``bottleneck``, ``lora``, ``prefix_tuning``, ``prompt_tuning``, ``union`` or another AdapterHub name."""
    return str(config.get("architecture") or "bottleneck")


def methods_from_config(
    config: Mapping[str, Any], sizes: Mapping[str, int], source: str, model_type: str | None
) -> list[PEFTMethod]:
    """The methods equivalent to one AdapterHub configuration. ``sizes`` gives what only the tensors tell:
    ``"bottleneck"`` (the adapters' width), ``"prefix_length"``."""
    if model_type not in MODEL_TYPES:
        raise refuse(
            source,
            "model_type",
            model_type,
            f"lightning-peft maps AdapterHub's module names for {', '.join(MODEL_TYPES)} only",
        )
    kind = architecture(config)
    if kind == "union":
        return [
            m
            for part in config.get("configs", [])
            for m in methods_from_config(part, sizes, source, model_type)
        ]
    if kind == "bottleneck":
        return [bottleneck_method(config, sizes, source)]
    if kind == "lora":
        return [lora_method(config, source)]
    if kind == "prefix_tuning":
        return [prefix_method(config, sizes, source)]
    if kind == "prompt_tuning":
        raise refuse(
            source,
            "architecture",
            kind,
            "AdapterHub prepends the prompt to the embedding layer's output (after the position embeddings and "
            "LayerNorm), lightning-peft's PromptTuning to its input (as HF PEFT does), so the outputs would differ",
        )
    raise refuse(source, "architecture", kind, "no lightning-peft method computes the same function")


def _leave_out(config: Mapping[str, Any], source: str) -> list[int]:
    leave_out = config.get("leave_out") or []
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in leave_out):
        raise refuse(source, "leave_out", leave_out, "layer indices must be integers")
    return list(leave_out)


def _refuse_set(config: Mapping[str, Any], source: str, checks: Mapping[str, tuple[Any, str]]) -> None:
    """Refuse every option whose value differs from the one value lightning-peft reproduces."""
    for option, (allowed, why) in checks.items():
        value = config.get(option, allowed)
        if value != allowed and not (allowed is None and value in (None, False)):
            raise refuse(source, option, value, why)


def bottleneck_method(config: Mapping[str, Any], sizes: Mapping[str, int], source: str) -> Adapter:
    _refuse_set(
        config,
        source,
        {
            "phm_layer": (False, "Compacter's PHM layers have no counterpart in lightning-peft"),
            "use_gating": (False, "gated adapters (UniPELT) have no counterpart in lightning-peft"),
            "inv_adapter": (
                None,
                "invertible adapters on the embeddings have no counterpart in lightning-peft",
            ),
            "cross_adapter": (False, "cross-attention adapters are not mapped (encoder-decoder models)"),
            "original_ln_after": (
                True,
                "the block's own residual add and LayerNorm after the adapter are kept",
            ),
        },
    )
    scaling = config.get("scaling", 1.0)
    if scaling in LEARNED_SCALING:
        scaling = 1.0  # the learned factors are folded into adapter_up's weight and bias (tensors.convert)
    elif isinstance(scaling, str):
        raise refuse(source, "scaling", scaling, f"supported: a number or {', '.join(LEARNED_SCALING)}")
    non_linearity = str(config.get("non_linearity", "relu")).lower()
    if non_linearity not in ACTIVATIONS:
        raise refuse(source, "non_linearity", non_linearity, f"supported: {', '.join(ACTIVATIONS)}")
    if "bottleneck" not in sizes:
        raise ValueError(
            f"{source}: the bottleneck adapter's tensors have different widths in different layers"
        )
    residual = config.get("residual_before_ln", True)
    original_ln_before = bool(config.get("original_ln_before", False))
    if residual == "post_add" and not original_ln_before:
        raise refuse(source, "residual_before_ln", residual, "it needs original_ln_before=True")
    places = {"mh_adapter": r"attention\.output", "output_adapter": r"output"}  # the output blocks
    tails = [tail for flag, tail in places.items() if config.get(flag)]
    if not tails:
        raise refuse(source, "mh_adapter", False, "with output_adapter=False too, the adapter has no place")
    adapter = Adapter(
        placement="houlsby" if config.get("mh_adapter") else "pfeiffer",
        bottleneck_size=sizes["bottleneck"],
        activation=ACTIVATIONS[non_linearity],
        target_modules=layer_regex("|".join(tails), _leave_out(config, source)),
        train_layernorms=False,
        original_ln_before=original_ln_before,
        residual_before_ln=residual,
        parallel=bool(config.get("is_parallel", False)),
        scaling=float(scaling),
        ln_before=bool(config.get("ln_before", False)),
        ln_after=bool(config.get("ln_after", False)),
        adapter_residual_before_ln=bool(config.get("adapter_residual_before_ln", False)),
    )
    if adapter.layout is None:  # the plain adapter sits on the blocks' dense projections
        dense = layer_regex("|".join(rf"{tail}\.dense" for tail in tails), _leave_out(config, source))
        adapter = dataclasses.replace(adapter, target_modules=dense)
    return adapter


def lora_targets(config: Mapping[str, Any], source: str) -> str:
    tails = []
    if config.get("selfattn_lora", True):
        matrices = config.get("attn_matrices") or ["q", "v"]
        unknown = [m for m in matrices if m not in ATTN_MATRICES]
        if unknown:
            raise refuse(source, "attn_matrices", matrices, "only q, k and v are mapped")
        tails.append(r"attention\.self\.(?:{})".format("|".join(ATTN_MATRICES[m] for m in matrices)))
    if config.get("intermediate_lora"):
        tails.append(r"intermediate\.dense")
    if config.get("output_lora"):
        tails.append(r"output\.dense")
    if not tails:
        raise refuse(
            source, "selfattn_lora", False, "with intermediate_lora and output_lora off, nothing adapts"
        )
    return layer_regex("|".join(tails), _leave_out(config, source))


def lora_method(config: Mapping[str, Any], source: str) -> PEFTMethod:
    _refuse_set(
        config,
        source,
        {
            "use_gating": (False, "gated LoRA (UniPELT) has no counterpart in lightning-peft"),
            "use_dora": (False, "AdapterHub's DoRA is not mapped"),
            "vera_d": (None, "VeRA has no counterpart in lightning-peft"),
            "vera_b": (None, "VeRA has no counterpart in lightning-peft"),
        },
    )
    dtype = config.get("dtype")
    if dtype not in (None, "float32"):
        raise refuse(source, "dtype", dtype, "the reader keeps the model's own dtype")
    mode = config.get("composition_mode", "add")
    targets = lora_targets(config, source)
    if mode == "scale":
        if config.get("r", 1) != 1:
            raise refuse(source, "r", config.get("r"), "composition_mode='scale' needs r=1")
        return IA3(target_modules=targets, feedforward_modules=[])
    if mode != "add":
        raise refuse(source, "composition_mode", mode, "supported: 'add' (LoRA) and 'scale' ((IA)^3)")
    return LoRA(
        r=int(config.get("r", 8)),
        alpha=float(config.get("alpha", 8)),
        dropout=float(config.get("dropout", 0.0)),
        target_modules=targets,
    )


def prefix_method(config: Mapping[str, Any], sizes: Mapping[str, int], source: str) -> PrefixTuning:
    _refuse_set(
        config,
        source,
        {
            "use_gating": (False, "gated prefixes (UniPELT) have no counterpart in lightning-peft"),
            "leave_out": ([], "lightning-peft's PrefixTuning gives every attention layer a prefix"),
        },
    )
    length = int(sizes.get("prefix_length", config.get("prefix_length", 30)))
    return PrefixTuning(num_virtual_tokens=length, shift_positions=False)
