"""Multi-process checks for tests/test_ddp.py and tests/test_fsdp2.py.

Run as ``python tests/distributed_script.py OUT {ddp,ddp_prefix,ddp_spawn,fsdp2}``. Spawning processes on a 2-core
machine is slow, so one invocation does several fits and writes what the tests assert on into OUT:
``results_<mode>_rank<r>.json`` and adapter tensors (``*.pt``). With ``strategy="ddp"`` and
``ModelParallelStrategy`` Lightning re-runs this script for rank 1, so both ranks execute every step below in
the same order; a step that ends in an expected error goes last, because the launcher then stops rank 1.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
from helpers import DictDataset, HFModule, every_method, tiny_bert  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.data.distributed import DistributedSampler  # noqa: E402

from lightning_peft import (  # noqa: E402
    LoRA,
    PEFTCallback,
    PEFTMethod,
    PEFTMixin,
    PrefixTuning,
    adapter_state_dict,
    save_adapter,
)
from lightning_peft.core.base_model import set_activation_checkpointing  # noqa: E402

N_SAMPLES = 32
BATCH_PER_RANK = 8
EPOCHS = 2


def lora() -> LoRA:
    return LoRA(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])


def prefix() -> PrefixTuning:
    return PrefixTuning(num_virtual_tokens=4, modules_to_save=["classifier"])


METHODS = {"lora": lora, "prefix": prefix}


class SeedAtSetup(Callback):
    """Placed before PEFTCallback: the adapter's random init is the same in every process and run."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.manual_seed(1234)


class DDPModule(HFModule):
    """The tiny BERT module with an unshuffled, rank-split loader (built once the process group exists)."""

    batch_size = BATCH_PER_RANK

    def train_dataloader(self) -> DataLoader:
        dataset = DictDataset("bert", n=N_SAMPLES)
        sampler = DistributedSampler(dataset, shuffle=False) if torch.distributed.is_initialized() else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


class CLSOnlyModule(DDPModule):
    """Classifies from the [CLS] hidden state: BERT still computes its pooler, but the loss ignores it."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hidden = self.model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = self.model.classifier(hidden.last_hidden_state[:, 0])
        return torch.nn.functional.cross_entropy(logits, batch["labels"])


def shard(module: pl.LightningModule) -> None:
    """FSDP2 over the data-parallel mesh: one unit per BERT layer plus the root."""
    from torch.distributed.fsdp import fully_shard

    if module.device_mesh is None:  # a single process (load_peft_checkpoint): nothing to shard
        return
    mesh = module.device_mesh["data_parallel"]
    for layer in module.model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(module.model, mesh=mesh)


class FSDP2Module(DDPModule):
    """Model built in ``__init__``: PEFTCallback attaches in setup, before this shards it."""

    def configure_model(self) -> None:
        shard(self)


class MixinSpawnModule(PEFTMixin, DDPModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.peft_method = lora()


class MixinFSDP2Module(PEFTMixin, DDPModule):
    """Model built in ``configure_model``: ``self.apply_peft()`` runs there, before ``fully_shard``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.model = None  # type: ignore[assignment]
        self.peft_method = lora()

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_bert(seed=self.hparams.seed).train()
            torch.manual_seed(1234)  # the same adapter init as SeedAtSetup gives the callback runs
        self.apply_peft()
        shard(self)


class LateShardModule(DDPModule):
    """Builds and shards in ``configure_model``: PEFTCallback can only attach after sharding -> error."""

    def __init__(self) -> None:
        super().__init__()
        self.model = None  # type: ignore[assignment]

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_bert(seed=0).train()
        shard(self)


class Probe(Callback):
    """Records what the wrapper registered, once the model is wrapped."""

    def __init__(self, out: Path | None = None) -> None:
        self.info: dict[str, Any] = {}
        self.out = out

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wrapper = trainer.strategy.model
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        self.info = {
            "wrapper": type(wrapper).__name__,
            "trainable_tensors": len(trainable),
            "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
            "total_tensors": len(list(pl_module.parameters())),
            "dtensor_params": sum(type(p).__name__ == "DTensor" for p in pl_module.parameters()),
            "dtensor_trainable": sum(type(p).__name__ == "DTensor" for p in trainable),
        }
        if hasattr(wrapper, "_get_ddp_logging_data"):
            logging_data = wrapper._get_ddp_logging_data()
            self.info["ddp_param_tensors"] = int(logging_data["num_parameter_tensors"])
            self.info["ddp_param_bytes"] = int(logging_data["total_parameter_size_bytes"])
        if self.out is not None:  # spawned workers cannot write into the main process's objects
            (self.out / f"probe_rank{trainer.global_rank}.json").write_text(json.dumps(self.info))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.out is not None:
            save_tensors(pl_module, self.out / f"spawn_final_rank{trainer.global_rank}.pt")


