"""The model zoo: every method on tiny random-weight models of 17 transformers architectures.

Each cell (architecture × method) either **works**: the identity at init where the method promises it, every
adapter tensor gets a gradient, two optimizer steps change exactly the adapter's tensors, save and load give
identical outputs, merging (mergeable methods) keeps them, and ``generate()`` runs for decoders and
encoder-decoders; or it **refuses at attach**, leaving the model untouched, with an error that names the model
class and the reason. The matrix is written to ``docs/model_zoo.md``; a stale file fails
:func:`test_zoo_matrix_is_published` (regenerate with ``LIGHTNING_PEFT_WRITE_ZOO=1 pytest tests/test_zoo.py``).
"""

from __future__ import annotations

import copy
import functools
import os
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn
from zoo_models import ZOO, ZooModel

from lightning_peft import (
    IA3,
    Adapter,
    BitFit,
    DoRA,
    LoRA,
    PEFTMethod,
    PrefixTuning,
    PromptTuning,
    apply_peft,
    load_adapter,
    merge_and_unload,
    save_adapter,
    trainable_parameter_names,
)
from lightning_peft.ops.participation import arm, check_forward

DOC = Path(__file__).resolve().parents[1] / "docs" / "model_zoo.md"
METHODS: dict[str, type[PEFTMethod]] = {
    "LoRA": LoRA,
    "DoRA": DoRA,
    "IA3": IA3,
    "Adapter": Adapter,
    "Prefix": PrefixTuning,
    "Prompt": PromptTuning,
    "BitFit": BitFit,
}
#: methods whose adapted model equals the base model at init
IDENTITY_AT_INIT = {"LoRA", "DoRA", "IA3", "Adapter", "BitFit"}
MIN_WORKING = 95


def make_method(name: str, kind: str) -> PEFTMethod:
    if name in ("LoRA", "DoRA"):
        return METHODS[name](r=2)  # type: ignore[call-arg]
    if name == "Adapter":
        # GELU: with ReLU, a 4-wide bottleneck of a random tiny model can be all dead (no gradient for W_up)
        return Adapter(bottleneck_size=4, activation="gelu")
    if name == "Prefix" and kind == "encoder-decoder":  # a prefix in every attention: encoder, decoder, cross
        return PrefixTuning(num_virtual_tokens=3, encoder_prefix=True, cross_attention_prefix=True)
    if name in ("Prefix", "Prompt"):
        return METHODS[name](num_virtual_tokens=3)  # type: ignore[call-arg]
    return METHODS[name]()


