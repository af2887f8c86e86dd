"""One run of ``lightning-peft compare``, in its own process: train, validate, test once, measure.

The process is fresh for every run, so its peak memory belongs to that run alone. Results go to the JSON
file named in the spec; nothing is written there unless the run finished, or its method refused the model at
attach (then the result records the refusal and its reason, and nothing is trained).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_peft.core.record import is_attached
from lightning_peft.files.save import save_adapter
from lightning_peft.library_noise import silence_known_noise
from lightning_peft.lightning.callback import PEFTCallback
from lightning_peft.ops.attach import plan_methods
from lightning_peft.ops.merging import merge_adapter, unmerge_adapter
from lightning_peft.ops.parameters import count_parameters

MiB = 2**20


def _status_bytes(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:  # not Linux
        return None
    return int(match.group(1)) * 1024 if match else None


class StepTimer(Callback):
    """Wall time of every training step (batch start to batch end: forward, backward, optimizer) and the
    peak memory while training: CUDA's peak allocation on a GPU, else the peak resident set (Linux)."""

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.peak_bytes: int | None = None
        self.start_bytes: int | None = None
        self._started = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.start_bytes = torch.cuda.memory_allocated(pl_module.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from the current size
        except OSError:
            pass
        self.start_bytes = _status_bytes("VmRSS")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.step_seconds.append(time.perf_counter() - self._started)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(pl_module.device)
        else:
            self.peak_bytes = _status_bytes("VmHWM")


def median_ms(call: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def first_eval_batch(datamodule: Any) -> Any:
    """The first test batch, else the first validation batch (data without a test split); None without both."""
    for name in ("test_dataloader", "val_dataloader"):
        loader = getattr(datamodule, name)()
        if isinstance(loader, list):  # no such split (or several loaders: the first)
            loader = loader[0] if loader else None
        if loader is not None:
            for batch in loader:
                return batch
    return None


def inference_latency(
    model: pl.LightningModule, datamodule: Any, repeats: int
) -> tuple[float | None, float | None]:
    """Median ms of ``predict_step`` (or, for a module without one such as ``CausalLMSFT``, its forward pass)
    on the first test batch: unmerged, then merged (None: not mergeable or no batch)."""
    batch = first_eval_batch(datamodule)
    if batch is None:
        return None, None
    batch = pl.utilities.move_data_to_device(batch, model.device)
    model.eval()
    own_predict = is_overridden("predict_step", model, pl.LightningModule)

    def call() -> None:
        with torch.no_grad():
            if own_predict or not isinstance(batch, dict):
                model.predict_step(batch, 0)
            else:  # Lightning's default predict_step would pass the batch dict positionally
                model(**batch)

    unmerged = median_ms(call, repeats)
    if not is_attached(model):
        return unmerged, unmerged  # full fine-tuning: the plain model is both
    try:
        merge_adapter(model)
    except TypeError:  # prompt/prefix tuning, adapters: nothing to fold
        return unmerged, None
    merged = median_ms(call, repeats)
    unmerge_adapter(model)
    return unmerged, merged


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def refusal(model: pl.LightningModule, trainer: pl.Trainer) -> str | None:
    """Why the run's methods refuse this model at attach (the ``ValueError`` of PEFTCallback's validation,
    which touches nothing), or None. A module that builds its layers in ``configure_model`` is not checked
    here: its refusal surfaces from ``fit`` as an error."""
    callback = next((c for c in trainer.callbacks if isinstance(c, PEFTCallback)), None)
    if callback is None or is_overridden("configure_model", model, pl.LightningModule):
        return None
    try:
        plan_methods(model, callback.methods, callback.lifecycle.adapter_name)
    except ValueError as error:
        return str(error)
    return None


def run_worker(spec_file: Path) -> int:
    from lightning_peft.cli.lightning_cli import PEFTLightningCLI

    spec = json.loads(Path(spec_file).read_text())
    silence_known_noise()
    if os.getcwd() not in sys.path:  # class_paths of the user's modules resolve from the working directory
        sys.path.insert(0, os.getcwd())
    sys.argv = sys.argv[:1]  # the config comes as a dict; LightningCLI warns when argv holds more
    cli = PEFTLightningCLI(args=spec["config"], run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    timer = next(c for c in trainer.callbacks if isinstance(c, StepTimer))
    refused = refusal(model, trainer)
    if refused is not None:
        print(f"lightning-peft compare: {spec['method']} refuses {type(model).__name__}: {refused}")
        record = {k: spec[k] for k in ("method", "seed", "lr", "spec_hash")}
        Path(spec["result"]).write_text(json.dumps({**record, "refused": refused, **_stamp(model)}, indent=2))
        return 0
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - started
    # without a validation (test) split Lightning runs nothing and returns no metrics
    val = (trainer.validate(model, datamodule=data, verbose=False) or [{}])[0]
    test = (trainer.test(model, datamodule=data, verbose=False) or [{}])[0]
    run_dir = Path(spec["result"]).with_suffix("")
    if is_attached(model):
        folder = save_adapter(model, run_dir / "adapter")
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    else:
        size = weights_bytes(model)  # full fine-tuning: the whole model is what must be stored
    unmerged_ms, merged_ms = inference_latency(model, data, spec["latency_repeats"])
    counts = count_parameters(model)
    steps = timer.step_seconds[1:] or timer.step_seconds  # the first step also builds the optimizer state
    result = {
        "method": spec["method"],
        "seed": spec["seed"],
        "lr": spec["lr"],
        "spec_hash": spec["spec_hash"],
        "trainable": counts.trainable,
        "total": counts.total,
        "trainable_pct": counts.percent,
        "val_acc": _metric(val, spec["val_metric"]),
        "test_acc": _metric(test, spec["test_metric"]),
        "val_loss": _metric(val, "val_loss"),
        "test_loss": _metric(test, "test_loss"),
        "steps": trainer.global_step,
        "step_ms": 1000 * statistics.median(steps) if steps else float("nan"),
        "train_seconds": train_seconds,
        "peak_memory_mib": timer.peak_bytes / MiB if timer.peak_bytes else None,
        "memory_above_start_mib": (timer.peak_bytes - timer.start_bytes) / MiB
        if timer.peak_bytes and timer.start_bytes
        else None,
        "adapter_bytes": size,
        "adapter_is_full_model": not is_attached(model),
        "latency_unmerged_ms": unmerged_ms,
        "latency_merged_ms": merged_ms,
        **_stamp(model),
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    return 0


def _stamp(model: pl.LightningModule) -> dict[str, Any]:
    return {
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _metric(metrics: dict[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    return None if value is None else float(value)


if __name__ == "__main__":  # one run of ``lightning-peft compare``, in a subprocess of its own
    # run the package's copy of this module, not ``__main__``: the run's config names its StepTimer by class path
    from lightning_peft.cli.compare_worker import run_worker as package_run_worker

    sys.exit(package_run_worker(Path(sys.argv[1])))
