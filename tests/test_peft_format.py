"""HF PEFT's adapter format both ways, for every method HF PEFT shares with lightning-peft.

Every case runs in both directions with ``peft`` as the other side:

* an adapter trained (here: randomised) and saved by HF PEFT loads through :func:`load_adapter` and gives HF
  PEFT's outputs;
* an adapter saved by :func:`save_adapter` loads through ``PeftModel.from_pretrained`` and gives ours.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY_MODELS, model_output, tiny_batch, tiny_encoder, with_biases
from torch import nn

from lightning_peft import (
    IA3,
    DoRA,
    LoRA,
    PEFTMethod,
    PrefixTuning,
    PromptTuning,
    apply_peft,
    load_adapter,
    merge_adapter,
    save_adapter,
)

peft = pytest.importorskip("peft")
ATOL = 1e-5


def randomise(model: nn.Module, seed: int = 3) -> None:
    """Pretend training happened: perturb every trainable tensor (adapters and modules_to_save)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=g, dtype=param.dtype))


@dataclass
class Case:
    kind: str
    ours: Callable[[], PEFTMethod]
    theirs: Callable[[], Any]
    biased: bool = False
    #: soft tokens HF PEFT keeps in a causal LM's logits (prompt tuning)
    extra_positions: int = 0

    def base(self) -> nn.Module:
        factory = MODELS[self.kind]
        return (with_biases(factory) if self.biased else factory)().eval()


def tiny_roberta(seed: int = 0) -> nn.Module:
    """Its classification head has Linear layers of its own: classifier.dense and classifier.out_proj."""
    return tiny_encoder("RobertaForSequenceClassification", seed, num_labels=2)


MODELS = {**TINY_MODELS, "roberta": tiny_roberta}


def lora_config(**kwargs: Any) -> Any:
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kwargs})


