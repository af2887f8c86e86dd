"""FSDP1 (``FSDPStrategy``) on CUDA: ``use_orig_params``, the PEFT wrap policy, adapter-only full-state
checkpoints, resume, and the single-process equivalence. Skipped without a GPU; run all of it with
``bash tests/gpu/run_gpu_checks.sh``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed_script import max_diff, reference_adapter  # noqa: E402

from lightning_peft import load_peft_checkpoint  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDPStrategy (FSDP1) needs a CUDA GPU"),
    pytest.mark.distributed,
    pytest.mark.xdist_group("distributed"),
]

SCRIPT = Path(__file__).resolve().parent / "fsdp_script.py"


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("fsdp1")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, tail
    assert (out / "results_rank0.json").is_file(), tail
    return out, json.loads((out / "results_rank0.json").read_text())


def test_wrapping(fsdp_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = fsdp_run
    probe = results["probe"]
    assert probe["wrapper"] == "FullyShardedDataParallel" and probe["use_orig_params"] is True
    # 2 blocks + embeddings + 4 adapters + 4 base layers + classifier + root
    assert probe["fsdp_units"] >= 12
    assert probe["optimizer_tensors"] == probe["trainable_tensors"] == 10
    assert results["mixed_unit_warnings"] == []  # the policy never mixes frozen and trainable tensors


def test_matches_one_process(fsdp_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = fsdp_run
    final = torch.load(out / "final_rank0.pt")
    assert max_diff(final, reference_adapter()) < 1e-4  # CUDA vs CPU float32 arithmetic
    if results["devices"] == 2:
        assert max_diff(final, torch.load(out / "final_rank1.pt")) == 0.0


def test_checkpoint_is_adapter_only_full_tensors_and_loads_in_one_process(
    fsdp_run: tuple[Path, dict[str, Any]],
) -> None:
    import distributed_script

    out, _ = fsdp_run
    final = torch.load(out / "final_rank0.pt")
    last = sorted((out / "ckpt").glob("epoch=1*.ckpt"))[0]
    assert last.is_file()
    state = torch.load(last, weights_only=False, map_location="cpu")["state_dict"]
    assert set(state) == set(final)  # no frozen weights, no _fsdp_wrapped_module in the names
    assert max_diff(state, final) == 0.0
    loaded = load_peft_checkpoint(distributed_script.DDPModule, last)
    params = dict(loaded.named_parameters())
    assert max(float((params[k].detach() - v).abs().max()) for k, v in final.items()) == 0.0


def test_resume(fsdp_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = fsdp_run
    assert max_diff(torch.load(out / "resumed_rank0.pt"), torch.load(out / "final_rank0.pt")) < 1e-6


def test_errors(fsdp_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = fsdp_run
    assert "load_peft_checkpoint" in (results["save_adapter_error"] or "")
    assert "use_orig_params=False" in (results["orig_params_error"] or "")