def batch(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(3, 90, (2, 6), generator=generator)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding in the second row
    if kind == "encoder":
        return {"input_ids": x, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    if kind == "decoder":
        return {"input_ids": x, "attention_mask": mask, "labels": x}
    labels = torch.randint(3, 90, (2, 4), generator=generator)
    return {"input_ids": x, "attention_mask": mask, "labels": labels}


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def model_class_names(model: nn.Module) -> set[str]:
    from transformers import PreTrainedModel

    return {type(m).__name__ for m in model.modules() if isinstance(m, PreTrainedModel)}


@functools.cache
def run_cell(model_name: str, method_name: str) -> str:
    """ "works", or "refused: <reason>"; an AssertionError (or any crash) fails the cell's test."""
    spec = next(z for z in ZOO if z.name == model_name)
    model = spec.build()
    inputs = batch(spec.kind)
    base_out = logits(model, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        apply_peft(model, make_method(method_name, spec.kind))
    except (ValueError, TypeError) as error:
        message = str(error)
        # refused before touching the model, naming the model class
        assert any(n in message for n in model_class_names(model)), message
        assert not any(p.requires_grad is False for p in model.parameters()), "flags changed by a refusal"
        after = model.state_dict()
        assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
        return "refused: " + message
    check_works(spec, method_name, model, inputs, base_out)
    return "works"


def check_works(
    spec: ZooModel,
    method_name: str,
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    base_out: torch.Tensor,
) -> None:
    if method_name in IDENTITY_AT_INIT:
        torch.testing.assert_close(logits(model, inputs), base_out, atol=1e-5, rtol=0)
    trainable = trainable_parameter_names(model)
    assert trainable, "nothing to train"
    params = dict(model.named_parameters())
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Adam with a tiny eps: every tensor with a non-zero gradient moves visibly, however small the gradient
    optimizer = torch.optim.Adam([params[n] for n in trainable], lr=1e-2, eps=1e-30)
    for step in range(
        2
    ):  # two steps: LoRA's A (DoRA's, the adapter's down projection) moves once B is non-zero
        arm(model)
        loss = model(**inputs).loss
        check_forward(model, loss)  # every method took part (participation guard)
        loss.backward()
        if step == 0:
            no_grad = [n for n in trainable if params[n].grad is None]
            assert not no_grad, f"no gradient: {no_grad}"
        optimizer.step()
        optimizer.zero_grad()
    end = model.state_dict()
    changed = {k for k in end if not torch.equal(end[k], start[k])}
    assert changed == set(trainable), (sorted(changed ^ set(trainable)))[:5]
    adapted = logits(model, inputs)
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(model, folder)
        loaded = load_adapter(spec.build(), folder)
    torch.testing.assert_close(logits(loaded, inputs), adapted, atol=1e-6, rtol=0)
    if METHODS[method_name].mergeable:
        merged = merge_and_unload(copy.deepcopy(model))
        torch.testing.assert_close(logits(merged, inputs), adapted, atol=1e-4, rtol=1e-4)
    if spec.kind != "encoder":
        generated = loaded.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=2,
            do_sample=False,
        )
        assert generated.shape[0] == 2


@pytest.mark.parametrize("spec", ZOO, ids=[z.name for z in ZOO])
def test_every_method_works_or_refuses_at_attach(spec: ZooModel) -> None:
    for method_name in METHODS:
        try:
            run_cell(spec.name, method_name)
        except Exception as error:  # noqa: BLE001 - name the failing cell
            raise AssertionError(f"{spec.name} × {method_name}: {type(error).__name__}: {error}") from error


def short_reason(outcome: str) -> str:
    reason = outcome.removeprefix("refused: ").split(". ")[0].split("; ")[0]
    return reason.replace("|", "\\|").replace("\n", " ")


def matrix() -> str:
    header = "| model | kind | " + " | ".join(METHODS) + " |"
    rows = [header, "|" + "---|" * (len(METHODS) + 2)]
    notes: list[str] = []
    for spec in ZOO:
        cells = []
        for method_name in METHODS:
            outcome = run_cell(spec.name, method_name)
            if outcome == "works":
                cells.append("✓")
            else:
                notes.append(f"- **{spec.name} × {method_name}**: {short_reason(outcome)}")
                cells.append(f"refused ({len(notes)})")
        rows.append(f"| {spec.name} | {spec.kind} | " + " | ".join(cells) + " |")
    working = sum(row.count("✓") for row in rows)
    total = len(ZOO) * len(METHODS)
    return "\n".join(
        [
            "# Model zoo",
            "",
            "<!-- generated by tests/test_zoo.py: LIGHTNING_PEFT_WRITE_ZOO=1 pytest tests/test_zoo.py -->",
            "",
            f"Every method on {len(ZOO)} architectures: {working} of {total} cells work, the others refuse at "
            "attach with an error that names the model class and the reason (and leave the model untouched).",
            "",
            "Each model is a tiny random-weight model built from its transformers config (2 layers, hidden size "
            "32), with the default targets of each method (`target_modules=None`). A cell marked ✓ passed, in "
            "`tests/test_zoo.py`: the identity at init (LoRA, DoRA, IA3, Adapter, BitFit), a gradient for every "
            "adapter tensor, exactly the adapter's tensors changed by two optimizer steps, identical outputs "
            "after `save_adapter`/`load_adapter`, the same outputs after `merge_and_unload` (LoRA, DoRA, IA3, "
            "BitFit) and `generate()` for decoders and encoder-decoders. Prefix tuning on encoder-decoders runs "
            "with `encoder_prefix=True, cross_attention_prefix=True`: a prefix in the encoder's self-attention, "
            "the decoder's self-attention and the cross-attention (HF PEFT's default layout, decoder "
            "self-attention only, is compared with HF PEFT in `tests/test_encoder_decoder.py`).",
            "",
            *rows,
            "",
            "Refusals:",
            "",
            *notes,
            "",
        ]
    )


def test_zoo_matrix_is_published() -> None:
    text = matrix()
    assert text.count("✓") >= MIN_WORKING
    if os.environ.get("LIGHTNING_PEFT_WRITE_ZOO") == "1":
        DOC.write_text(text, encoding="utf-8")
    current = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    assert current == text, (
        f"{DOC} is stale: regenerate it with `LIGHTNING_PEFT_WRITE_ZOO=1 python -m pytest tests/test_zoo.py` "
        "and commit the result"
    )
