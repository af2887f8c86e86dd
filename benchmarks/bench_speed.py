"""Speed of lightning-peft against full fine-tuning and HF PEFT on the real MiniLM (CPU).

1. Training step (forward + backward + AdamW step), batch 16 × 128 tokens: full fine-tuning vs the
   lightning-peft method(s) given with ``--method`` vs HF PEFT's equivalent; ratios relative to full
   fine-tuning.
2. Inference (eval, ``no_grad``): base model vs LoRA unmerged / merged, lightning-peft and HF PEFT holding
   the same adapter weights; ratios relative to the base model.
3. ``--prefix-decoder``: prefix tuning's training step on a GPT-2 of MiniLM's size (HF PEFT's prefix tuning
   needs a decoder), full fine-tuning vs lightning-peft vs HF PEFT.
4. ``--attach``: time to attach LoRA to every linear layer of a 48-layer model (289 layers):
   ``apply_peft`` vs HF PEFT's ``get_peft_model``, on fresh copies, interleaved.
5. ``--profile METHOD``: ``torch.profiler`` table of one lightning-peft training step (where the time goes).

All variants live in one process and are timed in interleaved rounds after a warm-up, so that a change in
the machine's load hits them alike. Run ``python benchmarks/bench_speed.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

FULL = "full fine-tuning"
BASE = "base model"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--method",
        nargs="+",
        default=["lora"],
        choices=[*common.METHODS, "all"],
        help="lightning-peft method(s) for the training-step benchmark (default: lora)",
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per benchmark (default 10)")
    parser.add_argument(
        "--inference-repeats",
        type=int,
        help="timed rounds of the (shorter) inference benchmark (default 3 × --repeats)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--no-peft", action="store_true", help="leave out the HF PEFT variants")
    parser.add_argument("--skip-train", action="store_true", help="only the inference benchmark")
    parser.add_argument("--skip-inference", action="store_true", help="only the training-step benchmark")
    parser.add_argument("--prefix-decoder", action="store_true", help="prefix tuning on a GPT-2 vs HF PEFT")
    parser.add_argument("--attach", action="store_true", help="attach time on a 48-layer model vs HF PEFT")
    parser.add_argument("--attach-layers", type=int, default=48)
    parser.add_argument("--profile", choices=common.METHODS, help="profile one training step of a method")
    parser.add_argument("--json", metavar="PATH", help="also write the results (and raw times) as JSON")
    args = parser.parse_args(argv)
    if "all" in args.method:
        args.method = list(common.METHODS)
    if args.inference_repeats is None:
        args.inference_repeats = 3 * args.repeats
    if args.repeats < 1 or args.inference_repeats < 1 or args.warmup < 0:
        parser.error(
            f"--repeats and --inference-repeats must be >= 1 and --warmup >= 0, got {args.repeats}, "
            f"{args.inference_repeats} and {args.warmup}"
        )
    return args


# -- 1. training step -----------------------------------------------------------------------------------
def bench_training(
    base: nn.Module, batch: dict[str, torch.Tensor], args: argparse.Namespace
) -> dict[str, Any]:
    steps: dict[str, Callable[[], None]] = {FULL: common.training_step(common.full_finetuning(base), batch)}
    trainable = {FULL: common.trainable_count(base)}
    notes: dict[str, str] = {}
    builders: list[tuple[str, Callable[[], nn.Module]]] = []
    for method in args.method:
        builders.append((f"lightning-peft {method}", lambda m=method: common.with_lightning_peft(base, m)))
        if not args.no_peft:
            if method in common.PEFT_EQUIVALENTS:
                builders.append((f"peft {method}", lambda m=method: common.with_peft(base, m)))
            else:
                notes[f"peft {method}"] = "HF PEFT has no such method"
    for name, build in builders:
        try:
            model = build()
            step = common.training_step(model, batch)
            step()  # one step outside the timing: a method that fails at forward time is reported, not fatal
        except Exception as error:  # noqa: BLE001 - a method still being written must not stop the others
            notes[name] = common.describe_error(error)
            print(f"{name}: {notes[name]}", flush=True)
            continue
        steps[name] = step
        trainable[name] = common.trainable_count(model)
    print(f"training step, batch {args.batch} x {args.seq}: {len(steps)} variants", flush=True)
    result = timed_table(
        steps, trainable, notes, [(f"lightning-peft {m}", f"peft {m}") for m in args.method], args
    )
    # DoRA's cost over LoRA, within each library
    pairs = [(f"{lib} dora", f"{lib} lora") for lib in ("lightning-peft", "peft")]
    result["dora_vs_lora"] = head_to_head(result.pop("times"), pairs)
    return result


def timed_table(
    steps: dict[str, Callable[[], None]],
    trainable: dict[str, int],
    notes: dict[str, str],
    pairs: list[tuple[str, str]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Interleaved training-step timings against full fine-tuning, printed as a table, plus head-to-heads."""
    times = common.interleaved(steps, args.repeats, args.warmup)
    rows = common.summarize(times, FULL, trainable, notes)
    table = common.markdown_table(rows, FULL)
    versus = head_to_head(times, pairs)
    print(table, flush=True)
    return {"baseline": FULL, "rows": rows, "table": table, "lightning_peft_vs_peft": versus, "times": times}


