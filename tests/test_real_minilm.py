"""The real pretrained all-MiniLM-L6-v2 on real SST-2 lines, a few steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import SST2_DIR, fast_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import LoRA, PEFTCallback, load_peft_checkpoint, trainable_parameter_names

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from text_classification import SequenceClassifier, TextClassificationDataModule  # noqa: E402

pytestmark = pytest.mark.skipif(not SST2_DIR.is_dir(), reason="SST-2 data not found next to the repository")


def batch_loss(module: SequenceClassifier, batch: dict[str, torch.Tensor]) -> float:
    module.eval()
    with torch.no_grad():
        return float(module.model(**batch).loss)


def test_lora_trains_real_minilm_on_sst2(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = TextClassificationDataModule(data_dir=str(SST2_DIR), train_size=48, batch_size=16, shuffle=False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = SequenceClassifier(lr=2e-3)
    lora = LoRA(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    checkpoint_cb = ModelCheckpoint(dirpath=tmp_path, filename="adapter")
    trainer = fast_trainer(
        tmp_path, max_epochs=2, callbacks=[PEFTCallback(lora), checkpoint_cb], enable_checkpointing=True
    )
    start = batch_loss(module, batch)
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    assert batch_loss(module, batch) < start

    names = trainable_parameter_names(module)
    counts = {n: p.numel() for n, p in module.named_parameters() if n in names}
    assert (
        sum(v for n, v in counts.items() if "classifier" not in n) == 73_728
    )  # 6 layers x 2 x 8 x (384 + 384)
    assert sum(v for n, v in counts.items() if "classifier" in n) == 384 * 2 + 2

    path = tmp_path / "adapter.ckpt"
    assert path.stat().st_size < 2_000_000  # the full model alone is ~91 MB in fp32
    loaded = load_peft_checkpoint(SequenceClassifier, path)
    with torch.no_grad():
        module.eval()
        expected = module.model(**batch).logits
        torch.testing.assert_close(loaded.model(**batch).logits, expected, atol=0, rtol=0)
