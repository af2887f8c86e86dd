"""CausalLMSFT: packed = unpacked loss and gradients, accumulation normalised over the window, val_acc scoring."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from tiny_llama import sentiment_rows, tiny_llama, tiny_tokenizer, write_jsonl

from lightning_peft.tasks import CausalLMSFT, ChatDataModule
from lightning_peft.tasks.batching import collate_packed, pack_examples, pad_batch
from lightning_peft.tasks.causal_lm import summed_token_loss
from lightning_peft.tasks.chat_eval import accuracy_by_first_token, accuracy_by_generation, matches
from lightning_peft.tasks.chat_format import ChatExample, encode_chat


def conversations(n: int) -> list[ChatExample]:
    rows = sentiment_rows(n)
    out = []
    for i, r in enumerate(rows):
        answer = r["completion"] + (" i am well" * (i % 3))  # answers of different lengths
        messages = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": answer}]
        out.append(ChatExample(messages, ["negative", "positive"], i % 2))
    return out


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def loss_and_grads(
    module: CausalLMSFT, batch: dict[str, torch.Tensor]
) -> tuple[float, dict[str, torch.Tensor]]:
    module.zero_grad()
    total, count = summed_token_loss(module(**batch).logits, batch["labels"])
    loss = total / count
    loss.backward()
    return loss.item(), grads(module)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_unpacked(attn: str) -> None:
    tok = tiny_tokenizer()
    encoded = [encode_chat(tok, c) for c in conversations(7)]
    module = CausalLMSFT(model=tiny_llama(seed=1, attn=attn)).eval()
    rows = pack_examples(encoded, max_length=64)
    assert len(rows) < len(encoded)  # several conversations share a row
    packed_loss, packed_grads = loss_and_grads(module, collate_packed(rows, tok.pad_token_id))
    plain_loss, plain_grads = loss_and_grads(module, pad_batch(encoded, tok.pad_token_id))
    assert packed_loss == pytest.approx(plain_loss, abs=1e-5)
    assert packed_grads.keys() == plain_grads.keys() and len(plain_grads) > 0
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    # the block-diagonal mask matters: with the plain causal mask the packed rows attend across examples
    leaky = collate_packed(rows, tok.pad_token_id)
    leaky["attention_mask"] = (
        leaky["attention_mask"].any(dim=2, keepdim=True).expand_as(leaky["attention_mask"]).tril()
    )
    assert loss_and_grads(module, leaky)[0] != pytest.approx(plain_loss, abs=1e-4)


class GradCapture(pl.Callback):
    """Keeps the gradients seen at the (single) optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.grads = grads(pl_module)


def test_accumulated_window_gradient_equals_one_big_batch(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(folder)
    convs = conversations(6)
    records = [{"messages": c.messages} for c in convs]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    data = ChatDataModule(
        train_file=str(train),
        model_name_or_path=str(folder),
        batch_size=2,
        shuffle=False,
        group_by_length=False,
    )
    module = CausalLMSFT(model=tiny_llama(seed=2), lr=0.0)
    reference = copy.deepcopy(module)
    capture = GradCapture()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=3,
        limit_val_batches=0,
        callbacks=[capture],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    # the one big batch of the window's 6 conversations: summed token loss / all its answer tokens
    tok = tiny_tokenizer()
    encoded = [encode_chat(tok, c) for c in convs]
    _, expected = loss_and_grads(reference, pad_batch(encoded, tok.pad_token_id))
    assert capture.grads.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(capture.grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    # the usual mean of per-micro-batch means gives a different gradient on these unequal answers
    reference.zero_grad()
    for i in range(0, 6, 2):
        total, count = summed_token_loss(
            reference(**pad_batch(encoded[i : i + 2], tok.pad_token_id)).logits,
            pad_batch(encoded[i : i + 2], tok.pad_token_id)["labels"],
        )
        (total / count / 3).backward()
    name = next(iter(expected))
    assert not torch.allclose(grads(reference)[name], expected[name], atol=1e-5)


def test_val_acc_matches_first_token_scoring_outside_the_trainer(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    tok = tiny_tokenizer()
    tok.save_pretrained(folder)
    convs = conversations(12)
    for c in convs:
        c.messages[-1]["content"] = c.choices[c.answer]
    records = [{"messages": c.messages, "choices": c.choices} for c in convs]
    val = write_jsonl(tmp_path / "val.jsonl", records)
    data = ChatDataModule(
        train_file=str(val), val_file=str(val), model_name_or_path=str(folder), batch_size=5
    )
    module = CausalLMSFT(model=tiny_llama(seed=3))
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    metrics = trainer.validate(module, data, verbose=False)[0]
    expected = accuracy_by_first_token(module.model, tok, convs, batch_size=5)
    assert metrics["val_acc"] == pytest.approx(expected)
    # and it is the argmax among the choices' first tokens at the answer position, checked by hand
    one = tok.apply_chat_template(convs[0].messages[:-1], tokenize=False, add_generation_prompt=True)
    ids = tok(one, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        last = module.model(input_ids=ids).logits[0, -1]
    choice_ids = tok.convert_tokens_to_ids(["negative", "positive"])
    assert accuracy_by_first_token(module.model, tok, convs[:1]) == float(
        int(last[choice_ids].argmax()) == convs[0].answer
    )
    assert 0.0 <= metrics["val_loss"] and "val_acc" in metrics


def test_generation_scoring_reads_the_first_word() -> None:
    assert matches("Positive.", "positive") and matches(" negative, clearly", "negative")
    assert not matches("not positive", "positive") and not matches("", "positive")
    tok = tiny_tokenizer()
    convs = conversations(3)
    accuracy, answers = accuracy_by_generation(tiny_llama(seed=4), tok, convs, max_new_tokens=3, batch_size=2)
    assert len(answers) == 3 and 0.0 <= accuracy <= 1.0
    expected = sum(matches(a, c.choices[c.answer]) for a, c in zip(answers, convs)) / 3
    assert accuracy == expected