class CountingIO(TorchCheckpointIO):
    """Counts checkpoint writes per process (Lightning should write on rank 0 only)."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else -1
        with open(self.out / f"writes_rank{rank}.txt", "a") as f:
            f.write(f"{path}\n")
        super().save_checkpoint(checkpoint, path, storage_options)


def trainer(
    out: Path,
    strategy: str | Strategy,
    callbacks: list[Callback],
    peft: PEFTMethod | bool = True,
    **kwargs: Any,
) -> pl.Trainer:
    """``peft``: the method PEFTCallback attaches (``True``: :func:`lora`), after seeding; ``False``: none."""
    method = lora() if peft is True else peft
    extra = [SeedAtSetup(), PEFTCallback(method, verbose=False)] if method else []
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=EPOCHS,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        deterministic=True,
        callbacks=[*extra, *callbacks],
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def full_adapter(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, gathered whole (``full_tensor`` is a collective under FSDP2: every rank calls)."""
    state = {}
    for name, tensor in adapter_state_dict(module).items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        state[name] = full.detach().cpu().clone()
    return state


def save_tensors(module: torch.nn.Module, path: Path) -> None:
    torch.save(full_adapter(module), path)


@functools.cache
def reference_adapter(epochs: int = EPOCHS, method: str = "lora") -> dict[str, torch.Tensor]:
    """One process, batch 16: what 2 processes x batch 8 must reproduce (computed once per process)."""
    module = DDPModule(seed=0)
    module.batch_size = BATCH_PER_RANK * 2
    t = trainer(
        Path("."), "auto", [], METHODS[method](), devices=1, max_epochs=epochs, enable_checkpointing=False
    )
    t.fit(module)
    return full_adapter(module)


def expect_error(results: dict[str, Any], key: str, fit: Any) -> None:
    try:
        fit()
        results[key] = None
    except Exception as err:  # noqa: BLE001 - the test asserts on the message
        results[key] = f"{type(err).__name__}: {err}"
        results[key + "_traceback"] = traceback.format_exc()[-3000:]


def rank() -> int:
    return torch.distributed.get_rank()


def run_ddp(out: Path, results: dict[str, Any]) -> None:
    # 1. train: what DDP registered, checkpoints written once, 2 x 8 == 1 x 16
    probe = Probe()
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1, every_n_epochs=1)
    module = DDPModule(seed=0)
    trainer(out, "ddp", [probe, checkpoints], plugins=[CountingIO(out)]).fit(module)
    results["probe"] = probe.info
    save_tensors(module, out / f"final_rank{rank()}.pt")
    save_adapter(module, out / "adapter")  # on every rank: rank 0 writes

    # 2. resume from the first epoch's checkpoint: the same final adapter as the uninterrupted run
    first = sorted((out / "ckpt").glob("epoch=0*.ckpt"))[0]
    resumed = DDPModule(seed=0)
    trainer(out, "ddp", [], enable_checkpointing=False).fit(resumed, ckpt_path=str(first))
    save_tensors(resumed, out / f"resumed_rank{rank()}.pt")

    # 3. an adapter on the pooler, which the loss ignores: DDP with find_unused_parameters=True trains ...
    unused_lora = LoRA(r=4, target_modules=["query", "pooler.dense"])

    def unused(strategy: str) -> pl.Trainer:
        return trainer(out, strategy, [], unused_lora, max_epochs=1, enable_checkpointing=False)

    t = unused("ddp_find_unused_parameters_true")
    t.fit(CLSOnlyModule(seed=0))
    results["unused_find_true_steps"] = t.global_step

    # ... plain DDP stops at the first backward with an error naming the module (last: it ends the group)
    t = unused("ddp")
    expect_error(results, "unused_error", lambda: t.fit(CLSOnlyModule(seed=0)))
    results["unused_steps"] = t.global_step


