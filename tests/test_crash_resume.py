"""Crash-safe training: SIGKILL in the middle of an epoch, resume from the last ``every_n_train_steps``
checkpoint, and the run ends with the same adapter as an uninterrupted one, bit for bit.

Why exact (tolerance 0): the adapter-only checkpoint restores the adapter, the optimizer state and the loop
counters exactly, the training is deterministic on CPU (one thread, no dropout, no shuffling), and the data
loader is resumable: it records how many batches training has consumed (``state_dict``/``load_state_dict``,
which Lightning saves with the loop), so the resumed epoch continues at the next batch instead of restarting at
batch 0 (what a plain ``DataLoader`` does, see REFERENCE.md). The same operations then run in the same order.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import MLPModule, fast_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import LoRA, PEFTCallback, load_adapter, save_adapter
from lightning_peft.core.record import is_attached

BATCHES = 6  # per epoch
EPOCHS = 2
KILL_AT_STEP = 8  # in the second epoch, after 2 of its 6 batches


class PlainBatches:
    """A fixed sequence of batches (each carrying its index), like an unshuffled ``DataLoader``."""

    def __init__(self, n: int = BATCHES, batch_size: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n * batch_size, 8, generator=g)
        y = (x[:, 0] > 0).long()
        self.batches = [
            (
                x[i * batch_size : (i + 1) * batch_size],
                y[i * batch_size : (i + 1) * batch_size],
                torch.tensor(i),
            )
            for i in range(n)
        ]
        self.consumed = 0
        self._start = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        start, self._start = self._start, 0
        yield from self.batches[start:]


class ResumableBatches(PlainBatches):
    """Resumes where training stopped. Lightning fetches one batch ahead, so the position is the count of
    batches *trained on* (set by the module from each batch's index), not of batches handed out."""

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed % len(self.batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._start = self.consumed = state["consumed"]


class ResumableModule(MLPModule):
    def __init__(self, resumable: bool = True) -> None:
        super().__init__(lr=1e-2)
        self.loader = ResumableBatches() if resumable else PlainBatches()

    def train_dataloader(self) -> PlainBatches:
        return self.loader

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        self.loader.consumed = int(index) + 1
        return torch.nn.functional.cross_entropy(self.net(x), y)


class KillAt(pl.Callback):
    """SIGKILLs its own process after optimizer step ``step``, before that step's checkpoint is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def method() -> LoRA:
    return LoRA(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"])


def train(
    root: Path,
    ckpt_path: str | None = None,
    kill_at: int | None = None,
    resumable: bool = True,
    **kwargs: Any,
) -> ResumableModule:
    torch.manual_seed(0)
    module = ResumableModule(resumable)
    callbacks: list[pl.Callback] = [
        PEFTCallback(method(), verbose=False),
        ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0),
    ]
    if kill_at is not None:
        callbacks.insert(0, KillAt(kill_at))
    settings: dict[str, Any] = dict(max_epochs=EPOCHS, callbacks=callbacks, enable_checkpointing=True)
    trainer = fast_trainer(root, **{**settings, **kwargs})
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


def crashing_run(root: str) -> None:
    torch.set_num_threads(1)
    train(Path(root), kill_at=KILL_AT_STEP)


def adapter_tensors(module: torch.nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    save_adapter(module, folder)
    return load_file(str(folder / "adapter_model.safetensors"))


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    reference = adapter_tensors(train(tmp_path / "reference"), tmp_path / "reference_adapter")

    child = multiprocessing.get_context("fork").Process(target=crashing_run, args=(str(tmp_path / "crash"),))
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL
    last = tmp_path / "crash" / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == KILL_AT_STEP - 1  # the killed step's checkpoint was never written
    assert 0 < checkpoint["global_step"] % BATCHES  # mid-epoch

    resumed = train(tmp_path / "crash", ckpt_path=str(last))
    assert resumed.trainer.global_step == EPOCHS * BATCHES
    result = adapter_tensors(resumed, tmp_path / "resumed_adapter")
    assert result.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(result[key], reference[key], atol=0, rtol=0, msg=key)

    # the adapter also loads onto a fresh model from the folder
    fresh = ResumableModule()
    load_adapter(fresh, tmp_path / "resumed_adapter")
    assert is_attached(fresh)


def test_a_plain_loader_would_not_resume_exactly(tmp_path: Path) -> None:
    """Control: without the loader's state the resumed epoch restarts at batch 0 and the adapter differs, so
    the test above can fail."""
    torch.set_num_threads(1)
    reference = adapter_tensors(
        train(tmp_path / "reference", resumable=False), tmp_path / "reference_adapter"
    )
    train(tmp_path / "first", resumable=False, max_steps=KILL_AT_STEP - 1)
    with pytest.warns(UserWarning, match="dataloader is not resumable"):
        resumed = train(
            tmp_path / "first", ckpt_path=str(tmp_path / "first" / "ckpt" / "last.ckpt"), resumable=False
        )
    result = adapter_tensors(resumed, tmp_path / "resumed_adapter")
    assert any(not torch.equal(result[k], reference[k]) for k in reference)
