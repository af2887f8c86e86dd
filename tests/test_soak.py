"""Soak: 1,000 attach/remove cycles and 1,000 save/load cycles on a small model keep memory flat.

The adapter is sized so that a leak shows: each cycle creates about 0.2 MB of adapter tensors (LoRA r=32 on two
256-wide layers), so keeping every cycle's tensors alive would grow RSS by about 200 MB, far past the bound.
Memory is resident set size from /proc (Linux), measured after a warm-up that fills allocator caches.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from lightning_peft import LoRA, PEFTLayer, apply_peft, load_adapter, remove_peft, save_adapter

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
CYCLES = 1000
WARMUP = 100
#: allowed RSS growth over the 1,000 cycles (a leak of the adapters would be ~200 MB)
BOUND_MB = 40


def rss_mb() -> float:
    gc.collect()
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def small_model() -> torch.nn.Module:
    from helpers import MLP

    torch.manual_seed(0)
    return MLP(d_in=256, hidden=256)


def method() -> LoRA:
    return LoRA(r=32, target_modules=["fc1", "fc2"], modules_to_save=["head"])


def live_layers() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated reduce_op object warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(isinstance(o, PEFTLayer) for o in gc.get_objects())


def test_attach_remove_cycles_keep_memory_flat() -> None:
    model = small_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}

    def cycle() -> None:
        apply_peft(model, method())
        remove_peft(model)

    for _ in range(WARMUP):
        cycle()
    layers = live_layers()  # (other tests in this process may keep models of their own)
    start = rss_mb()
    for _ in range(CYCLES):
        cycle()
    growth = rss_mb() - start
    assert growth < BOUND_MB, f"RSS grew by {growth:.1f} MB over {CYCLES} attach/remove cycles"
    assert live_layers() == layers  # no removed layer is kept alive by anything
    state = model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    assert all(p.requires_grad for p in model.parameters())


def test_save_load_cycles_keep_memory_flat(tmp_path: Path) -> None:
    # tmpfs where there is one: fsync there is free, so 1,000 saves take seconds
    root = Path(tempfile.mkdtemp(dir="/dev/shm")) if Path("/dev/shm").is_dir() else tmp_path
    folder = root / "adapter"
    model = small_model()
    apply_peft(model, method())
    target = small_model()  # attached by its first load_adapter; later loads replace its adapter's values

    def cycle(i: int) -> None:
        with torch.no_grad():
            model.fc1.lora_B.fill_(float(i))
        save_adapter(model, folder)
        load_adapter(target, folder)
        assert target.fc1.lora_B[0, 0].item() == float(i)

    try:
        for i in range(WARMUP):
            cycle(i)
        layers = live_layers()
        start = rss_mb()
        for i in range(CYCLES):
            cycle(i)
        growth = rss_mb() - start
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    assert growth < BOUND_MB, f"RSS grew by {growth:.1f} MB over {CYCLES} save/load cycles"
    assert live_layers() == layers  # no loaded copy is kept alive
