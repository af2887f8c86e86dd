"""``lightning-peft fit`` under FSDP2 (``ModelParallelStrategy``, 2 CPU processes over gloo) runs to the end and
writes a loadable adapter: ``after_fit`` calls ``save_adapter`` on every rank, since gathering the sharded
tensors is a collective (calling it on rank 0 alone made rank 0 wait for rank 1 until the process-group
timeout)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from helpers import DictDataset, tiny_bert
from multiprocess import clean_env, run_distributed
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from lightning_peft import load_adapter
from lightning_peft.ops.parameters import trainable_parameter_names

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("distributed")]
ROOT = Path(__file__).resolve().parents[1]


class RankSplitData(pl.LightningDataModule):
    """The FSDP2 tests' data (LightningCLI needs a data module): the tiny BERT batches, split by rank."""

    def train_dataloader(self) -> DataLoader:
        dataset = DictDataset("bert", n=32)
        sampler = DistributedSampler(dataset, shuffle=False) if torch.distributed.is_initialized() else None
        return DataLoader(dataset, batch_size=8, sampler=sampler)


def test_cli_fit_under_fsdp2_completes_and_writes_a_loadable_adapter(tmp_path: Path) -> None:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "strategy": {
                "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
            },
            "max_steps": 2,
            "use_distributed_sampler": False,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
            "callbacks": [
                {
                    "class_path": "lightning_peft.PEFTCallback",
                    "init_args": {
                        "method": {
                            "class_path": "lightning_peft.LoRA",
                            "init_args": {"r": 4, "target_modules": ["query", "value"]},
                        }
                    },
                }
            ],
        },
        # the tiny BERT module of the FSDP2 tests: shards itself in configure_model
        "model": {"class_path": "distributed_script.FSDP2Module", "init_args": {"seed": 0}},
        "data": {"class_path": "test_fsdp2_cli.RankSplitData"},
    }
    path = tmp_path / "fsdp2.yaml"
    path.write_text(yaml.safe_dump(config))
    env = clean_env(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
    )
    # the hang this guards against lasts until the process-group timeout (30 minutes)
    command = [sys.executable, "-m", "lightning_peft.cli", "fit", "--config", str(path)]
    proc = run_distributed(command, env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    folder = tmp_path / "run" / "adapter"
    assert "adapter saved to" in proc.stderr + proc.stdout
    model = tiny_bert()
    load_adapter(model, folder)
    trained = {n: p for n, p in model.named_parameters() if n in set(trainable_parameter_names(model))}
    assert len(trained) == 8
    assert all(torch.count_nonzero(p) > 0 for n, p in trained.items() if "lora_B" in n)  # trained, gathered
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".adapter")]  # no leftovers
