"""``lightning-peft compare``: train several PEFT methods (and full fine-tuning) under one recipe, side by side.

    lightning-peft compare --config examples/configs/sst2_lora.yaml \\
        --methods full lora dora ia3 prompt --seeds 0 1 2 --output compare/sst2

The YAML is an ordinary ``lightning-peft fit`` config (model, data, trainer). Each run replaces its
``PEFTCallback`` by one method (``full`` = no callback: full fine-tuning, the baseline), keeps the data, the
budget (``max_epochs``/``max_steps``) and the seed, and runs in its own subprocess (Lightning's live bar shows
through). Checkpoint callbacks are dropped: every run reports its final model, validated on the data module's
validation split and then tested once on its test split (nothing is selected on the test set).

Every finished run is kept as ``<output>/runs/<method>-seed<N>.json``; interrupting (Ctrl-C) loses only the
run in progress, and the same command resumes. At the end ``results.md`` and ``results.csv`` (mean ± std over
the seeds) and, with matplotlib (``pip install lightning-peft[plots]``), two PNG plots are written.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_peft.cli.compare_report import write_reports

CALLBACK = "lightning_peft.PEFTCallback"
CHECKPOINTING = ("ModelCheckpoint", "EarlyStopping")
FULL = "full"
#: glibc returns freed tensors to the system at once, so the peak resident set tracks what training holds
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}

Preset = tuple[str | None, dict[str, Any], float]
#: built-in method presets for classification models: (class_path, init_args, learning rate), the learning rates
#: the winners of a sweep on MiniLM / SST-2 validation (benchmarks/RESULTS.md); modules_to_save comes from the YAML
PRESETS: dict[str, Preset] = {
    FULL: (None, {}, 1e-4),
    "lora": ("lightning_peft.LoRA", {"r": 8, "alpha": 16, "dropout": 0.1}, 1e-3),
    "dora": ("lightning_peft.DoRA", {"r": 8, "alpha": 16, "dropout": 0.1}, 3e-3),
    "ia3": ("lightning_peft.IA3", {}, 3e-2),
    "adapter": ("lightning_peft.Adapter", {"placement": "pfeiffer", "reduction_factor": 16}, 3e-3),
    "houlsby": ("lightning_peft.Adapter", {"placement": "houlsby", "reduction_factor": 16}, 1e-3),
    "prefix": ("lightning_peft.PrefixTuning", {"num_virtual_tokens": 20}, 3e-2),
    "prompt": ("lightning_peft.PromptTuning", {"num_virtual_tokens": 20, "init": "vocab"}, 3e-2),
    "bitfit": ("lightning_peft.BitFit", {}, 3e-3),
}
#: presets for chat SFT (a ``CausalLMSFT`` model): the recipes of examples/configs/smollm2_sft_<method>.yaml
#: (houlsby: the adapter recipe with Houlsby's placement); full fine-tuning and BitFit, which have no SFT recipe,
#: keep the classification presets' rates
SFT_PRESETS: dict[str, Preset] = {
    FULL: PRESETS[FULL],
    "lora": ("lightning_peft.LoRA", {"r": 8, "alpha": 16, "dropout": 0.05}, 1e-3),
    "dora": ("lightning_peft.DoRA", {"r": 8, "alpha": 16, "dropout": 0.05}, 1e-3),
    "ia3": ("lightning_peft.IA3", {}, 3e-2),
    "adapter": ("lightning_peft.Adapter", {"placement": "pfeiffer", "bottleneck_size": 16}, 3e-3),
    "houlsby": ("lightning_peft.Adapter", {"placement": "houlsby", "bottleneck_size": 16}, 3e-3),
    "prefix": ("lightning_peft.PrefixTuning", {"num_virtual_tokens": 20}, 1e-2),
    "prompt": ("lightning_peft.PromptTuning", {"num_virtual_tokens": 20, "init": "vocab"}, 3e-2),
    "bitfit": PRESETS["bitfit"],
}
#: model classes whose configs get SFT_PRESETS (subclasses too)
SFT_MODEL = "lightning_peft.tasks.CausalLMSFT"
#: init_args that tell two presets of one class apart (Pfeiffer/Houlsby adapters), with the class default
IDENTITY_ARGS = {"placement": "pfeiffer"}
#: init_args copied from the YAML's own method into every preset that accepts them
SHARED_ARGS = {"modules_to_save": None, "target_modules": ("lora", "dora")}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lightning-peft compare",
        description=__doc__.split("\n\n")[0] + " Writes a Markdown table, a CSV and plots.",
    )
    parser.add_argument("--config", help="a lightning-peft fit YAML (model, data, trainer); required")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[FULL, "lora"],
        help=f"presets ({', '.join(PRESETS)}) or YAML files whose PEFTCallback method and model lr are used",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per method and seed")
    parser.add_argument(
        "--output", default="compare", help="folder for runs/, results.md, results.csv, *.png"
    )
    parser.add_argument(
        "--lr", nargs="*", default=[], metavar="METHOD=LR", help="learning-rate overrides, e.g. lora=5e-4"
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every run, dotted keys, YAML values: trainer.max_steps=20 "
        "data.init_args.train_size=64",
    )
    parser.add_argument("--val-metric", default="val_acc", help="logged validation metric (default val_acc)")
    parser.add_argument("--test-metric", default="test_acc", help="logged test metric (default test_acc)")
    parser.add_argument("--latency-repeats", type=int, default=10, help="timed inference calls per variant")
    args = parser.parse_args(list(argv))
    if not args.config:
        parser.error("--config is required: a lightning-peft fit YAML")
    for seed in args.seeds:
        if seed < 0:
            parser.error(f"--seeds must be non-negative integers, got {seed}")
    try:
        args.lr = dict(_key_value(item, "--lr") for item in args.lr)
        args.lr = {k: float(v) for k, v in args.lr.items()}
        args.set = [_key_value(item, "--set") for item in args.set]
    except ValueError as error:
        parser.error(str(error))
    for method in args.methods:
        if method not in PRESETS and not Path(method).is_file():
            parser.error(f"--methods: {method!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
    return args


def _key_value(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"{flag} takes KEY=VALUE items, got {item!r}")
    return key, value


# -- building one run's config ------------------------------------------------------------------------
def peft_entry(config: dict[str, Any]) -> dict[str, Any] | None:
    """The ``init_args.method`` of the config's PEFTCallback, if it has one."""
    for entry in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(entry, dict) and entry.get("class_path", "").endswith("PEFTCallback"):
            return (entry.get("init_args") or {}).get("method")
    return None


