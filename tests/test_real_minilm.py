"""The real pretrained all-MiniLM-L6-v2 on real SST-2 lines, a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import SST2_DIR, fast_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft as lp
from lightning_peft import LoRA, PEFTCallback, apply_peft, load_peft_checkpoint, trainable_parameter_names
from lightning_peft.tasks import SequenceClassifier, TextClassificationDataModule

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
    module.train()  # batch_loss switched to eval mode, which Lightning would keep for training
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


@pytest.fixture(scope="module")
def sst2_batches() -> list[dict[str, torch.Tensor]]:
    data = TextClassificationDataModule(data_dir=str(SST2_DIR), train_size=32, batch_size=16, shuffle=False)
    data.setup("fit")
    return list(data.train_dataloader())


METHODS = {
    "lora": lambda: LoRA(r=8, target_modules=["query", "value"]),
    "dora": lambda: lp.DoRA(r=8, target_modules=["query", "value"]),
    "adapter_pfeiffer": lambda: lp.Adapter(placement="pfeiffer", bottleneck_size=24),
    "adapter_houlsby": lambda: lp.Adapter(placement="houlsby", bottleneck_size=24),
    "prefix": lambda: lp.PrefixTuning(num_virtual_tokens=20),
    "prompt": lambda: lp.PromptTuning(num_virtual_tokens=20),
    "bitfit": lambda: lp.BitFit(),
    "ia3": lambda: lp.IA3(),
}
# trainable parameters without the classifier head, derived by hand for hidden 384, 6 layers, FFN 1536
EXPECTED_COUNTS = {
    "lora": 6 * 2 * 8 * (384 + 384),
    "dora": 6 * 2 * (8 * (384 + 384) + 384),
    "adapter_pfeiffer": 6 * (384 * 24 + 24 + 24 * 384 + 384),
    "adapter_houlsby": 2 * 6 * (384 * 24 + 24 + 24 * 384 + 384) + 6 * 2 * 2 * 384,  # + block LayerNorms
    "prefix": 20 * 6 * 2 * 384,
    "prompt": 20 * 384,
    "bitfit": None,  # every bias of the model, checked against the model itself below
    "ia3": 6 * (384 + 384 + 1536),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_real_minilm(name: str, sst2_batches: list[dict[str, torch.Tensor]]) -> None:
    torch.manual_seed(0)
    module = SequenceClassifier(lr=3e-3)
    method = METHODS[name]()
    method.modules_to_save = ["classifier"]
    apply_peft(module, method)
    names = trainable_parameter_names(module)
    count = sum(p.numel() for n, p in module.named_parameters() if n in names and "classifier" not in n)
    if name == "bitfit":
        biases = sum(
            p.numel() for n, p in module.named_parameters() if n.endswith("bias") and "classifier" not in n
        )
        assert count == biases == 26_112
    else:
        assert count == EXPECTED_COUNTS[name]
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    start = sum(batch_loss(module, b) for b in sst2_batches)
    module.train()
    for _ in range(3):
        for batch in sst2_batches:
            module.model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert sum(batch_loss(module, b) for b in sst2_batches) < start


def test_prefix_tuning_with_gradient_checkpointing_on_real_minilm(
    sst2_batches: list[dict[str, torch.Tensor]],
) -> None:
    """``SequenceClassifier(gradient_checkpointing=True)`` (``--model.gradient_checkpointing true``) with
    prefix tuning: the same loss and gradients as without checkpointing."""
    batch = sst2_batches[0]
    steps = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = SequenceClassifier(gradient_checkpointing=checkpointing)
        for sub in module.modules():  # deterministic: both runs must see the same graph
            if isinstance(sub, torch.nn.Dropout):
                sub.p = 0.0
        apply_peft(module, lp.PrefixTuning(num_virtual_tokens=20, modules_to_save=["classifier"]))
        assert module.model.is_gradient_checkpointing == checkpointing
        loss = module.model(**batch).loss
        loss.backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
        steps.append((loss.detach(), grads))
    (loss, expected), (checkpointed_loss, got) = steps
    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-6, rtol=0)
    assert set(got) == set(expected) and len(got) == 3  # the prefix and the classifier's weight and bias
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-4, msg=name)
