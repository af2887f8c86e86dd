"""QLoRA on CUDA: Lightning's ``BitsandbytesPrecision`` plugin with PEFTCallback, and FSDP2
(``ModelParallelStrategy``) over a 4-bit base stored in a floating-point dtype. Skipped without a GPU; run all of
tests/gpu with ``bash tests/gpu/run_gpu_checks.sh``.

The plugin replaces ``nn.Linear`` layers at strategy setup and quantizes them when they move to the GPU (on the
CPU its layers fail at the first forward, so tests/test_quantized.py checks the conversion only).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
from helpers import HFModule, hf_loader  # noqa: E402
from quantized_helpers import ShardedQLoRA, save_tiny_bert  # noqa: E402

from lightning_peft import Adapter, LoRA, PEFTCallback, trainable_parameter_names  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes quantizes on CUDA only here"),
    pytest.mark.xdist_group("distributed"),
]
bnb = pytest.importorskip("bitsandbytes")


class AdapterAtStart(pl.Callback):
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        self.values = {n: params[n].detach().clone() for n in trainable_parameter_names(pl_module)}


def gpu_trainer(**kwargs: Any) -> pl.Trainer:
    settings: dict[str, Any] = dict(
        accelerator="gpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False
    )
    return pl.Trainer(**{**settings, "enable_progress_bar": False, **kwargs})


def test_bitsandbytes_precision_plugin_quantizes_the_base_and_trains_the_adapter(tmp_path: Path) -> None:
    from lightning.pytorch.plugins import BitsandbytesPrecision

    from lightning_peft.core.quantized import quantization_of

    module = HFModule("bert", lr=1e-2)
    methods = [
        LoRA(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
        Adapter(placement="pfeiffer", bottleneck_size=8),
    ]
    start = AdapterAtStart()
    trainer = gpu_trainer(
        plugins=BitsandbytesPrecision("nf4-dq", dtype=torch.float32),
        max_epochs=2,
        callbacks=[PEFTCallback(methods), start],
    )
    trainer.fit(module, hf_loader("bert"))
    model = module.model
    query = model.bert.encoder.layer[0].attention.self.query
    assert quantization_of(query.base_layer) == "4bit" and query.base_layer.weight.device.type == "cuda"
    kept = [m for n, m in model.named_modules() if n.endswith(("adapter_down", "adapter_up", "classifier"))]
    assert kept and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in kept)
    params = dict(module.named_parameters())
    assert set(start.values) == set(trainable_parameter_names(module))
    assert all(not torch.equal(params[n].detach(), v) for n, v in start.values.items() if "lora_A" not in n)
    path = tmp_path / "adapter.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert set(state) == set(trainable_parameter_names(module))


@pytest.mark.parametrize("storage", ["float32", "uint8"])
def test_fsdp2_over_a_4bit_base_needs_a_floating_point_storage(tmp_path: Path, storage: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    module = ShardedQLoRA(str(save_tiny_bert(tmp_path / "bert")), storage)
    trainer = gpu_trainer(
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        callbacks=[PEFTCallback(LoRA(r=4, target_modules=["query", "value"]))],
    )
    if storage == "uint8":
        with pytest.raises(TypeError, match="bnb_4bit_quant_storage"):
            trainer.fit(module, hf_loader("bert"))
        return
    trainer.fit(module, hf_loader("bert"))
    query = module.model.bert.encoder.layer[0].attention.self.query
    assert type(query.lora_A).__name__ == "DTensor"
    assert float(query.lora_B.detach().full_tensor().abs().sum()) > 0  # B starts at zero: it trained
