"""Memory of lightning-peft against full fine-tuning and HF PEFT on the real MiniLM (CPU).

1. One training step (forward + backward + AdamW step), batch 16 × 128 tokens, each variant in a fresh
   subprocess so that nothing another variant allocated is still resident:

   * measured: the peak resident memory (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) above
     the resident memory just before the step, for the first step (which also creates the AdamW state)
     and for a second, steady-state step. glibc is told to serve every allocation over 64 KiB with
     ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so that freed tensors leave the resident set at once;
   * counted from the tensors themselves: the bytes autograd saves for backward (a
     ``saved_tensors_hooks`` pack hook, each storage once, parameters excluded), the gradients, and the
     optimizer state.

2. Checkpoint sizes from a real ``pl.Trainer`` run of two steps: a full fine-tuning ``.ckpt`` against the
   adapter-only ``.ckpt`` that ``PEFTCallback`` writes (with and without ``weights_only``), the
   ``save_adapter`` folder, and HF PEFT's ``save_pretrained`` folder.

Run ``python benchmarks/bench_memory.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_peft.core.base_model import set_activation_checkpointing  # noqa: E402

FULL = "full fine-tuning"
MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", nargs="+", default=["lora"], choices=[*common.METHODS, "all"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peft", action="store_true", help="leave out the HF PEFT variants")
    parser.add_argument("--skip-step", action="store_true", help="only the checkpoint sizes")
    parser.add_argument("--skip-checkpoints", action="store_true", help="only the training-step memory")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="train every variant with transformers' gradient checkpointing (non-reentrant)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one variant, print JSON
    args = parser.parse_args(argv)
    if "all" in args.method:
        args.method = list(common.METHODS)
    return args


# -- 1. one training step, measured in a subprocess per variant ------------------------------------------
def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} (this benchmark needs Linux)")
    return int(match.group(1))


def _reset_peak() -> int:
    """Release what glibc still caches, reset the peak to the current resident size, return that size."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


class SavedTensorCounter:
    """Bytes of the distinct storages autograd keeps for backward, leaving out parameters (they are in
    memory anyway)."""

    def __init__(self, model: nn.Module) -> None:
        self.exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def build_variant(base: nn.Module, variant: str) -> nn.Module:
    if variant == FULL:
        return common.full_finetuning(base)
    library, method = variant.split(" ", 1)
    return common.with_peft(base, method) if library == "peft" else common.with_lightning_peft(base, method)


