"""FSDP1 (``FSDPStrategy``) checks for tests/gpu/test_fsdp_gpu.py: ``python tests/gpu/fsdp_script.py OUT``.

Needs CUDA; uses up to 2 GPUs (with one GPU, FSDP1 still wraps, flattens and gathers: every code path of
lightning-peft runs, only the sharding is trivial). Writes ``results_rank<r>.json`` and adapter tensors into
OUT. The step that ends in an expected error goes last: the launcher then stops the other ranks.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
from distributed_script import BATCH_PER_RANK, DDPModule, SeedAtSetup, lora  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy  # noqa: E402

from lightning_peft import PEFTCallback, adapter_state_dict, save_adapter  # noqa: E402
from lightning_peft.distributed import peft_auto_wrap_policy  # noqa: E402

DEVICES = min(2, torch.cuda.device_count())
MIXED_UNIT_WARNING = "has both parameters with requires_grad=True and False"


class Probe(Callback):
    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        units = [m for m in trainer.strategy.model.modules() if isinstance(m, FSDP)]
        self.info = {
            "wrapper": type(trainer.strategy.model).__name__,
            "use_orig_params": trainer.strategy.kwargs.get("use_orig_params"),
            "fsdp_units": len(units),
            "trainable_tensors": sum(p.requires_grad for p in pl_module.parameters()),
            "optimizer_tensors": sum(len(g["params"]) for g in trainer.optimizers[0].param_groups),
        }


def strategy(**kwargs: Any) -> FSDPStrategy:
    return FSDPStrategy(auto_wrap_policy=peft_auto_wrap_policy(), state_dict_type="full", **kwargs)


def module() -> DDPModule:
    m = DDPModule(seed=0)
    m.batch_size = BATCH_PER_RANK * 2 // DEVICES  # every step sees the reference's 16 samples
    return m


def trainer(out: Path, callbacks: list[Callback], fsdp: FSDPStrategy, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="gpu",
        devices=DEVICES,
        strategy=fsdp,
        max_epochs=2,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=[SeedAtSetup(), PEFTCallback(lora(), verbose=False), *callbacks],
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def gathered_adapter(t: pl.Trainer) -> dict[str, torch.Tensor]:
    """Full adapter tensors: FSDP1 holds flat shards, so gather them (a collective: every rank calls)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(t.strategy.model, writeback=False):
        return {k: v.detach().cpu().clone() for k, v in adapter_state_dict(t.lightning_module).items()}


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"devices": DEVICES}

    # 1. train with the PEFT wrap policy; adapter-only full-state checkpoints every epoch
    probe = Probe()
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1, every_n_epochs=1)
    t = trainer(out, [probe, checkpoints], strategy())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(module())
    results["probe"] = probe.info
    results["mixed_unit_warnings"] = [
        str(w.message)[:300] for w in caught if MIXED_UNIT_WARNING in str(w.message)
    ]
    rank = t.global_rank
    torch.save(gathered_adapter(t), out / f"final_rank{rank}.pt")

    # 2. save_adapter refuses FSDP1's flat shards with a pointer to the checkpoint route
    try:
        save_adapter(t.lightning_module, out / "adapter")
        results["save_adapter_error"] = None
    except RuntimeError as err:
        results["save_adapter_error"] = str(err)

    # 3. resume from the first epoch's checkpoint
    first = sorted((out / "ckpt").glob("epoch=0*.ckpt"))[0]
    t = trainer(out, [], strategy(), enable_checkpointing=False)
    t.fit(module(), ckpt_path=str(first))
    torch.save(gathered_adapter(t), out / f"resumed_rank{rank}.pt")

    # 4. use_orig_params=False is refused before anything is attached (last: the error ends the group)
    t = trainer(out, [], strategy(use_orig_params=False), enable_checkpointing=False)
    try:
        t.fit(module())
        results["orig_params_error"] = None
    except Exception as err:  # noqa: BLE001 - the test asserts on the message
        results["orig_params_error"] = f"{type(err).__name__}: {err}"
        results["orig_params_traceback"] = traceback.format_exc()[-2000:]

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    (out / f"results_rank{local_rank}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