def run_ddp_spawn(out: Path, results: dict[str, Any]) -> None:
    module = DDPModule(seed=0)
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, save_top_k=0)
    trainer(out, "ddp_spawn", [checkpoints, Probe(out)], plugins=[CountingIO(out)]).fit(module)
    from lightning_peft.core.record import is_attached

    # documented pitfall: with the callback, the module in this (main) process never gets the adapter
    results["main_process_attached"] = is_attached(module)

    # PEFTMixin: Lightning hands the trained weights back through load_state_dict, which attaches first
    mixin = MixinSpawnModule(seed=0)
    trainer(out, "ddp_spawn", [SeedAtSetup()], peft=False, enable_checkpointing=False).fit(mixin)
    results["mixin_main_process_attached"] = is_attached(mixin)
    save_tensors(mixin, out / "spawn_mixin_main.pt")


class CheckpointedModule(DDPModule):
    """Gradient checkpointing on every BERT layer, reentrant or not; sharded with FSDP2 if asked."""

    def __init__(self, use_reentrant: bool, sharded: bool = False) -> None:
        super().__init__(seed=0)
        self.use_reentrant, self.sharded = use_reentrant, sharded

    def configure_model(self) -> None:
        kwargs = {"use_reentrant": self.use_reentrant}
        set_activation_checkpointing(self.model, **kwargs)
        if self.sharded:
            shard(self)


def run_ddp_prefix(out: Path, results: dict[str, Any]) -> None:
    """Prefix tuning (one prefix matrix that every layer uses) under DDP with gradient checkpointing."""

    def fit(use_reentrant: bool, strategy: str | Strategy) -> CheckpointedModule:
        module = CheckpointedModule(use_reentrant)
        trainer(out, strategy, [], prefix(), enable_checkpointing=False).fit(module)
        return module

    save_tensors(fit(False, "ddp"), out / f"prefix_rank{rank()}.pt")
    save_tensors(fit(True, DDPStrategy(static_graph=True)), out / f"prefix_static_rank{rank()}.pt")
    # reentrant without static_graph: refused at on_fit_start (last: the error ends the process group)
    expect_error(results, "reentrant_error", lambda: fit(True, "ddp"))


def run_fsdp2(out: Path, results: dict[str, Any]) -> None:
    def strategy() -> ModelParallelStrategy:
        return ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False
        )

    # 1. PEFTCallback: attached in setup, sharded in configure_model; single-file adapter-only checkpoints
    probe = Probe()
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1, every_n_epochs=1)
    module = FSDP2Module(seed=0)
    trainer(out, strategy(), [probe, checkpoints]).fit(module)
    results["probe"] = probe.info
    save_tensors(module, out / f"final_rank{rank()}.pt")
    save_adapter(module, out / "adapter")  # full_tensor() inside is a collective: every rank calls it

    # 2. resume from the first epoch's checkpoint
    first = sorted((out / "ckpt").glob("epoch=0*.ckpt"))[0]
    resumed = FSDP2Module(seed=0)
    trainer(out, strategy(), [], enable_checkpointing=False).fit(resumed, ckpt_path=str(first))
    save_tensors(resumed, out / f"resumed_rank{rank()}.pt")

    # 3. sharded checkpoints (Lightning's default): they keep every tensor, so that resuming works
    sharded = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    checkpoints = ModelCheckpoint(dirpath=out / "sharded", save_top_k=-1, every_n_epochs=1)
    trainer(out, sharded, [checkpoints], max_epochs=1).fit(FSDP2Module(seed=0))
    first = sorted((out / "sharded").glob("epoch=0*.ckpt"))[0]
    results["sharded_is_folder"] = first.is_dir()
    resumed = FSDP2Module(seed=0)
    sharded = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer(out, sharded, [], enable_checkpointing=False).fit(resumed, ckpt_path=str(first))
    save_tensors(resumed, out / f"sharded_resumed_rank{rank()}.pt")

    # 4. PEFTMixin: apply_peft() inside configure_model, before fully_shard
    probe = Probe()
    mixin = MixinFSDP2Module(seed=0)
    trainer(out, strategy(), [probe], peft=False, enable_checkpointing=False).fit(mixin)
    results["mixin_probe"] = probe.info
    save_tensors(mixin, out / f"mixin_rank{rank()}.pt")

    # 5. prefix tuning with reentrant gradient checkpointing (each layer's recompute adds to the prefix's grad)
    checkpointed = CheckpointedModule(use_reentrant=True, sharded=True)
    trainer(out, strategy(), [], prefix(), enable_checkpointing=False).fit(checkpointed)
    save_tensors(checkpointed, out / f"prefix_rank{rank()}.pt")

    # 6. attaching after fully_shard is refused (last: the error ends the process group)
    late = trainer(out, strategy(), [], enable_checkpointing=False)
    expect_error(results, "late_error", lambda: late.fit(LateShardModule()))