def measure_step(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    common.set_threads(args.threads)
    base = common.load_minilm()
    batch = common.make_batch(base, args.batch, args.seq)
    model = build_variant(base, variant)
    del base
    if args.gradient_checkpointing:
        # HF PEFT's PeftModel passes the call on to the transformers model
        set_activation_checkpointing(model, use_reentrant=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    result: dict[str, Any] = {
        "variant": variant,
        "trainable": sum(p.numel() for p in params),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    for label in ("first_step", "steady_step"):
        before = _reset_peak()
        counter = SavedTensorCounter(model)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            loss = model(**batch).loss
        loss.backward()
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result[f"{label}_peak_rss_delta"] = _status_kib("VmHWM") * 1024 - before
        result["saved_activation_bytes"] = counter.bytes
        result["grad_bytes"] = grad_bytes
    result["optimizer_state_bytes"] = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    return result


def run_worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
    ]
    command += ["--threads", str(args.threads)]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"variant": variant, "error": f"skipped: {error}"[:160]}
    return json.loads(lines[-1])


def bench_step(args: argparse.Namespace) -> dict[str, Any]:
    variants = [FULL]
    for method in args.method:
        variants.append(f"lightning-peft {method}")
        if not args.no_peft and method in common.PEFT_EQUIVALENTS:
            variants.append(f"peft {method}")
    rows = []
    for variant in variants:
        print(f"measuring {variant} in a subprocess ...", flush=True)
        rows.append(run_worker(variant, args))
    full = next((r for r in rows if r["variant"] == FULL and "error" not in r), None)
    lines = [
        "| variant | trainable params | peak RSS, first step (MiB) | peak RSS, steady step (MiB) "
        "| ratio (steady) | saved activations (MiB) | gradients (MiB) | AdamW state (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['error']} |  |  |  |  |  |  |")
            continue
        ratio = r["steady_step_peak_rss_delta"] / full["steady_step_peak_rss_delta"] if full else float("nan")
        lines.append(
            f"| {r['variant']} | {r['trainable']:,} | {r['first_step_peak_rss_delta'] / MiB:.0f} "
            f"| {r['steady_step_peak_rss_delta'] / MiB:.0f} | {ratio:.2f}× "
            f"| {r['saved_activation_bytes'] / MiB:.0f} | {r['grad_bytes'] / MiB:.1f} "
            f"| {r['optimizer_state_bytes'] / MiB:.1f} |"
        )
    table = "\n".join(lines)
    print(table, flush=True)
    return {"rows": rows, "table": table}


# -- 2. checkpoint sizes ---------------------------------------------------------------------------------
def bench_checkpoints(args: argparse.Namespace) -> dict[str, Any]:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    import lightning_peft as lp

    class Classifier(pl.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            # written for full fine-tuning on purpose: PEFTCallback narrows it to the adapter
            return torch.optim.AdamW(self.parameters(), lr=1e-5)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    common.set_threads(args.threads)
    base = common.load_minilm()
    small = common.make_batch(base, 8, 32, seed=3)
    examples = [{k: v[i] for k, v in small.items()} for i in range(8)]
    loader = DataLoader(examples, batch_size=4)  # the default collate stacks the dicts' tensors
    sizes: dict[str, int] = {}
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for label, callbacks in (
            (FULL, []),
            ("lightning-peft lora", [lp.PEFTCallback(lp_lora(), verbose=False)]),
        ):
            module = Classifier(common.full_finetuning(base)).train()  # from_pretrained returns eval mode
            trainer = pl.Trainer(
                accelerator="cpu",
                max_steps=2,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=callbacks,
                default_root_dir=tmp,
            )
            trainer.fit(module, loader)
            for weights_only in (False, True):
                path = folder / f"{label.replace(' ', '_')}_{weights_only}.ckpt"
                trainer.save_checkpoint(path, weights_only=weights_only)
                key = f"{label} .ckpt" + (" (weights_only)" if weights_only else "")
                sizes[key] = path.stat().st_size
                counts[key] = len(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
            if callbacks:
                adapter = lp.save_adapter(module, folder / "adapter")
                sizes["lightning-peft lora save_adapter folder"] = folder_size(adapter)
        if not args.no_peft:
            theirs = common.with_peft(base, "lora")
            theirs.save_pretrained(str(folder / "peft"))
            sizes["peft lora save_pretrained folder"] = folder_size(folder / "peft")
    full_size = sizes[f"{FULL} .ckpt"]
    lines = ["| file | size | vs full .ckpt | tensors in state_dict |", "|---|---:|---:|---:|"]
    for key, size in sizes.items():
        shown = f"{size / MiB:.1f} MiB" if size >= MiB else f"{size / 1024:.0f} KiB"
        lines.append(f"| {key} | {shown} | {size / full_size:.4f}× | {counts.get(key, '')} |")
    table = "\n".join(lines)
    print(table, flush=True)
    return {"bytes": sizes, "state_dict_tensors": counts, "table": table}


def lp_lora() -> Any:
    return common.lightning_peft_method("lora")


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure_step(args.worker, args)), flush=True)
        return {}
    results: dict[str, Any] = {"environment": common.environment(), "args": vars(args)}
    if not args.skip_step:
        results["training_step"] = bench_step(args)
    if not args.skip_checkpoints:
        results["checkpoints"] = bench_checkpoints(args)
    if args.json:
        common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
