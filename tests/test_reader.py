"""One reader for everything on disk, export-adapter for any task, and the base model decided once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import fast_trainer, hf_loader, model_output, tiny_batch, tiny_bert, tiny_gpt2
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_peft import LoRA, PEFTCallback, apply_peft, load_adapter, save_adapter
from lightning_peft.cli import main as cli_main
from lightning_peft.core.base_model import AmbiguousBaseModelError, base_prefix
from lightning_peft.files.names import ADAPTER_WEIGHTS
from lightning_peft.files.reader import read_adapter


class CausalLM(pl.LightningModule):
    """A causal LM loaded from a folder, as a user's module would load it from the hub."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


@pytest.fixture
def gpt2_dir(tmp_path: Path) -> str:
    folder = tmp_path / "tiny-gpt2"
    tiny_gpt2().save_pretrained(folder)
    return str(folder)


def trained_checkpoint(module: pl.LightningModule, method: LoRA, tmp_path: Path, kind: str) -> Path:
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = fast_trainer(
        tmp_path, max_steps=3, callbacks=[PEFTCallback(method), ckpt], enable_checkpointing=True
    )
    trainer.fit(module, hf_loader(kind))
    return tmp_path / "last.ckpt"


def test_one_reader_reads_folder_file_and_checkpoint(gpt2_dir: str, tmp_path: Path) -> None:
    module = CausalLM(gpt2_dir)
    path = trained_checkpoint(module, LoRA(r=2, target_modules=["c_attn"]), tmp_path, "gpt2")
    from_ckpt = read_adapter(path)
    assert from_ckpt.key_format == "state_dict" and from_ckpt.base_prefix == "model."
    assert from_ckpt.base == {"base_model_name_or_path": gpt2_dir, "task_type": "CAUSAL_LM"}
    assert from_ckpt.hyper_parameters == {"path": gpt2_dir}

    folder = save_adapter(module, tmp_path / "adapter")
    from_folder = read_adapter(folder)
    from_file = read_adapter(folder / ADAPTER_WEIGHTS)
    assert from_folder.key_format == from_file.key_format == "peft"
    assert [m.to_dict() for m in from_folder.methods] == [m.to_dict() for m in from_ckpt.methods]
    assert from_file.tensors.keys() == from_folder.tensors.keys()
    assert from_folder.base["task_type"] == "CAUSAL_LM"

    # every form loads onto a fresh base with the trained outputs
    batch = tiny_batch("gpt2")
    expected = model_output(module.model.eval(), batch)
    for source in (path, folder, folder / ADAPTER_WEIGHTS):
        fresh = tiny_gpt2()
        load_adapter(fresh, source)
        torch.testing.assert_close(model_output(fresh, batch), expected)


def test_export_adapter_rebuilds_a_causal_lm(gpt2_dir: str, tmp_path: Path) -> None:
    module = CausalLM(gpt2_dir)
    path = trained_checkpoint(module, LoRA(r=2, target_modules=["c_attn"]), tmp_path, "gpt2")
    out = tmp_path / "exported"
    assert cli_main(["export-adapter", str(path), str(out)]) == 0
    fresh = tiny_gpt2()
    load_adapter(fresh, out)
    batch = tiny_batch("gpt2")
    torch.testing.assert_close(model_output(fresh, batch), model_output(module.model.eval(), batch))


def test_export_adapter_without_a_task_asks_for_one(tmp_path: Path) -> None:
    class Bare(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_bert().bert  # a bare encoder: no head, no recorded path

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(input_ids=batch["input_ids"]).last_hidden_state.pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    path = trained_checkpoint(Bare(), LoRA(r=2, target_modules=["query"]), tmp_path, "bert")
    with pytest.raises(SystemExit):
        cli_main(["export-adapter", str(path), str(tmp_path / "out")])


class TwoModels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.teacher = tiny_bert(seed=1)
        self.student = tiny_bert(seed=2)


def test_ambiguous_base_model_names_the_candidates_and_the_attribute(tmp_path: Path) -> None:
    model = TwoModels()
    with pytest.raises(AmbiguousBaseModelError, match=r"\['teacher', 'student'\].*peft_base_model"):
        base_prefix(model)
    apply_peft(model, LoRA(r=2, target_modules=["query"], exclude_modules=r"teacher\..*"))
    with pytest.raises(AmbiguousBaseModelError, match="peft_base_model"):
        save_adapter(model, tmp_path / "a")
    model.peft_base_model = "student"  # type: ignore[assignment]
    folder = save_adapter(model, tmp_path / "a")
    # keys are relative to the student, as HF PEFT names them for the bare student
    assert all(k.startswith("base_model.model.bert.") for k in read_adapter(folder).tensors)
    student = tiny_bert(seed=2)
    load_adapter(student, folder)
    batch = tiny_batch("bert")
    torch.testing.assert_close(model_output(student, batch), model_output(model.student, batch))


def test_a_pickle_payload_in_a_checkpoint_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"lightning_peft": {"methods": []}, "hyper_parameters": {"x": Payload()}}, path)
    with pytest.raises(ValueError, match="refused"):
        read_adapter(path)
    assert not marker.exists()