# -- FSDP2 on the meta device: every method starts at its init after Lightning's materialisation -----------
META_METHODS = every_method()


class MetaMixinModule(PEFTMixin, DDPModule):
    """Built in ``configure_model``, which ModelParallelStrategy runs on the meta device; ``apply_peft()``
    before ``fully_shard``; Lightning then materialises (``to_empty`` + ``reset_parameters``)."""

    def __init__(self, method: str) -> None:
        super().__init__(seed=0)
        self.model = None  # type: ignore[assignment]
        self.method_name = method

    def configure_peft(self) -> PEFTMethod:
        return META_METHODS[self.method_name]()

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_bert(seed=0).eval()
        self.apply_peft()
        shard(self)


class MetaProbe(Callback):
    """Compares the materialised model with the same base weights without the adapter, before training."""

    def __init__(self, results: dict[str, Any]) -> None:
        self.results = results

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # BERT's non-persistent id buffers have no reset_parameters: a user loads them with the weights
        real = dict(tiny_bert().named_buffers())
        for name, buffer in pl_module.model.named_buffers():
            buffer.copy_(real[name.replace("base_layer.", "")])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=False)  # every rank gets every tensor
        full = get_model_state_dict(pl_module.model, options=options)  # a collective: every rank calls
        plain = tiny_bert(seed=7)
        wanted = plain.state_dict()
        mapped = {key.replace("base_layer.", ""): value for key, value in full.items()}
        missing = sorted(set(wanted) - set(mapped))
        plain.load_state_dict({k: v for k, v in mapped.items() if k in wanted}, strict=False)
        batch = DictDataset("bert", n=4).data
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            adapted = pl_module.model(**inputs).logits
            base = plain(**inputs).logits
        adapter = full_adapter(pl_module)
        self.results[pl_module.method_name] = {
            "max_diff": float((adapted - base).abs().max()),
            "finite": all(bool(t.isfinite().all()) for t in adapter.values()),
            "missing": missing,
            "std": [float(t.float().std()) for t in adapter.values() if t.numel() > 1][:1],
        }


def run_fsdp2_meta(out: Path, results: dict[str, Any]) -> None:
    for method in META_METHODS:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        probe = MetaProbe(results)
        trainer(out, strategy, [probe], peft=False, max_steps=1, enable_checkpointing=False).fit(
            MetaMixinModule(method)
        )


# -- used by the tests (in the pytest process) ------------------------------------------------------------
SCRIPT = Path(__file__).resolve()


def run_script(out: Path, mode: str, timeout: float = 900) -> list[dict[str, Any]]:
    """Run this script in ``mode`` in a subprocess; returns the results JSON of each rank that wrote one."""
    from multiprocess import clean_env, run_distributed

    env = clean_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    # this checkout's package, not whichever copy is installed (an editable install may point elsewhere)
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[1]), env.get("PYTHONPATH", "")])
    proc = run_distributed([sys.executable, str(SCRIPT), str(out), mode], env, timeout)
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"{SCRIPT.name} {mode} failed:\n{tail}"
    files = sorted(out.glob(f"results_{mode}_rank*.json"))
    assert files, f"{SCRIPT.name} {mode} wrote no results:\n{tail}"
    return [json.loads(f.read_text()) for f in files]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    modes = {
        "ddp": run_ddp,
        "ddp_prefix": run_ddp_prefix,
        "ddp_spawn": run_ddp_spawn,
        "fsdp2": run_fsdp2,
        "fsdp2_meta": run_fsdp2_meta,
    }
    modes[mode](out, results)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # the process group may be gone after an expected error
    (out / f"results_{mode}_rank{local_rank}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
