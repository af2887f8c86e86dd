"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
arXiv:2104.08691).

The frozen model reads ``P`` learned soft tokens ``E_p ∈ R^{P×h}`` in front of the embedded input
``E_x = embed(x) ∈ R^{S×h}``:

    y = f([E_p; E_x])          (the sequence is P + S long; only E_p trains)

The attention mask gets ``P`` leading ones, token types ``P`` leading zeros, and the real tokens take the
positions ``P … P+S-1`` (the soft tokens ``0 … P-1``), as in HF PEFT. Outputs keep the shape of the unmodified
model: the hidden states of the soft tokens are dropped after the backbone, so an LM's logits still line up
with ``input_ids`` and its loss is the usual next-token loss of the real tokens (HF PEFT returns P more logits
and also scores the first real token from the last soft one). A pooled output (BERT's ``pooler_output``, read
from the first position) comes from the first soft token, exactly as in HF PEFT. Attention maps, when asked
for, still include the soft tokens' rows and columns.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_peft.core.base_model import task_type_of
from lightning_peft.core.targeting import ModuleTargets, replace_module
from lightning_peft.methods._virtual_tokens import (
    EncoderMaskLayer,
    VirtualTokenLayer,
    find_backbone,
    find_encoder_decoder,
    find_outer,
    input_embedding_weight,
    is_encoder_decoder,
    prepend_ones,
    require_inputs,
)
from lightning_peft.methods.base import PEFTMethod, check_choice, check_positive_int
from lightning_peft.methods.peft_interop import modules_to_save_from_peft
from lightning_peft.methods.registry import register_method

INIT_CHOICES = ("random", "vocab", "text")
#: Lester et al. draw random prompts from U(-0.5, 0.5)
RANDOM_RANGE = 0.5


class PromptEmbedding(VirtualTokenLayer):
    """A transformers backbone that reads ``num_virtual_tokens`` soft tokens before every input."""

    peft_names: ClassVar[dict[str, str]] = {"prompt_embeddings": "prompt_embeddings"}

    def __init__(
        self,
        base_layer: nn.Module,
        prompt: torch.Tensor,
        wraps_outer: bool,
        rows: list[int] | None = None,
        keep_virtual: bool = False,
    ) -> None:
        super().__init__(base_layer, int(prompt.shape[0]), wraps_outer)
        #: keep the soft tokens' hidden states (an encoder-decoder's encoder: the decoder attends to them)
        self.keep_virtual = keep_virtual
        self.prompt_embeddings = nn.Parameter(prompt)
        #: vocabulary rows the prompt starts from (init="vocab"/"text"), or None for the uniform init
        self.init_rows = rows
        # rows of the vocabulary depend on base weights that may be loaded after attaching
        self.init_pending = rows is not None

    def reset_parameters(self) -> None:
        """U(-0.5, 0.5), or the chosen vocabulary rows (again at the start of training: see init_pending)."""
        if self.prompt_embeddings.device.type == "meta":
            return
        if self.init_rows is None:
            with torch.no_grad():
                self.prompt_embeddings.uniform_(-RANDOM_RANGE, RANDOM_RANGE)
            return
        self.init_from_base()
        self.init_pending = True

    def init_from_base(self) -> None:
        if self.init_rows is not None:
            weight = self.base_layer.get_input_embeddings().weight
            rows = torch.tensor(self.init_rows, device=weight.device)
            with torch.no_grad():
                self.prompt_embeddings.copy_(weight.detach()[rows].to(self.prompt_embeddings.dtype))
        super().init_from_base()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = self.bind(args, kwargs)
        cache = self.pop_cache(kwargs)
        p = self.num_virtual_tokens
        batch, _, _ = self.batch_and_length(kwargs)
        # a non-empty cache already holds the soft tokens (a later generation step, or a continued call)
        first = self.cache_length(cache) == 0
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = prepend_ones(kwargs["attention_mask"], p)
        positions = kwargs.get("position_ids")
        if first:
            embeds = kwargs.pop("inputs_embeds", None)
            input_ids = kwargs.pop("input_ids", None)
            if embeds is None:
                embeds = self.base_layer.get_input_embeddings()(input_ids)  # (B, S, h)
            prompt = self.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, P, h)
            kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, P+S, h)
            types = kwargs.get("token_type_ids")
            if types is not None:
                zeros = torch.zeros(*types.shape[:-1], p, dtype=types.dtype, device=types.device)
                kwargs["token_type_ids"] = torch.cat([zeros, types], dim=-1)
            if positions is not None:
                virtual = torch.arange(p, dtype=positions.dtype, device=positions.device)
                virtual = virtual.expand(*positions.shape[:-1], p)
                kwargs["position_ids"] = torch.cat([virtual, positions + p], dim=-1)
        elif positions is not None:
            kwargs["position_ids"] = positions + p
        if cache is not None:
            kwargs[self._cache_key] = cache
        output = self.base_layer(**kwargs)
        return drop_virtual_positions(output, p) if first and not self.keep_virtual else output


