"""DDP (``strategy="ddp"`` and ``"ddp_spawn"``) with 2 CPU processes over gloo.

Each test runs ``tests/distributed_script.py`` once in a subprocess (several fits per run, because
starting processes on 2 cores is slow) and checks what it wrote. One test per run: ``xdist_group`` cannot be
relied on to keep several tests that share a run on one worker (with pytest 9.2 and xdist 3.8 it is ignored). The reference is one process with
batch 16 on the same 32 samples; DDP runs 2 processes with batch 8 each and an unshuffled
``DistributedSampler``, so every optimizer step sees the same 16 samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_script import max_diff, run_script

from lightning_peft import LoRA, load_adapter, load_peft_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("distributed")]

TOLERANCE = 1e-5


def reference() -> dict[str, torch.Tensor]:
    import distributed_script

    return distributed_script.reference_adapter()  # cached: computed once per process


def check_reference_trains(reference: dict[str, torch.Tensor]) -> None:
    # lora_B starts at zero: the equivalence tests below compare adapters that really moved
    moved = [k for k in reference if k.endswith("lora_B")]
    assert moved and all(reference[k].abs().max() > 1e-3 for k in moved)


def check_registers_only_the_trainable_parameters(ddp_run: tuple[Path, list[dict[str, Any]]]) -> None:
    _, results = ddp_run
    assert len(results) == 2
    for rank_results in results:
        probe = rank_results["probe"]
        assert probe["wrapper"] == "DistributedDataParallel"
        assert probe["ddp_param_tensors"] == probe["trainable_tensors"] == 10  # 8 LoRA + classifier w, b
        assert probe["ddp_param_bytes"] == probe["trainable_bytes"]
        assert probe["total_tensors"] > 4 * probe["trainable_tensors"]


def check_two_processes_match_one_process(
    ddp_run: tuple[Path, list[dict[str, Any]]], reference: dict[str, torch.Tensor]
) -> None:
    out, _ = ddp_run
    rank0, rank1 = torch.load(out / "final_rank0.pt"), torch.load(out / "final_rank1.pt")
    assert max_diff(rank0, rank1) == 0.0  # DDP keeps the replicas identical
    assert max_diff(rank0, reference) < TOLERANCE


def check_resume_is_exact(ddp_run: tuple[Path, list[dict[str, Any]]]) -> None:
    out, _ = ddp_run
    final = torch.load(out / "final_rank0.pt")
    for rank in (0, 1):
        assert max_diff(torch.load(out / f"resumed_rank{rank}.pt"), final) == 0.0  # bit-exact


def check_checkpoints_are_adapter_only_and_written_once(
    ddp_run: tuple[Path, list[dict[str, Any]]], reference: dict[str, torch.Tensor]
) -> None:
    out, _ = ddp_run
    written = (out / "writes_rank0.txt").read_text().split()
    assert len(written) == 2 and not (out / "writes_rank1.txt").exists()  # 2 epochs, rank 0 only
    for path in written:
        checkpoint = torch.load(path, weights_only=False)
        assert set(checkpoint["state_dict"]) == set(reference)
        assert "lightning_peft" in checkpoint
    import distributed_script

    last = sorted(written)[-1]
    loaded = load_peft_checkpoint(distributed_script.DDPModule, last)
    final = torch.load(out / "final_rank0.pt")
    params = dict(loaded.named_parameters())
    assert max((params[k] - v).abs().max().item() for k, v in final.items()) == 0.0


def check_save_adapter_on_every_rank_writes_one_loadable_adapter(
    ddp_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    from helpers import tiny_bert

    out, _ = ddp_run
    model = load_adapter(tiny_bert(), out / "adapter")
    final = torch.load(out / "final_rank0.pt")
    params = dict(model.named_parameters())
    assert max(float((params[k.removeprefix("model.")] - v).abs().max()) for k, v in final.items()) == 0.0


def check_unused_adapter_stops_at_the_first_step_naming_the_module(
    ddp_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, results = ddp_run
    for rank_results in results:
        error = rank_results["unused_error"]
        assert error is not None and error.startswith("RuntimeError: lightning-peft:")
        assert "model.bert.pooler.dense" in error and "exclude_modules" in error
        assert "find_unused_parameters=True" in error
        assert rank_results["unused_steps"] == 0  # before the first optimizer step, not at DDP's crash
        assert rank_results["unused_find_true_steps"] == 2  # the remedy the message suggests trains


def test_ddp(tmp_path: Path) -> None:
    """One run of the script (several fits): every check below reads what it wrote."""
    ddp_run = tmp_path, run_script(tmp_path, "ddp")
    ref = reference()
    check_reference_trains(ref)
    check_registers_only_the_trainable_parameters(ddp_run)
    check_two_processes_match_one_process(ddp_run, ref)
    check_resume_is_exact(ddp_run)
    check_checkpoints_are_adapter_only_and_written_once(ddp_run, ref)
    check_save_adapter_on_every_rank_writes_one_loadable_adapter(ddp_run)
    check_unused_adapter_stops_at_the_first_step_naming_the_module(ddp_run)


def test_ddp_spawn(tmp_path: Path) -> None:
    out = tmp_path
    (results,) = run_script(out, "ddp_spawn")  # written by the main process
    for rank in (0, 1):
        probe = json.loads((out / f"probe_rank{rank}.json").read_text())
        assert probe["ddp_param_tensors"] == probe["trainable_tensors"] == 10
    rank0, rank1 = torch.load(out / "spawn_final_rank0.pt"), torch.load(out / "spawn_final_rank1.pt")
    assert max_diff(rank0, rank1) == 0.0
    assert max_diff(rank0, reference()) < TOLERANCE
    # ModelCheckpoint wrote once, adapter-only (the launcher's own .temp.ckpt hands weights to the main process)
    written = [p for p in (out / "writes_rank0.txt").read_text().split() if not p.endswith(".temp.ckpt")]
    assert [Path(p).name for p in written] == ["last.ckpt"]
    assert not (out / "writes_rank1.txt").exists()
    checkpoint = torch.load(written[0], weights_only=False)
    assert max_diff(checkpoint["state_dict"], rank0) == 0.0
    # after fit, the main process's PEFTMixin module has the trained adapter (the callback's has none)
    assert results["main_process_attached"] is False and results["mixin_main_process_attached"] is True
    assert max_diff(torch.load(out / "spawn_mixin_main.pt"), rank0) == 0.0


def test_unused_adapter_warns_in_a_single_process(tmp_path: Path) -> None:
    import distributed_script

    unused_lora = LoRA(r=4, target_modules=["query", "pooler.dense"])
    trainer = distributed_script.trainer(
        tmp_path, "auto", [], unused_lora, devices=1, max_epochs=1, enable_checkpointing=False
    )
    with pytest.warns(UserWarning, match=r"no gradient.*model\.bert\.pooler\.dense"):
        trainer.fit(distributed_script.CLSOnlyModule(seed=0))


def test_prefix_tuning_with_gradient_checkpointing(tmp_path: Path) -> None:
    """Every BERT layer uses the one prefix matrix. Non-reentrant checkpointing, and reentrant with DDP's
    static_graph, match one process; reentrant without static_graph would average part of the prefix's
    gradient (measured: ranks 0.07 apart after 4 steps) and is refused before the first step."""
    from distributed_script import reference_adapter

    results = run_script(tmp_path, "ddp_prefix")
    reference = reference_adapter(method="prefix")
    assert any(k.endswith("prompt_embeddings") for k in reference)
    for name in ("prefix", "prefix_static"):
        rank0, rank1 = torch.load(tmp_path / f"{name}_rank0.pt"), torch.load(tmp_path / f"{name}_rank1.pt")
        assert max_diff(rank0, rank1) == 0.0, name
        assert max_diff(rank0, reference) < TOLERANCE, name
    error = results[0]["reentrant_error"]
    assert error is not None and "PrefixLayer under DDP with reentrant gradient checkpointing" in error
    assert "use_reentrant': False" in error and "static_graph=True" in error