def is_sft(config: dict[str, Any]) -> bool:
    """Whether the config's model is a :class:`~lightning_peft.tasks.CausalLMSFT` (or a subclass)."""
    class_path = str((config.get("model") or {}).get("class_path") or "")
    if class_path.rsplit(".", 1)[-1] == SFT_MODEL.rsplit(".", 1)[-1]:
        return True
    if "." not in class_path or class_path.startswith("lightning_peft."):
        return False
    import importlib

    from lightning_peft.tasks import CausalLMSFT

    if os.getcwd() not in sys.path:  # as in the worker: the user's modules resolve from the working directory
        sys.path.insert(0, os.getcwd())
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False  # the worker reports the bad class_path
    return isinstance(cls, type) and issubclass(cls, CausalLMSFT)


def presets_for(config: dict[str, Any]) -> dict[str, Preset]:
    """The preset table for the config's task: chat SFT or classification."""
    return SFT_PRESETS if is_sft(config) else PRESETS


def is_own_method(preset: Preset, own: dict[str, Any] | None) -> bool:
    """Whether the YAML's own method (``own``, None for no PEFTCallback) is the preset's method."""
    class_path, init_args, _ = preset
    if class_path is None or own is None:
        return class_path is None and own is None
    if str(own.get("class_path", "")).rsplit(".", 1)[-1] != class_path.rsplit(".", 1)[-1]:
        return False
    args = own.get("init_args") or {}
    return all(args.get(k, default) == init_args.get(k, default) for k, default in IDENTITY_ARGS.items())


def model_lr(config: dict[str, Any], default: float) -> float:
    """``model.init_args.lr`` of the config, else ``default``."""
    return float(((config.get("model") or {}).get("init_args") or {}).get("lr", default))


def method_entry(name: str, base: dict[str, Any], lr_overrides: dict[str, float]) -> tuple[Any, float]:
    """``(method config dict or None for full fine-tuning, learning rate)`` for a preset or a YAML file.

    For chat SFT configs the preset of the YAML's own method is that method and learning rate, unchanged
    (``compare`` trains what ``fit --config`` trains); the other presets come from :data:`SFT_PRESETS`.
    """
    if name in PRESETS:
        sft = is_sft(base)
        preset = (SFT_PRESETS if sft else PRESETS)[name]
        class_path, init_args, lr = preset
        entry = peft_entry(base)
        own_entry = entry if isinstance(entry, dict) else None  # not a list of combined methods
        method = None
        if sft and (entry is None or own_entry is not None) and is_own_method(preset, own_entry):
            method = copy.deepcopy(own_entry)
            lr = model_lr(base, lr)
        elif class_path is not None:
            own = (own_entry or {}).get("init_args") or {}
            args = dict(init_args)
            for key, only in SHARED_ARGS.items():
                if key in own and (only is None or name in only):
                    args[key] = copy.deepcopy(own[key])
            method = {"class_path": class_path, "init_args": args}
    else:
        other = yaml.safe_load(Path(name).read_text())
        method = peft_entry(other)
        lr = model_lr(other, 1e-3)
    return method, lr_overrides.get(run_label(name), lr)


