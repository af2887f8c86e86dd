"""FSDP2: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with ``fully_shard`` in
``configure_model``, 2 CPU processes over gloo.

One run of ``tests/distributed_script.py fsdp2`` (one test, see tests/test_ddp.py) trains with PEFTCallback (adapter attached in setup, before
``configure_model`` shards), resumes from a checkpoint, trains with PEFTMixin (``self.apply_peft()`` inside
``configure_model``, before ``fully_shard``), and checks that attaching after sharding is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_script import max_diff, run_script
from safetensors.torch import load_file

from lightning_peft import load_adapter, load_peft_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("distributed")]
TOLERANCE = 1e-5


def check_adapter_is_sharded_with_the_model(run: tuple[Path, list[dict[str, Any]]]) -> None:
    _, results = run
    assert len(results) == 2
    for rank_results in results:
        for key in ("probe", "mixin_probe"):  # PEFTCallback and PEFTMixin
            probe = rank_results[key]
            # attached before fully_shard: the adapter's tensors are DTensors that FSDP2 manages too
            assert probe["dtensor_params"] == probe["total_tensors"]
            assert probe["dtensor_trainable"] == probe["trainable_tensors"] == 10


def check_two_processes_match_one_process(
    run: tuple[Path, list[dict[str, Any]]], reference: dict[str, torch.Tensor]
) -> None:
    out, _ = run
    for name in ("final", "mixin"):
        rank0, rank1 = torch.load(out / f"{name}_rank0.pt"), torch.load(out / f"{name}_rank1.pt")
        assert max_diff(rank0, rank1) == 0.0
        assert max_diff(rank0, reference) < TOLERANCE, name


def check_resume(run: tuple[Path, list[dict[str, Any]]]) -> None:
    out, results = run
    final = torch.load(out / "final_rank0.pt")
    for rank in (0, 1):
        assert max_diff(torch.load(out / f"resumed_rank{rank}.pt"), final) == 0.0  # bit-exact
        # save_distributed_checkpoint=True (the default): a folder of shards that keeps every tensor
        assert max_diff(torch.load(out / f"sharded_resumed_rank{rank}.pt"), final) == 0.0
    assert results[0]["sharded_is_folder"] is True


def check_checkpoint_is_one_small_file_of_full_adapter_tensors(
    run: tuple[Path, list[dict[str, Any]]], reference: dict[str, torch.Tensor]
) -> None:
    import distributed_script

    out, _ = run
    files = sorted((out / "ckpt").iterdir())
    assert [f.name for f in files] == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"]
    assert all(f.is_file() for f in files)  # save_distributed_checkpoint=False: no shard folders
    checkpoint = torch.load(files[-1], weights_only=False)
    state = checkpoint["state_dict"]
    assert set(state) == set(reference)
    for key, tensor in state.items():
        assert type(tensor) is torch.Tensor and tensor.shape == reference[key].shape, key  # gathered
    assert max_diff(state, torch.load(out / "final_rank0.pt")) == 0.0
    # loads in one process, without a process group
    loaded = load_peft_checkpoint(distributed_script.FSDP2Module, files[-1])
    params = dict(loaded.named_parameters())
    assert max(float((params[k] - v).abs().max()) for k, v in state.items()) == 0.0


def check_save_adapter_gathers_full_tensors(run: tuple[Path, list[dict[str, Any]]]) -> None:
    from helpers import tiny_bert

    out, _ = run
    final = torch.load(out / "final_rank0.pt")
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    shapes = {tuple(t.shape) for t in tensors.values()}
    assert (4, 32) in shapes and (32, 4) in shapes  # whole lora_A / lora_B, not a rank's shard
    model = load_adapter(tiny_bert(), out / "adapter")
    params = dict(model.named_parameters())
    assert max(float((params[k.removeprefix("model.")] - v).abs().max()) for k, v in final.items()) == 0.0


def check_prefix_tuning_with_reentrant_checkpointing(run: tuple[Path, list[dict[str, Any]]]) -> None:
    """Unlike DDP, FSDP2 reduces the prefix's gradient after the whole backward: no static graph needed."""
    import distributed_script

    out, _ = run
    rank0, rank1 = torch.load(out / "prefix_rank0.pt"), torch.load(out / "prefix_rank1.pt")
    assert max_diff(rank0, rank1) == 0.0
    assert max_diff(rank0, distributed_script.reference_adapter(method="prefix")) < TOLERANCE


def check_attaching_after_fully_shard_is_refused(run: tuple[Path, list[dict[str, Any]]]) -> None:
    _, results = run
    error = results[0]["late_error"]
    assert error is not None and "already sharded" in error and "apply_peft()" in error


def test_fsdp2(tmp_path: Path) -> None:
    """One run of the script (several fits): every check above reads what it wrote."""
    import distributed_script

    run = tmp_path, run_script(tmp_path, "fsdp2")
    reference = distributed_script.reference_adapter()  # cached: computed once per process
    check_adapter_is_sharded_with_the_model(run)
    check_two_processes_match_one_process(run, reference)
    check_resume(run)
    check_checkpoint_is_one_small_file_of_full_adapter_tensors(run, reference)
    check_save_adapter_gathers_full_tensors(run)
    check_prefix_tuning_with_reentrant_checkpointing(run)
    check_attaching_after_fully_shard_is_refused(run)


def test_fsdp2_meta_device_init_for_every_method(tmp_path: Path) -> None:
    """ModelParallelStrategy builds the model on the meta device (configure_model), the mixin attaches before
    fully_shard, Lightning materialises; at train start each adapter is at its init: LoRA, DoRA (magnitude
    recomputed from the materialised base at on_fit_start), IA3, Adapter and BitFit give the outputs of the
    same base weights without the adapter; prompts and prefixes hold finite values."""
    results = run_script(tmp_path, "fsdp2_meta")
    for rank_results in results:
        assert set(rank_results) == {"lora", "dora", "ia3", "adapter", "prefix", "prompt", "bitfit"}
        for method, found in rank_results.items():
            assert found["finite"] and not found["missing"], method
            if method not in ("prefix", "prompt"):
                assert found["max_diff"] < 1e-5, (method, found)
        assert 0.8 < rank_results["prefix"]["std"][0] < 1.2
        assert 0.2 < rank_results["prompt"]["std"][0] < 0.35  # U(-0.5, 0.5): std 0.29