# -- 3. prefix tuning on a decoder ------------------------------------------------------------------------
def bench_prefix_decoder(args: argparse.Namespace) -> dict[str, Any]:
    base = common.load_decoder()
    batch = common.make_batch(base, args.batch, args.seq)
    batch["labels"] = batch["input_ids"].clone()  # next-token loss
    models = {
        FULL: common.full_finetuning(base),
        "lightning-peft prefix": common.with_lightning_peft(base, "prefix", head_name=None),
    }
    if not args.no_peft:
        models["peft prefix"] = common.with_peft(base, "prefix", task_type="CAUSAL_LM")
    steps = {name: common.training_step(model, batch) for name, model in models.items()}
    trainable = {name: common.trainable_count(model) for name, model in models.items()}
    print(f"prefix tuning on GPT-2 (6 x 384), batch {args.batch} x {args.seq}", flush=True)
    result = timed_table(steps, trainable, {}, [("lightning-peft prefix", "peft prefix")], args)
    del result["times"]
    return result


# -- 4. attach time --------------------------------------------------------------------------------------
def bench_attach(args: argparse.Namespace) -> dict[str, Any]:
    """Wall time of attaching LoRA (r=8) to every linear layer of a deep model, each call on a fresh copy."""
    import copy
    import time
    import warnings

    import peft

    import lightning_peft as lp

    base = common.deep_bert(args.attach_layers)
    targets = ["query", "key", "value", "dense"]

    def ours(model: nn.Module) -> None:
        lp.apply_peft(model, lp.LoRA(r=8, target_modules=targets, modules_to_save=["classifier"]))

    def theirs(model: nn.Module) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=8, target_modules=targets))

    contenders = {"lightning-peft apply_peft": ours}
    if not args.no_peft:
        contenders["peft get_peft_model"] = theirs
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    layers = 0
    for round_index in range(args.repeats):
        order = (
            list(contenders)[round_index % len(contenders) :]
            + list(contenders)[: round_index % len(contenders)]
        )
        for name in order:
            model = copy.deepcopy(base)  # untimed
            start = time.perf_counter()
            contenders[name](model)
            seconds[name].append(time.perf_counter() - start)
            if name.startswith("lightning-peft"):
                layers = sum(isinstance(m, lp.PEFTLayer) for m in model.modules())
            del model
    lines = ["| attach | median (ms) | min (ms) | paired ratio vs HF PEFT |", "|---|---:|---:|---:|"]
    for name, values in seconds.items():
        ratio = (
            common.paired(values, seconds["peft get_peft_model"])
            if "peft get_peft_model" in seconds
            else None
        )
        lines.append(
            f"| {name} | {1000 * statistics.median(values):.0f} | {1000 * min(values):.0f} "
            f"| {'' if ratio is None else f'{ratio:.2f}×'} |"
        )
    table = "\n".join(lines)
    print(
        f"attach LoRA r=8 to {args.attach_layers} layers x (query, key, value, 3 dense) + pooler", flush=True
    )
    print(table, flush=True)
    return {"seconds": seconds, "layers": layers, "table": table}


