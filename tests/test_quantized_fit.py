"""Full QLoRA fits with a validation loop inside and at the end of every epoch, through PEFTCallback, PEFTMixin
and examples/configs/sst2_qlora.yaml (tiny model): the sequence train -> validate -> train -> save -> load that
bitsandbytes' AVX512-BF16 CPU packing broke. On a CPU with AVX512-BF16 bitsandbytes' packing is on at load
(checked), so these fits run into its kernel unless lightning-peft keeps it off; on any CPU the result must be
the same bits as a fit with the packing switched off from the start (what a CPU without AVX512-BF16 does)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import fast_trainer, hf_loader, model_output, tiny_batch
from lightning.pytorch.callbacks import ModelCheckpoint
from quantized_helpers import assert_bit_identical, load_bert, quantized_tensors, save_tiny_bert
from test_quantized_lightning import QuantizedClassifier, QuantizedMixinClassifier, adapter, lora

from lightning_peft import PEFTCallback, load_adapter, load_peft_checkpoint, save_adapter

bnb = pytest.importorskip("bitsandbytes")

from bitsandbytes.functional import has_avx512bf16  # noqa: E402

from lightning_peft.core.quantized import is_packed  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def four_bit(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def packing_off(module: torch.nn.Module) -> torch.nn.Module:
    """What a CPU without AVX512-BF16 does: bitsandbytes never packs."""
    for layer in four_bit(module):
        layer.support_avx512bf16_for_cpu = False
    return module


def fit_with_validation(module: Any, root: Path, callbacks: Callable[[], list[Any]]) -> Any:
    """2 epochs of 4 batches, validating after 2 batches and at each epoch's end, then validate once more and
    train a third epoch from the last checkpoint: train -> validate -> train -> validate -> train."""
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    trainer = fast_trainer(
        root,
        max_epochs=2,
        val_check_interval=0.5,
        enable_checkpointing=True,
        callbacks=[*callbacks(), checkpoint],
    )
    trainer.fit(module, hf_loader("bert"), hf_loader("bert", n=4))
    trainer.validate(module, hf_loader("bert", n=4))
    resumed = fast_trainer(root, max_epochs=3, enable_checkpointing=False, callbacks=callbacks())
    resumed.fit(module, hf_loader("bert"), hf_loader("bert", n=4), ckpt_path=root / "ckpt" / "last.ckpt")
    return trainer


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq"])
def test_callback_fit_with_validation_saves_and_loads_exactly(
    tmp_path: Path, bert_dir: Path, kind: str
) -> None:
    module = QuantizedClassifier(str(bert_dir), kind)
    assert {layer.support_avx512bf16_for_cpu for layer in four_bit(module)} == {has_avx512bf16()}
    frozen = quantized_tensors(module)
    torch.manual_seed(0)
    trainer = fit_with_validation(module, tmp_path / "a", lambda: [PEFTCallback(lora())])
    assert not any(is_packed(layer.weight) for layer in four_bit(module))
    assert_bit_identical(frozen, quantized_tensors(module))

    # the same fit on a CPU without AVX512-BF16: the same bits
    reference = packing_off(QuantizedClassifier(str(bert_dir), kind))
    torch.manual_seed(0)
    fit_with_validation(reference, tmp_path / "b", lambda: [PEFTCallback(lora())])
    trained, expected = adapter(module), adapter(reference)
    assert trained.keys() == expected.keys()
    assert all(torch.equal(trained[n], expected[n]) for n in trained)

    # save (a Lightning checkpoint and an adapter folder) and load onto fresh 4-bit bases: the same logits
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    module.eval()
    batch = tiny_batch("bert")
    logits = model_output(module.model, batch)
    save_adapter(module, tmp_path / "adapter")  # the adapter is attached to the LightningModule
    fresh = load_adapter(load_bert(bert_dir, kind), tmp_path / "adapter").eval()
    assert torch.equal(model_output(fresh, batch), logits)
    loaded = load_peft_checkpoint(QuantizedClassifier, tmp_path / "final.ckpt").eval()
    assert torch.equal(model_output(loaded.model, batch), logits)
    assert torch.equal(model_output(reference.eval().model, batch), logits)


def test_mixin_fit_with_validation_saves_and_loads_exactly(tmp_path: Path, bert_dir: Path) -> None:
    module = QuantizedMixinClassifier(str(bert_dir), "nf4-dq")
    frozen = quantized_tensors(module)
    torch.manual_seed(0)
    fit_with_validation(module, tmp_path / "a", list)
    assert_bit_identical(frozen, quantized_tensors(module))
    reference = QuantizedMixinClassifier(str(bert_dir), "nf4-dq")
    packing_off(reference)
    torch.manual_seed(0)
    fit_with_validation(reference, tmp_path / "b", list)
    trained, expected = adapter(module), adapter(reference)
    assert trained.keys() == expected.keys() and all(torch.equal(trained[n], expected[n]) for n in trained)

    loaded = QuantizedMixinClassifier.load_from_checkpoint(tmp_path / "a" / "ckpt" / "last.ckpt").eval()
    module.eval()
    batch = tiny_batch("bert")
    # last.ckpt is from the end of the second epoch; the module trained a third one since
    second = QuantizedMixinClassifier(str(bert_dir), "nf4-dq")
    torch.manual_seed(0)
    trainer = fast_trainer(tmp_path / "c", max_epochs=2, val_check_interval=0.5)
    trainer.fit(second, hf_loader("bert"), hf_loader("bert", n=4))
    second.eval()
    assert torch.equal(model_output(loaded.model, batch), model_output(second.model, batch))
    assert_bit_identical(frozen, quantized_tensors(loaded))


#: letters and word pieces: the WordPiece tokenizer spells any lower-case word with these
_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
_VOCAB += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list(".,'!?-")


def tiny_bert_with_tokenizer(folder: Path) -> Path:
    from helpers import VOCAB
    from transformers import BertTokenizerFast

    save_tiny_bert(folder)
    words = _VOCAB + [f"[unused{i}]" for i in range(VOCAB - len(_VOCAB))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def test_qlora_example_config_fits_with_validation_inside_every_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/configs/sst2_qlora.yaml as shipped (4-bit NF4 with double quantization, LoRA through
    PEFTCallback), with the model and the data made tiny on the command line."""
    root = Path(__file__).resolve().parents[1]
    if not (root.parent / "shared" / "data" / "sst2").is_dir():
        pytest.skip("needs ../shared/data/sst2")
    folder = tiny_bert_with_tokenizer(tmp_path / "tiny")
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(sys, "argv", ["lightning-peft"])
    from lightning_peft.cli import cli

    overrides = [
        *("--model.model_name_or_path", str(folder), "--data.model_name_or_path", str(folder)),
        *(
            "--data.train_size",
            "16",
            "--data.val_size",
            "8",
            "--data.batch_size",
            "4",
            "--data.max_length",
            "16",
        ),
        *("--trainer.max_epochs", "2", "--trainer.val_check_interval", "0.5"),
        *("--trainer.logger.init_args.save_dir", str(tmp_path / "runs")),
        *("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"),
    ]
    fitted = cli(["fit", "--config", str(root / "examples" / "configs" / "sst2_qlora.yaml"), *overrides])
    model = fitted.model.model
    assert fitted.trainer.current_epoch == 2 and fitted.trainer.global_step == 8
    assert four_bit(model) and not any(is_packed(layer.weight) for layer in four_bit(model))
    assert not any(layer.support_avx512bf16_for_cpu for layer in four_bit(model))
    log_dir = Path(fitted.trainer.log_dir)
    rows = (log_dir / "metrics.csv").read_text().splitlines()
    assert sum(1 for row in rows[1:] if row.split(",")[rows[0].split(",").index("val_loss")]) == 4
    fresh = load_bert(folder, "nf4-dq")
    load_adapter(fresh, log_dir / "adapter").eval()
    ids = {"input_ids": torch.randint(5, 60, (2, 12), generator=torch.Generator().manual_seed(0))}
    assert torch.equal(model_output(fresh, ids), model_output(model.eval(), ids))