def drop_virtual_positions(output: Any, count: int) -> Any:
    """Remove the soft tokens' positions from the per-token outputs of a backbone."""
    if isinstance(output, tuple):
        return (output[0][:, count:], *output[1:])
    output.last_hidden_state = output.last_hidden_state[:, count:]  # (B, P+S, h) -> (B, S, h)
    hidden = getattr(output, "hidden_states", None)
    if hidden is not None:
        output.hidden_states = tuple(h[:, count:] for h in hidden)
    return output


@register_method
@dataclass
class PromptTuning(PEFTMethod):
    """Prompt tuning (Lester et al. 2021): ``y = f([E_p; embed(x)])`` with ``P`` trained soft tokens ``E_p``
    prepended to the input embeddings of a frozen transformers model. Not mergeable."""

    method_name: ClassVar[str] = "prompt"
    #: the layers this method puts into a model (the participation check finds them by type)
    layer_types: ClassVar[tuple[type, ...]] = (PromptEmbedding, EncoderMaskLayer)

    num_virtual_tokens: int = 20
    """Number P of soft tokens put before every input (a positive integer)."""
    init: str = "random"
    """How the soft tokens start: "random" (uniform in [-0.5, 0.5], as in the paper), "vocab" (rows of the
    model's vocabulary embedding, drawn at random without replacement) or "text" (the embeddings of init_text,
    repeated or cut to P tokens)."""
    init_text: str | None = None
    """Text whose token embeddings initialise the prompt; required with init="text"."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer (a local folder or hub name) that splits init_text; required with init="text"."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter, e.g. ["classifier"] for a new head."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.num_virtual_tokens, "num_virtual_tokens")
        check_choice(self.init, "init", INIT_CHOICES)
        if isinstance(self.tokenizer_name_or_path, os.PathLike):
            self.tokenizer_name_or_path = os.fspath(self.tokenizer_name_or_path)
        if self.init == "text":
            if not isinstance(self.init_text, str) or not self.init_text.strip():
                raise ValueError(
                    f"init_text must be a non-empty string when init='text', got {self.init_text!r}"
                )
            if not isinstance(self.tokenizer_name_or_path, str) or not self.tokenizer_name_or_path:
                raise ValueError(
                    "tokenizer_name_or_path must name the tokenizer for init_text when init='text', got "
                    f"{self.tokenizer_name_or_path!r}"
                )
        elif self.init_text is not None:
            raise ValueError(f"init_text is only used with init='text', but init={self.init!r}")

    def plan(self, model: nn.Module) -> ModuleTargets:
        name, decoder = self.wrapped(model)
        backbone = model.get_submodule(name)
        require_inputs(backbone, ("input_ids", "inputs_embeds", "attention_mask"), type(self).__name__)
        weight = input_embedding_weight(backbone, type(self).__name__)
        if self.init == "text":
            self.text_token_ids(int(weight.shape[0]))
        return [name] if decoder is None else [name, decoder]

    def wrapped(self, model: nn.Module) -> tuple[str, str | None]:
        """(module that gets the soft tokens, decoder whose cross-attention mask grows, for encoder-decoders).

        Encoder-decoder models (T5, BART) get the prompt on the encoder input, as in Lester et al. and HF PEFT;
        the decoder then attends to the soft tokens' encoder states too."""
        _, outer = find_outer(model, type(self).__name__)
        if is_encoder_decoder(outer):
            _, encoder, decoder = find_encoder_decoder(model, type(self).__name__)
            return encoder, decoder
        return find_backbone(model, type(self).__name__)[0], None

    def text_token_ids(self, vocab_size: int) -> list[int]:
        """Token ids of init_text, repeated or cut to num_virtual_tokens."""
        ids = list(tokenize(str(self.tokenizer_name_or_path), str(self.init_text)))
        if not ids:
            raise ValueError(
                f"init_text={self.init_text!r} gives no tokens with {self.tokenizer_name_or_path!r}"
            )
        if max(ids) >= vocab_size:
            raise ValueError(
                f"tokenizer_name_or_path={self.tokenizer_name_or_path!r} gives token id {max(ids)}, but the model's "
                f"vocabulary has {vocab_size} rows; use the model's own tokenizer"
            )
        repeats = math.ceil(self.num_virtual_tokens / len(ids))
        return (ids * repeats)[: self.num_virtual_tokens]

    def initial_rows(self, vocab_size: int) -> list[int] | None:
        """The vocabulary rows the soft tokens start from, or ``None`` for the uniform init."""
        p = self.num_virtual_tokens
        if self.init == "random":
            return None
        if self.init == "vocab":
            rows = torch.randperm(vocab_size)[:p] if vocab_size >= p else torch.randint(0, vocab_size, (p,))
            return [int(r) for r in rows]
        return self.text_token_ids(vocab_size)

    def initial_prompt(self, weight: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
        """The (P, h) starting value of the soft tokens."""
        p, hidden = self.num_virtual_tokens, int(weight.shape[1])
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        if weight.device.type == "meta":
            return torch.empty(p, hidden, dtype=dtype, device=weight.device)
        if rows is None:
            prompt = torch.empty(p, hidden, dtype=dtype, device=weight.device)
            return prompt.uniform_(-RANDOM_RANGE, RANDOM_RANGE)
        return weight.detach()[torch.tensor(rows, device=weight.device)].to(dtype).clone()

    def inject(self, model: nn.Module, targets: ModuleTargets) -> None:
        name, decoder = self.wrapped(model)
        wraps_outer = decoder is None and find_backbone(model, type(self).__name__)[2]
        backbone = model.get_submodule(name)
        weight = input_embedding_weight(backbone, type(self).__name__)
        rows = self.initial_rows(int(weight.shape[0]))
        prompt = self.initial_prompt(weight, rows)
        layer = PromptEmbedding(backbone, prompt, wraps_outer, rows, keep_virtual=decoder is not None)
        replace_module(model, name, layer)
        if decoder is not None:
            base = model.get_submodule(decoder)
            replace_module(model, decoder, EncoderMaskLayer(base, self.num_virtual_tokens, wraps_outer=False))

    # -- HF PEFT interop ------------------------------------------------------------------------------
    def peft_config(self, model: nn.Module) -> dict[str, Any] | None:
        _, outer = find_outer(model, type(self).__name__)
        config = outer.config
        return {
            "peft_type": "PROMPT_TUNING",
            "task_type": task_type_of(outer, default="FEATURE_EXTRACTION"),
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": config.hidden_size,
            "num_transformer_submodules": 1,
            "num_attention_heads": config.num_attention_heads,
            "num_layers": config.num_hidden_layers,
            # the file holds trained prompts, so the initialisation no longer matters
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "inference_mode": True,
            "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
            "modules_to_save": list(self.modules_to_save) or None,
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> PromptTuning | None:
        if config.get("peft_type") != "PROMPT_TUNING":
            return None
        return cls(
            num_virtual_tokens=int(config["num_virtual_tokens"]),
            modules_to_save=modules_to_save_from_peft(config.get("modules_to_save")),
        )


@functools.lru_cache(maxsize=8)
def tokenize(tokenizer_name_or_path: str, text: str) -> tuple[int, ...]:
    """Token ids of ``text`` without special tokens (cached: plan() and inject() both need them)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path)
    except Exception as error:  # noqa: BLE001 - every loading failure means the same thing to the user
        raise ValueError(
            f"tokenizer_name_or_path={tokenizer_name_or_path!r} could not be loaded as a tokenizer: {error}"
        ) from error
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