# -- 5. profile ------------------------------------------------------------------------------------------
def profile_step(base: nn.Module, batch: dict[str, torch.Tensor], method: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    step = common.training_step(common.with_lightning_peft(base, method), batch)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    print(f"profile of one lightning-peft {method} training step, batch {batch['input_ids'].shape}")
    print(table, flush=True)
    return table


def head_to_head(
    times: dict[str, common.Timings], pairs: list[tuple[str, str]]
) -> dict[str, dict[str, float]]:
    """lightning-peft time over HF PEFT time, per round, median: below 1 means lightning-peft is faster."""
    result: dict[str, dict[str, float]] = {}
    for ours, theirs in pairs:
        if ours in times and theirs in times:
            a, b = times[ours], times[theirs]
            result[ours] = {"wall": common.paired(a.wall, b.wall), "cpu": common.paired(a.cpu, b.cpu)}
            print(
                f"{ours} / {theirs}, median per round: wall {result[ours]['wall']:.3f}, CPU time {result[ours]['cpu']:.3f}"
            )
    return result


# -- 2. inference ----------------------------------------------------------------------------------------
def randomize_lora(model: nn.Module) -> None:
    """Non-zero B, so that merging really changes the weights (B starts at zero)."""
    from lightning_peft.methods.lora import LoRALinear

    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.02)


def copy_lora_to_peft(ours: nn.Module, theirs: nn.Module) -> None:
    """Give HF PEFT's model the very same LoRA weights and head, so both compute the same function."""
    from lightning_peft.methods.lora import LoRALinear

    inner = theirs.base_model.model
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LoRALinear):
                target = inner.get_submodule(name)
                target.lora_A["default"].weight.copy_(module.lora_A)
                target.lora_B["default"].weight.copy_(module.lora_B)
        head = ours.get_submodule("classifier")
        for param_name, value in head.named_parameters():
            for name, param in inner.named_parameters():
                if name.startswith("classifier.") and name.endswith(param_name):
                    param.copy_(value)


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def bench_inference(
    base: nn.Module, batch: dict[str, torch.Tensor], args: argparse.Namespace
) -> dict[str, Any]:
    import lightning_peft as lp

    models: dict[str, nn.Module] = {BASE: base}
    unmerged = common.with_lightning_peft(base, "lora")
    randomize_lora(unmerged)
    merged = common.with_lightning_peft(base, "lora")
    merged.load_state_dict(unmerged.state_dict())
    lp.merge_adapter(merged)
    models["lightning-peft lora unmerged"] = unmerged
    models["lightning-peft lora merged"] = merged
    if not args.no_peft:
        for label, merge in (("unmerged", False), ("merged", True)):
            theirs = common.with_peft(base, "lora")
            copy_lora_to_peft(unmerged, theirs)
            if merge:
                theirs.merge_adapter()
            models[f"peft lora {label}"] = theirs
    # every LoRA variant must compute the same logits, or the comparison would be meaningless
    reference = logits(unmerged, batch)
    checks = {name: float((logits(m, batch) - reference).abs().max()) for name, m in models.items()}
    print("max |logits - lightning-peft unmerged|: " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()))
    steps = {name: common.inference_step(model, batch) for name, model in models.items()}
    print(f"inference, batch {args.batch} x {args.seq}: {len(steps)} variants", flush=True)
    times = common.interleaved(steps, args.inference_repeats, args.warmup)
    rows = common.summarize(times, BASE, {}, {})
    for row in rows:
        row.note = f"max abs logit diff {checks[row.name]:.1e}" if row.name != BASE else ""
    table = common.markdown_table(rows, BASE, with_params=False)
    versus = head_to_head(
        times, [(f"lightning-peft lora {s}", f"peft lora {s}") for s in ("unmerged", "merged")]
    )
    print(table, flush=True)
    return {
        "baseline": BASE,
        "rows": rows,
        "table": table,
        "logit_max_abs_diff": checks,
        "lightning_peft_vs_peft": versus,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.set_threads(args.threads)
    base = common.load_minilm()
    batch = common.make_batch(base, args.batch, args.seq)
    results: dict[str, Any] = {"environment": common.environment(), "args": vars(args)}
    if not args.skip_train:
        results["training_step"] = bench_training(base, batch, args)
    if not args.skip_inference:
        results["inference"] = bench_inference(base, batch, args)
    if args.prefix_decoder:
        results["prefix_decoder"] = bench_prefix_decoder(args)
    if args.attach:
        results["attach"] = bench_attach(args)
    if args.profile:
        results["profile"] = profile_step(base, batch, args.profile)
    results["environment"]["load_average_end"] = common.environment()["load_average"]
    if args.json:
        common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
