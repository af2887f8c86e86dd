"""Prompt tuning: configuration errors, HF PEFT as an oracle, generation, training, save/load, rollback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import (
    TINY_MODELS,
    VOCAB,
    EmbeddingsAtStart,
    HFModule,
    fast_trainer,
    generate,
    greedy_by_hand,
    hf_loader,
    model_output,
    only_layer,
    tiny_batch,
    tiny_with,
)
from torch import nn

from lightning_peft import (
    LoRA,
    PEFTCallback,
    PromptTuning,
    apply_peft,
    count_parameters,
    load_adapter,
    merge_adapter,
    merge_and_unload,
    remove_peft,
    save_adapter,
    trainable_parameter_names,
)
from lightning_peft.methods.prompt import PromptEmbedding
from lightning_peft.ops.parameters import peft_layers

P = 3
TASKS = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM"}


def prompt_layer(model: nn.Module) -> PromptEmbedding:
    return only_layer(model, PromptEmbedding)


def prompted(kind: str, seed: int = 0, **kwargs: object) -> nn.Module:
    return tiny_with(kind, PromptTuning(num_virtual_tokens=P, **kwargs), seed)  # type: ignore[arg-type]


def peft_oracle(kind: str, prompt: torch.Tensor) -> nn.Module:
    peft = pytest.importorskip("peft")
    oracle = peft.get_peft_model(
        TINY_MODELS[kind](), peft.PromptTuningConfig(task_type=TASKS[kind], num_virtual_tokens=P)
    )
    oracle.prompt_encoder.default.embedding.weight.data.copy_(prompt)
    return oracle.eval()


# -- configuration -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer, got 0"),
        ({"num_virtual_tokens": 2.5}, "num_virtual_tokens must be a positive integer, got 2.5"),
        ({"init": "zeros"}, "init must be one of 'random', 'vocab', 'text', got 'zeros'"),
        ({"init": "text", "tokenizer_name_or_path": "x"}, "init_text must be a non-empty string"),
        ({"init": "text", "init_text": "hello"}, "tokenizer_name_or_path must name the tokenizer"),
        ({"init_text": "hello"}, "init_text is only used with init='text', but init='random'"),
    ],
)
def test_invalid_configuration(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PromptTuning(**kwargs)  # type: ignore[arg-type]


def test_models_it_cannot_wrap_are_refused_untouched() -> None:
    from transformers import BertModel

    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="contains no transformers PreTrainedModel"):
        apply_peft(plain, PromptTuning())
    bare = TINY_MODELS["bert"]().bert
    assert isinstance(bare, BertModel)
    with pytest.raises(ValueError, match="cannot replace itself"):
        apply_peft(bare, PromptTuning())
    two = nn.ModuleDict({"a": TINY_MODELS["bert"](), "b": TINY_MODELS["gpt2"]()})
    with pytest.raises(ValueError, match="2 separate transformers models"):
        apply_peft(two, PromptTuning())
    bad_tokenizer = TINY_MODELS["bert"]()
    config = PromptTuning(init="text", init_text="hi", tokenizer_name_or_path="/nonexistent/tokenizer")
    with pytest.raises(ValueError, match="could not be loaded as a tokenizer"):
        apply_peft(bad_tokenizer, config)
    for model in (plain, bare, two, bad_tokenizer):
        assert not any(True for _ in peft_layers(model))
        assert all(p.requires_grad for p in model.parameters())


def test_bare_backbone_inside_a_container_is_wrapped_itself() -> None:
    holder = nn.ModuleDict({"encoder": TINY_MODELS["bert"]().bert})
    apply_peft(holder, PromptTuning(num_virtual_tokens=P))
    assert isinstance(holder["encoder"], PromptEmbedding)
    batch = tiny_batch("bert")
    out = holder["encoder"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.last_hidden_state.shape == (*batch["input_ids"].shape, 32)


# -- numerics against HF PEFT ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_matches_peft_prompt_tuning(kind: str) -> None:
    model = prompted(kind).eval()
    prompt = prompt_layer(model).prompt_embeddings.detach()
    oracle = peft_oracle(kind, prompt)
    batch = tiny_batch(kind)
    with torch.no_grad():
        ours, theirs = model(**batch), oracle(**batch)
    if kind == "bert":
        # the classifier reads the pooled first position, i.e. the first soft token, as in PEFT
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
        return
    # PEFT also returns logits for the soft tokens; ours keep the shape of the input
    assert ours.logits.shape == (*batch["input_ids"].shape, VOCAB)
    assert theirs.logits.shape[1] == batch["input_ids"].shape[1] + P
    torch.testing.assert_close(ours.logits, theirs.logits[:, P:], atol=1e-5, rtol=0)
    # our loss is the usual next-token loss over the real tokens
    expected = nn.functional.cross_entropy(
        ours.logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1)
    )
    torch.testing.assert_close(ours.loss, expected, atol=1e-5, rtol=0)


def test_token_types_and_explicit_positions_match_peft() -> None:
    model = prompted("bert").eval()
    oracle = peft_oracle("bert", prompt_layer(model).prompt_embeddings.detach())
    batch = tiny_batch("bert")
    types = torch.zeros_like(batch["input_ids"])
    types[:, 6:] = 1
    with torch.no_grad():
        ours = model(**batch, token_type_ids=types).logits
        theirs = oracle(**batch, token_type_ids=types).logits
        # positions given explicitly: the soft tokens take 0..P-1, the real tokens start at P, as without them
        positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        explicit = model(**batch, position_ids=positions).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(explicit, model_output(model, batch), atol=1e-6, rtol=0)


def test_prompt_changes_outputs_and_padding_is_masked() -> None:
    model = prompted("bert").eval()
    reference = TINY_MODELS["bert"]().eval()
    batch = tiny_batch("bert")
    assert not torch.allclose(model_output(model, batch), model_output(reference, batch))
    # row 0 is right-padded: changing what sits under the padding must not change its output
    altered = {k: v.clone() for k, v in batch.items()}
    altered["input_ids"][0, -3:] = 7
    torch.testing.assert_close(
        model_output(model, altered)[0], model_output(model, batch)[0], atol=1e-6, rtol=0
    )


def test_hidden_states_keep_the_input_length_and_deepcopy_works() -> None:
    import copy

    model = prompted("bert").eval()
    batch = tiny_batch("bert")
    with torch.no_grad():
        out = model.bert(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
    assert out.last_hidden_state.shape == (*batch["input_ids"].shape, 32)
    assert len(out.hidden_states) == 3 and all(
        h.shape == out.last_hidden_state.shape for h in out.hidden_states
    )
    twin = copy.deepcopy(model)
    assert isinstance(twin.bert, PromptEmbedding) and twin.bert is not model.bert
    torch.testing.assert_close(model_output(twin, batch), model_output(model, batch), atol=0, rtol=0)


# -- generation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_matches_greedy_decoding_by_hand_and_peft(kind: str) -> None:
    model = prompted(kind).eval()
    with torch.no_grad():
        prompt_layer(model).prompt_embeddings.mul_(3)  # a prompt strong enough to steer the tiny model
    ids = tiny_batch(kind)["input_ids"][:3, :6]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    out = generate(model, ids, mask)
    assert out.shape == (3, 12)
    assert torch.equal(out, greedy_by_hand(model, ids, mask, 6))
    plain = TINY_MODELS[kind]().eval()
    baseline = generate(plain, ids, mask)
    assert not torch.equal(out, baseline)
    # the same decoding through PEFT's forward pass (its generate() does not handle transformers 5's cache)
    oracle = peft_oracle(kind, prompt_layer(model).prompt_embeddings.detach())
    unpadded = ids[[0, 2]]
    assert torch.equal(out[[0, 2]], greedy_by_hand(oracle, unpadded, torch.ones_like(unpadded), 6))


# -- training, saving, rollback ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_training_changes_only_the_prompt(tmp_path: Path, kind: str) -> None:
    module = HFModule(kind, lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    start = EmbeddingsAtStart(PromptEmbedding)
    trainer = fast_trainer(
        tmp_path, max_steps=3, callbacks=[PEFTCallback(PromptTuning(num_virtual_tokens=P)), start]
    )
    trainer.fit(module, hf_loader(kind))
    layer = prompt_layer(module)
    assert trainable_parameter_names(module) == [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable_parameter_names(module) == [f"model.{module.model.base_model_prefix}.prompt_embeddings"]
    after = {n.replace(".base_layer.", "."): p for n, p in module.named_parameters()}
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert not torch.equal(layer.prompt_embeddings, start.value)
    module.eval()
    batch = tiny_batch(kind)
    trained = model_output(module.model, batch)

    save_adapter(module, tmp_path / "adapter")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(tensors) == {"prompt_embeddings"} and tensors["prompt_embeddings"].shape == (P, 32)
    fresh = HFModule(kind)
    load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    torch.testing.assert_close(model_output(fresh.model, batch), trained, atol=0, rtol=0)


def test_save_load_round_trip_with_peft_in_both_directions(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = prompted("gpt2").eval()
    batch = tiny_batch("gpt2")
    expected = model_output(model, batch)
    save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(TINY_MODELS["gpt2"](), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(model_output(theirs, batch)[:, P:], expected, atol=1e-5, rtol=0)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = TINY_MODELS["gpt2"]()
    load_adapter(back, tmp_path / "theirs")
    torch.testing.assert_close(model_output(back.eval(), batch), expected, atol=0, rtol=0)


def test_merge_is_refused_and_remove_restores_the_model() -> None:
    model = prompted("gpt2").eval()
    reference = TINY_MODELS["gpt2"]().eval()
    batch = tiny_batch("gpt2")
    with pytest.raises(TypeError, match="PromptEmbedding cannot be merged"):
        merge_adapter(model)
    with pytest.raises(TypeError, match="cannot be merged"):
        merge_and_unload(model)
    remove_peft(model)
    assert type(model.transformer).__name__ == "GPT2Model"
    assert not any(True for _ in peft_layers(model))
    torch.testing.assert_close(model_output(model, batch), model_output(reference, batch), atol=0, rtol=0)


@pytest.mark.parametrize("prompt_first", [True, False])
def test_combines_with_lora_inside_the_backbone(prompt_first: bool) -> None:
    model = TINY_MODELS["bert"]().eval()
    reference = TINY_MODELS["bert"]().eval()
    methods = [PromptTuning(num_virtual_tokens=P), LoRA(r=2)]
    apply_peft(model, methods if prompt_first else methods[::-1])
    names = trainable_parameter_names(model)
    assert "bert.prompt_embeddings" in names and sum("lora_" in n for n in names) == 8
    model_output(model, tiny_batch("bert"))  # runs
    remove_peft(model)
    batch = tiny_batch("bert")
    torch.testing.assert_close(model_output(model, batch), model_output(reference, batch), atol=0, rtol=0)


def test_vocab_initialisation_uses_distinct_vocabulary_rows() -> None:
    model = prompted("llama", init="vocab")
    prompt = prompt_layer(model).prompt_embeddings.detach()
    table = model.get_input_embeddings().weight.detach()
    rows = [int(torch.nonzero((table == row).all(-1)).flatten()[0]) for row in prompt]
    assert len(set(rows)) == P


# -- the real MiniLM -----------------------------------------------------------------------------------
def test_minilm_counts_and_text_initialisation(minilm: nn.Module, minilm_path: str) -> None:
    from transformers import AutoTokenizer

    model, path = minilm, minilm_path
    text = "classify the sentiment"
    counts = apply_peft(model, PromptTuning(init="text", init_text=text, tokenizer_name_or_path=path))
    try:
        assert counts.trainable == 20 * 384 == 7_680
        ids = AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False)["input_ids"]
        expected = [ids[i % len(ids)] for i in range(20)]
        table = model.get_input_embeddings().weight.detach()
        torch.testing.assert_close(prompt_layer(model).prompt_embeddings.detach(), table[expected])
        assert count_parameters(model).trainable == 7_680
    finally:
        remove_peft(model)
    small = TINY_MODELS["bert"]()
    with pytest.raises(ValueError, match="vocabulary has 100 rows"):
        apply_peft(small, PromptTuning(init="text", init_text=text * 40, tokenizer_name_or_path=path))