def run_label(method: str) -> str:
    """``lora`` for a preset, the file stem for a YAML (``sst2_dora``)."""
    return method if method in PRESETS else Path(method).stem


def run_config(
    base: dict[str, Any], method: Any, lr: float, seed: int, output: Path, label: str
) -> dict[str, Any]:
    config = copy.deepcopy(base)
    config["seed_everything"] = seed
    trainer = config.setdefault("trainer", {})
    callbacks = [
        c
        for c in trainer.get("callbacks") or []
        if not (isinstance(c, dict) and c.get("class_path", "").endswith(("PEFTCallback", *CHECKPOINTING)))
    ]
    if method is not None:
        callbacks.append({"class_path": CALLBACK, "init_args": {"method": method}})
    callbacks.append({"class_path": "lightning_peft.cli.compare_worker.StepTimer"})
    trainer["callbacks"] = callbacks
    trainer["enable_checkpointing"] = False
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(output / "logs"), "name": f"{label}-seed{seed}"},
    }
    config.setdefault("model", {}).setdefault("init_args", {})["lr"] = lr
    return config


def apply_override(config: dict[str, Any], key: str, value: str) -> None:
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(value)


def spec_hash(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    # the log folder does not change what is trained
    text = re.sub(r'"save_dir": "[^"]*"', "", text)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- running -----------------------------------------------------------------------------------------
def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    base = yaml.safe_load(Path(args.config).read_text())
    for key, value in args.set:
        apply_override(base, key, value)
    output = Path(args.output)
    runs = output / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    plan = [(seed, method) for seed in args.seeds for method in args.methods]
    results: list[dict[str, Any]] = []
    print(f"lightning-peft compare: {len(plan)} runs ({len(args.methods)} methods x {len(args.seeds)} seeds)")
    if any(m in PRESETS for m in args.methods):
        which = "chat SFT (CausalLMSFT)" if is_sft(base) else "classification"
        print(f"presets: the {which} recipes", flush=True)
    for index, (seed, method) in enumerate(plan, start=1):
        label = run_label(method)
        entry, lr = method_entry(method, base, args.lr)
        config = run_config(base, entry, lr, seed, output, label)
        digest = spec_hash(config)
        path = runs / f"{label}-seed{seed}.json"
        prefix = f"[{index}/{len(plan)}] {label} seed {seed}"
        if path.is_file():
            done = json.loads(path.read_text())
            if done.get("spec_hash") == digest:
                print(f"{prefix}: kept from {path} ({summary_line(done)})", flush=True)
                results.append(done)
                continue
            print(f"{prefix}: {path} was made with another configuration; running again", flush=True)
        print(f"{prefix}: training (lr {lr:g}) ...", flush=True)
        spec = {
            "config": config,
            "method": label,
            "seed": seed,
            "lr": lr,
            "spec_hash": digest,
            "result": str(path),
            "val_metric": args.val_metric,
            "test_metric": args.test_metric,
            "latency_repeats": args.latency_repeats,
        }
        spec_file = runs / f"{label}-seed{seed}.spec.json"
        spec_file.write_text(json.dumps(spec, indent=2))
        started = time.perf_counter()
        try:
            command = [sys.executable, "-m", "lightning_peft.cli.compare_worker", str(spec_file)]
            code = subprocess.call(command, env=WORKER_ENV | dict(os.environ))
        except KeyboardInterrupt:
            print(f"\ninterrupted: finished runs are kept in {runs}; run the same command to resume")
            return 130
        if code != 0 or not path.is_file():
            print(f"{prefix}: failed (exit code {code}); see the output above", flush=True)
            return code or 1
        done = json.loads(path.read_text())
        results.append(done)
        print(f"{prefix}: {summary_line(done)} ({time.perf_counter() - started:.0f} s)", flush=True)
    for name, written in write_reports(results, output).items():
        print(f"{name}: {written}")
    return 0


def summary_line(result: dict[str, Any]) -> str:
    """One run in a line: its metrics, step time and trainable parameters, or why the method refused."""
    if result.get("refused"):
        return f"refused: {result['refused']}"

    def show(key: str) -> str:
        value = result.get(key)
        if value is None:
            return "n/a"
        return f"{100 * value:.1f}%" if key.endswith("acc") else f"{value:.4f}"

    # accuracy where the task has one (classification, chat answers with choices), else the loss
    val = "val_acc" if result.get("val_acc") is not None else "val_loss"
    test = "test_acc" if result.get("test_acc") is not None else "test_loss"
    return (
        f"{val.replace('_', ' ')} {show(val)}, {test.replace('_', ' ')} {show(test)}, "
        f"{result['step_ms']:.0f} ms/step, {result['trainable']:,} trainable"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
