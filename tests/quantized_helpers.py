"""Tiny BERT bases loaded in 4-bit and 8-bit by transformers' BitsAndBytesConfig (bitsandbytes runs on CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_peft.tasks.common import QUANTIZATIONS, quantization_kwargs  # noqa: F401 (re-exported)

#: hidden 64 (not the other tests' 32): every weight then fills whole 64-value bitsandbytes blocks
HIDDEN = 64


def save_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 64) with a 2-label head and random biases, saved with ``save_pretrained``."""
    from helpers import VOCAB
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * HIDDEN,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return folder


def load_bert(folder: Path | str, kind: str | None, **overrides: Any) -> nn.Module:
    """The saved tiny BERT, quantized as ``kind`` (``None``: full precision), in eval mode on the CPU."""
    from transformers import BertForSequenceClassification

    kwargs = quantization_kwargs(kind, device_map="cpu", **overrides)
    return BertForSequenceClassification.from_pretrained(folder, **kwargs).eval()


def quantized_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized tensors of every quantized layer (packed weight and statistics; biases are plain floats that
    BitFit trains), keyed by layer and name."""
    from lightning_peft.quantized import quantized_modules

    found: dict[str, torch.Tensor] = {}
    for name, module in quantized_modules(model):
        clean = name.replace(".base_layer", "")
        found.update(
            {f"{clean}.{k}": v.detach().clone() for k, v in module.state_dict().items() if k != "bias"}
        )
    assert found, "the model holds no quantized layer"
    return found


def assert_bit_identical(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert set(before) == set(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"quantized tensors changed: {changed[:5]}"


class ShardedQLoRA(pl.LightningModule):
    """A 4-bit base with a float32 quant storage, sharded with FSDP2's ``fully_shard`` per block."""

    def __init__(self, folder: str, storage: str = "float32") -> None:
        super().__init__()
        self.model = load_bert(folder, "nf4", bnb_4bit_quant_storage=getattr(torch, storage))
        self.model.train()

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)
