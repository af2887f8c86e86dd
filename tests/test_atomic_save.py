"""An adapter folder is replaced as a unit: a save killed at any moment leaves the old save or the new one."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import MLP

from lightning_peft import LoRA, apply_peft, load_adapter, save_adapter, trainable_parameter_names
from lightning_peft.files.atomic import OLD_TAG, TMP_TAG, replace_folder

KILLS = 50


def lora_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    model = MLP(d_in=64, hidden=256)
    apply_peft(model, LoRA(r=32, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    return model


def fill(model: torch.nn.Module, value: float) -> None:
    names = set(trainable_parameter_names(model))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in names:
                param.fill_(value)


def saved_value(folder: Path) -> float:
    """The one value every adapter tensor in ``folder`` holds (the save's counter); fails on a mixed folder."""
    model = MLP(d_in=64, hidden=256)
    load_adapter(model, folder)
    names = set(trainable_parameter_names(model))
    values = {float(v) for n, p in model.named_parameters() if n in names for v in p.detach().unique()}
    assert len(values) == 1, f"a torn save: adapter tensors hold {sorted(values)}"
    return values.pop()


def save_forever(folder: str, start: int, ready: multiprocessing.synchronize.Event) -> None:
    torch.set_num_threads(1)
    model = lora_mlp()
    counter = start
    while True:
        counter += 1
        fill(model, float(counter))
        save_adapter(model, folder)
        ready.set()  # from here on, every moment of the loop is inside or between saves


def test_sigkill_during_saves_never_tears_the_folder(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    folder = tmp_path / "adapter"
    model = lora_mlp()
    fill(model, 1.0)
    save_adapter(model, folder)  # (the first save pays for lazy imports)
    started = time.perf_counter()
    save_adapter(model, folder)
    one_save = time.perf_counter() - started
    context = multiprocessing.get_context("fork")  # no re-import of torch per child: 50 kills stay fast
    rng = random.Random(0)
    last = 1.0
    seen = set()
    for trial in range(KILLS):
        ready = context.Event()
        child = context.Process(target=save_forever, args=(str(folder), int(last) + 1000 * trial, ready))
        child.start()
        assert ready.wait(30)
        time.sleep(rng.uniform(0.0, 3 * one_save))  # anywhere within the next few saves
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        value = saved_value(folder)  # loads, and holds exactly one save
        assert value >= last
        last = value
        seen.add(value)
    assert len(seen) == KILLS  # every child completed a save before its kill: kills hit saves at work
    # the next save clears what killed saves left behind
    save_adapter(model, folder)
    assert not [p for p in tmp_path.iterdir() if TMP_TAG in p.name or OLD_TAG in p.name]


def test_killed_between_the_two_renames_recovers(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    model = lora_mlp()
    fill(model, 3.0)
    save_adapter(model, folder)
    os.rename(folder, tmp_path / f".adapter{OLD_TAG}x")  # the first rename happened, the second did not
    (tmp_path / f".adapter{TMP_TAG}y").mkdir()  # and a partial new folder
    assert saved_value(folder) == 3.0
    assert folder.is_dir()


def test_failed_write_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "README.md").write_text("mine")

    def failing(tmp: Path) -> None:
        (tmp / "adapter_config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_folder(folder, failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md"]


def test_other_files_in_the_folder_are_kept(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    model = lora_mlp()
    save_adapter(model, folder)
    (folder / "README.md").write_text("mine")
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("also mine")
    save_adapter(model, folder)
    assert (folder / "README.md").read_text() == "mine"
    assert (folder / "extra" / "notes.txt").read_text() == "also mine"


def test_save_onto_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        save_adapter(lora_mlp(), tmp_path / "adapter")
    assert (tmp_path / "adapter").read_text() == "not a folder"


def test_save_into_the_working_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="working directory"):
        save_adapter(lora_mlp(), ".")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_deleted_folder_is_not_resurrected_from_a_leftover(tmp_path: Path) -> None:
    """A save killed after its swap but before deleting the old folder leaves that folder; once the user
    deletes the adapter, the leftover must not come back."""
    folder = tmp_path / "adapter"
    save_adapter(lora_mlp(), folder)
    os.rename(folder, tmp_path / f".adapter{OLD_TAG}x")  # a leftover with no temporary folder next to it
    with pytest.raises(FileNotFoundError, match="is neither an adapter folder nor a .ckpt file"):
        load_adapter(MLP(d_in=64, hidden=256), folder)
    assert not folder.exists()