CASES: dict[str, Case] = {
    "lora": Case("bert", lambda: LoRA(r=4, alpha=8), lambda: lora_config(target_modules=["query", "value"])),
    "lora_rslora_gpt2": Case(
        "gpt2",
        lambda: LoRA(r=4, alpha=8, use_rslora=True),
        lambda: lora_config(target_modules=["c_attn"], use_rslora=True, fan_in_fan_out=True),
    ),
    "lora_rank_alpha_pattern": Case(
        "bert",
        lambda: LoRA(
            r=4,
            alpha=8,
            target_modules=["query", "value", "dense"],
            rank_pattern={"layer.0.attention.self.query": 2, r"intermediate\.dense": 6},
            alpha_pattern={"value": 3.0},
        ),
        lambda: lora_config(
            target_modules=["query", "value", "dense"],
            rank_pattern={"layer.0.attention.self.query": 2, r"intermediate\.dense": 6},
            alpha_pattern={"value": 3},
        ),
    ),
    "lora_layers_to_transform_llama": Case(
        "llama",
        lambda: LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
        lambda: lora_config(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    ),
    "lora_layers_pattern": Case(
        "bert",
        lambda: LoRA(r=4, alpha=8, target_modules=["key"], layers_to_transform=0, layers_pattern="layer"),
        lambda: lora_config(target_modules=["key"], layers_to_transform=0, layers_pattern="layer"),
    ),
    "lora_bias": Case(
        "bert",
        lambda: LoRA(r=4, alpha=8, target_modules=["query", "value"], lora_bias=True),
        lambda: lora_config(target_modules=["query", "value"], lora_bias=True),
        biased=True,
    ),
    "lora_modules_to_save_seq_cls": Case(
        "bert",
        lambda: LoRA(
            r=4, alpha=8, target_modules=["query"], bias="lora_only", modules_to_save=["classifier"]
        ),
        lambda: lora_config(target_modules=["query"], bias="lora_only", task_type="SEQ_CLS"),
        biased=True,
    ),
    "lora_roberta_head_not_targeted": Case(
        "roberta",
        lambda: LoRA(r=4, alpha=8, target_modules=["dense"], modules_to_save=["classifier"]),
        lambda: lora_config(target_modules=["dense"], task_type="SEQ_CLS"),
        biased=True,
    ),
    "ia3_roberta_head_not_targeted": Case(
        "roberta",
        lambda: IA3(target_modules=["dense"], feedforward_modules=[], modules_to_save=["classifier"]),
        lambda: peft.IA3Config(target_modules=["dense"], feedforward_modules=[], task_type="SEQ_CLS"),
        biased=True,
    ),
    "dora": Case(
        "bert",
        lambda: DoRA(r=4, alpha=8, use_rslora=True, rank_pattern={"value": 2}),
        lambda: lora_config(
            target_modules=["query", "value"], use_dora=True, use_rslora=True, rank_pattern={"value": 2}
        ),
        biased=True,
    ),
    "dora_gpt2": Case(
        "gpt2",
        lambda: DoRA(r=4, alpha=8),
        lambda: lora_config(target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True),
    ),
    "ia3": Case(
        "bert",
        lambda: IA3(),
        lambda: peft.IA3Config(
            target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
        ),
        biased=True,
    ),
    "ia3_llama": Case("llama", lambda: IA3(), lambda: peft.IA3Config(init_ia3_weights=False)),
    "prompt_bert": Case(
        "bert",
        lambda: PromptTuning(num_virtual_tokens=3, modules_to_save=["classifier"]),
        lambda: peft.PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"),
    ),
    "prompt_gpt2": Case(
        "gpt2",
        lambda: PromptTuning(num_virtual_tokens=3),
        lambda: peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
        extra_positions=3,
    ),
    "prefix_gpt2": Case(
        "gpt2",
        lambda: PrefixTuning(num_virtual_tokens=3),
        lambda: peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    ),
    "prefix_llama_projection": Case(
        "llama",
        lambda: PrefixTuning(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16),
        lambda: peft.PrefixTuningConfig(
            num_virtual_tokens=3, task_type="CAUSAL_LM", prefix_projection=True, encoder_hidden_size=16
        ),
    ),
}


def outputs(model: nn.Module, kind: str, drop: int = 0) -> torch.Tensor:
    return model_output(model, tiny_batch("bert" if kind == "roberta" else kind))[:, drop:]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_peft_adapter_loads_with_hf_peft_outputs(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    theirs = peft.get_peft_model(case.base(), case.theirs())
    randomise(theirs)
    theirs.eval()
    expected = outputs(theirs, case.kind, case.extra_positions)
    theirs.save_pretrained(str(tmp_path))

    ours = load_adapter(case.base(), tmp_path).eval()
    torch.testing.assert_close(outputs(ours, case.kind), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_our_adapter_loads_in_hf_peft_with_our_outputs(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    ours = case.base()
    apply_peft(ours, case.ours())
    randomise(ours)
    expected = outputs(ours, case.kind)
    save_adapter(ours, tmp_path)

    theirs = peft.PeftModel.from_pretrained(case.base(), str(tmp_path)).eval()
    torch.testing.assert_close(outputs(theirs, case.kind, case.extra_positions), expected, atol=ATOL, rtol=0)


def test_patterns_give_per_layer_ranks_and_scalings() -> None:
    model = TINY_MODELS["bert"]()
    apply_peft(model, CASES["lora_rank_alpha_pattern"].ours())
    layer0 = model.bert.encoder.layer[0]
    assert layer0.attention.self.query.r == 2 and layer0.attention.self.query.scaling == 8 / 2
    assert layer0.attention.self.value.r == 4 and layer0.attention.self.value.scaling == 3 / 4
    assert layer0.intermediate.dense.r == 6 and layer0.output.dense.r == 4
    assert model.bert.encoder.layer[1].attention.self.query.r == 4


def test_no_adapter_layer_inside_modules_to_save() -> None:
    model = tiny_roberta()
    apply_peft(model, LoRA(target_modules=["dense"], modules_to_save=["classifier"]))
    assert type(model.classifier.dense).__name__ == "Linear"  # trained in full instead
    assert type(model.roberta.encoder.layer[0].output.dense).__name__ == "LoRALinear"


def test_layers_to_transform_selects_blocks() -> None:
    model = TINY_MODELS["llama"]()
    apply_peft(model, LoRA(target_modules=["q_proj"], layers_to_transform=1))
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "LoRALinear"]
    assert wrapped == ["model.layers.1.self_attn.q_proj"]


def test_lora_bias_merges_into_the_base_bias() -> None:
    model = with_biases(TINY_MODELS["bert"])()
    apply_peft(model, LoRA(r=2, target_modules=["query"], lora_bias=True))
    randomise(model)
    before = outputs(model, "bert")
    merge_adapter(model)
    torch.testing.assert_close(outputs(model, "bert"), before, atol=ATOL, rtol=0)


def test_lora_bias_without_a_base_bias_cannot_merge() -> None:
    model = TINY_MODELS["llama"]()
    with pytest.warns(UserWarning, match="has no bias: this adapter cannot be merged"):
        apply_peft(model, LoRA(r=2, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(TypeError, match="cannot be merged"):
        merge_adapter(model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank_pattern": {"query": 0}}, r"rank_pattern\['query'\] must be a positive integer, got 0"),
        ({"rank_pattern": {"query": 2.5}}, r"rank_pattern\['query'\] must be a positive integer, got 2.5"),
        ({"alpha_pattern": {"(": 2}}, r"alpha_pattern key '\(' is not a valid regular expression"),
        ({"alpha_pattern": ["query"]}, "alpha_pattern must be a dict"),
        ({"layers_to_transform": -1}, "layers_to_transform must be a non-negative integer"),
        ({"layers_to_transform": []}, "layers_to_transform must be a non-negative integer"),
        ({"layers_pattern": "layer"}, "layers_pattern='layer' is only used with layers_to_transform"),
        ({"target_modules": ".*query", "layers_to_transform": 0}, "needs target_modules as a list"),
        ({"lora_bias": "yes"}, "lora_bias must be true or false, got 'yes'"),
    ],
)
def test_lora_option_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        LoRA(**kwargs)


def test_dora_refuses_lora_bias() -> None:
    with pytest.raises(ValueError, match="lora_bias=True is not supported by DoRA"):
        DoRA(lora_bias=True)


def test_unused_pattern_key_warns() -> None:
    with pytest.warns(UserWarning, match=r"rank_pattern keys \['nothing'\] match none of the LoRA targets"):
        apply_peft(TINY_MODELS["bert"](), LoRA(target_modules=["query"], rank_pattern={"nothing": 2}))


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("init", [False, "gaussian", "eva", "orthogonal", "mica"])
def test_init_only_lora_options_never_block_a_load(tmp_path: Path, init: Any) -> None:
    source = tmp_path / "source"
    theirs = peft.get_peft_model(TINY_MODELS["bert"](), lora_config(target_modules=["query"]))
    theirs.save_pretrained(str(source))
    config = json.loads((source / "adapter_config.json").read_text())
    config["init_lora_weights"] = init
    (source / "adapter_config.json").write_text(json.dumps(config))
    expected = outputs(theirs.eval(), "bert")
    ours = load_adapter(TINY_MODELS["bert"](), source)
    torch.testing.assert_close(outputs(ours, "bert"), expected, atol=ATOL, rtol=0)


def test_init_only_prompt_options_never_block_a_load(tmp_path: Path) -> None:
    theirs = peft.get_peft_model(
        TINY_MODELS["gpt2"](), peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    )
    randomise(theirs)
    theirs.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # how the prompt started: from a text, split by a tokenizer that is not even available here
    config.update(
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="great movie",
        tokenizer_name_or_path="no/such-tokenizer",
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    ours = load_adapter(TINY_MODELS["gpt2"](), tmp_path)
    torch.testing.assert_close(outputs(ours, "gpt2"), outputs(theirs.eval(), "gpt2", 3), atol=ATOL, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_base_rewriting_lora_inits_are_refused(tmp_path: Path, init: str) -> None:
    folder = write_config(
        tmp_path, {"peft_type": "LORA", "r": 2, "target_modules": ["query"], "init_lora_weights": init}
    )
    model = TINY_MODELS["bert"]()
    with pytest.raises(
        ValueError, match=f"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion"
    ):
        load_adapter(model, folder)
    assert not any(type(m).__name__ == "LoRALinear" for m in model.modules())


@pytest.mark.parametrize("peft_type", ["LOHA", "VERA", "BOGUS"])
def test_unsupported_peft_type_is_named_with_the_supported_ones(tmp_path: Path, peft_type: str) -> None:
    folder = write_config(tmp_path, {"peft_type": peft_type, "r": 2})
    with pytest.raises(ValueError, match=f"peft_type='{peft_type}' is not supported") as error:
        load_adapter(TINY_MODELS["bert"](), folder)
    for supported in ("LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING"):
        assert supported in str(error.value)


# -- the real MiniLM --------------------------------------------------------------------------------------
#: the same options mean the same adapter to both libraries
MINILM_OPTIONS: dict[str, Any] = dict(
    target_modules=["query", "value", "output.dense"],
    rank_pattern={"output.dense": 2},
    alpha_pattern={"value": 4.0},
    layers_to_transform=[0, 2, 5],
    use_rslora=True,
    lora_bias=True,
)


def minilm_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, 20000, (2, 16), generator=g),
        "attention_mask": torch.ones(2, 16),
    }


@pytest.mark.slow
def test_minilm_hf_peft_adapter_loads_with_hf_peft_outputs(tmp_path: Path, minilm: nn.Module) -> None:
    config = lora_config(task_type="SEQ_CLS", **MINILM_OPTIONS)
    theirs = peft.get_peft_model(copy.deepcopy(minilm), config)
    randomise(theirs)
    with torch.no_grad():
        expected = theirs.eval()(**minilm_batch()).logits
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(copy.deepcopy(minilm), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**minilm_batch()).logits, expected, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_minilm_our_adapter_loads_in_hf_peft_with_our_outputs(tmp_path: Path, minilm: nn.Module) -> None:
    ours = copy.deepcopy(minilm)
    apply_peft(ours, LoRA(r=4, alpha=8, modules_to_save=["classifier"], **copy.deepcopy(MINILM_OPTIONS)))
    randomise(ours)
    with torch.no_grad():
        expected = ours.eval()(**minilm_batch()).logits
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(minilm), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**minilm_batch()).logits, expected, atol=ATOL, rtol=0)
