"""Mixed batches (one adapter per sample) against a single-adapter batch, lightning-peft and HF PEFT side by side.

1. The real all-MiniLM-L6-v2 with 2, 4 and 8 LoRA adapters (r = 8 on query and value), batch 16 and 64 × 64
   tokens, ``eval()`` and ``no_grad``: one adapter for the whole batch (``single``) vs the adapters cycling over
   the samples (``mixed``, a b c ... a b c ...), in lightning-peft (``model(..., adapter_names=...)``) and HF PEFT
   (the same call). Reported: median CPU time per call, mixed ÷ single for both libraries, and lightning-peft
   mixed ÷ HF PEFT mixed (the per-round paired ratio alongside).
2. ``generate()`` on a small random Llama with 8 LoRA adapters (r = 8 on q_proj and v_proj), greedy: single vs
   mixed, both libraries; and a one-token forward on the same models (a decoding step's layer work, short
   enough for many rounds, which a shared machine needs).

Every variant of one configuration runs in interleaved rounds (A B C D, B C D A, ...), so load drift on a
shared machine hits them alike. HF PEFT is the point of comparison only; the library never imports it.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_mixed_batch.py --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings
from collections.abc import Callable
from typing import Any

import common
import torch
from torch import nn

import lightning_peft as lp

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per configuration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--skip-forward", action="store_true", help="only the generate() comparison")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per sample")
    parser.add_argument(
        "--step-repeats",
        type=int,
        default=150,
        help="rounds of the one-token forward (a decoding step's work)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def perturb(model: nn.Module) -> None:
    """Non-zero adapter weights (B starts at zero), as after training."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.01 * torch.randn(param.shape, generator=g))


def copy_adapters(source: nn.Module, peft_model: nn.Module) -> None:
    """Give HF PEFT's adapters the weights of lightning-peft's, so that both compute the same outputs."""
    from lightning_peft.ops.parameters import peft_layers

    inner = peft_model.base_model.model
    with torch.no_grad():
        for path, layer in peft_layers(source):
            target = inner.get_submodule(path.replace(".base_layer", ""))
            target.lora_A[layer.adapter_name].weight.copy_(layer.lora_A)
            target.lora_B[layer.adapter_name].weight.copy_(layer.lora_B)


def ours(base: nn.Module, count: int, kind: str) -> nn.Module:
    model = copy.deepcopy(base).eval()
    for i in range(count):
        lp.add_adapter(model, lp.LoRA(r=8, alpha=16, target_modules=TARGETS[kind]), f"a{i}")
    perturb(model)
    lp.set_adapter(model, "a0")
    return model


def theirs(base: nn.Module, count: int, kind: str, source: nn.Module) -> nn.Module:
    import peft

    task = {"task_type": "CAUSAL_LM"} if kind == "llama" else {}  # no task head: nothing in modules_to_save
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS[kind], **task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
        for i in range(1, count):
            model.add_adapter(f"a{i}", config)
    copy_adapters(source, model)
    model.set_adapter("a0")
    return model.eval()


def summary(times: dict[str, common.Timings]) -> dict[str, float]:
    cpu = {name: statistics.median(t.cpu) for name, t in times.items()}
    result = {f"{name} ms": 1000 * value for name, value in cpu.items()}
    for lib in ("lightning-peft", "peft"):
        result[f"{lib} mixed/single"] = cpu[f"{lib} mixed"] / cpu[f"{lib} single"]
        result[f"{lib} mixed/single paired"] = common.paired(
            times[f"{lib} mixed"].cpu, times[f"{lib} single"].cpu
        )
    result["ours/peft mixed"] = cpu["lightning-peft mixed"] / cpu["peft mixed"]
    result["ours/peft mixed paired"] = common.paired(
        times["lightning-peft mixed"].cpu, times["peft mixed"].cpu
    )
    return result


def timed(steps: dict[str, Callable[[], None]], args: argparse.Namespace) -> dict[str, float]:
    return summary(common.interleaved(steps, args.repeats, args.warmup, progress=False))


def forward_steps(
    base: nn.Module, count: int, batch: int, args: argparse.Namespace
) -> dict[str, Callable[[], None]]:
    inputs = {k: v for k, v in common.make_batch(base, batch, args.seq).items() if k != "labels"}
    names = [f"a{i % count}" for i in range(batch)]
    mine = ours(base, count, "bert")
    models = {"lightning-peft": mine, "peft": theirs(base, count, "bert", mine)}
    with torch.no_grad():  # the two libraries compute the same mixed batch
        same = models["lightning-peft"](**inputs, adapter_names=names).logits
        torch.testing.assert_close(
            same, models["peft"](**inputs, adapter_names=names).logits, atol=1e-4, rtol=1e-4
        )

    def step(model: nn.Module, **extra: Any) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(**inputs, **extra)

        return run

    steps = {}
    for lib, model in models.items():
        steps[f"{lib} single"] = step(model)
        steps[f"{lib} mixed"] = step(model, adapter_names=names)
    return steps


def small_llama() -> nn.Module:
    """A random Llama (4 layers, hidden 256, vocabulary 8,000); generation time does not depend on the values."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def decode_steps(count: int, batch: int) -> dict[str, Callable[[], None]]:
    """One-token forward passes (the layer work of one decoding step, without the cache) on the same Llama."""
    base = small_llama()
    ids = torch.randint(10, 8000, (batch, 1), generator=torch.Generator().manual_seed(0))
    names = [f"a{i % count}" for i in range(batch)]
    mine = ours(base, count, "llama")
    models = {"lightning-peft": mine, "peft": theirs(base, count, "llama", mine)}

    def step(model: nn.Module, **extra: Any) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(input_ids=ids, **extra)

        return run

    steps = {}
    for lib, model in models.items():
        steps[f"{lib} single"] = step(model)
        steps[f"{lib} mixed"] = step(model, adapter_names=names)
    return steps


def generate_steps(count: int, batch: int, args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    base = small_llama()
    ids = torch.randint(10, 8000, (batch, 32), generator=torch.Generator().manual_seed(0))
    names = [f"a{i % count}" for i in range(batch)]
    mine = ours(base, count, "llama")
    models = {"lightning-peft": mine, "peft": theirs(base, count, "llama", mine)}
    options = dict(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0
    )
    outputs = [m.generate(input_ids=ids, adapter_names=names, **options) for m in models.values()]
    assert torch.equal(outputs[0], outputs[1]), "the two libraries generate different tokens"

    def step(model: nn.Module, **extra: Any) -> Callable[[], None]:
        return lambda: model.generate(input_ids=ids, **options, **extra)

    steps = {}
    for lib, model in models.items():
        steps[f"{lib} single"] = step(model)
        steps[f"{lib} mixed"] = step(model, adapter_names=names)
    return steps


def table(rows: list[tuple[str, dict[str, float]]]) -> str:
    header = (
        "| configuration | ours single ms | ours mixed ms | ours mixed ÷ single | PEFT single ms | PEFT mixed ms "
        "| PEFT mixed ÷ single | ours mixed ÷ PEFT mixed (paired) |"
    )
    lines = [header, "|---|" + "---:|" * 7]
    for label, r in rows:
        lines.append(
            f"| {label} | {r['lightning-peft single ms']:.0f} | {r['lightning-peft mixed ms']:.0f} "
            f"| **{r['lightning-peft mixed/single']:.2f}×** ({r['lightning-peft mixed/single paired']:.2f}×) "
            f"| {r['peft single ms']:.0f} | {r['peft mixed ms']:.0f} "
            f"| {r['peft mixed/single']:.2f}× ({r['peft mixed/single paired']:.2f}×) "
            f"| **{r['ours/peft mixed']:.2f}×** ({r['ours/peft mixed paired']:.2f}×) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    env = common.environment()
    print(f"environment: {env}", flush=True)
    base = common.load_minilm().eval()
    rows: list[tuple[str, dict[str, float]]] = []
    for count in [] if args.skip_forward else args.adapters:
        for batch in args.batches:
            label = f"MiniLM, {count} adapters, batch {batch}×{args.seq}"
            rows.append((label, timed(forward_steps(base, count, batch, args), args)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    if not args.skip_generate:
        label = f"Llama generate, 8 adapters, batch 8, {args.new_tokens} new tokens"
        rows.append((label, timed(generate_steps(8, 8, args), args)))
        label = f"Llama one-token forward, 8 adapters, batch 8 ({args.step_repeats} rounds)"
        step_args = argparse.Namespace(**{**vars(args), "repeats": args.step_repeats, "warmup": 5})
        rows.append((label, timed(decode_steps(8, 8), step_args)))
    print(
        f"\nmedian CPU time per call over {args.repeats} interleaved rounds; (paired): median of per-round ratios"
    )
    print(table(rows))
    if args.json:
        common.write_json(args.json, {"environment": env, "args": vars(args), "rows": dict(rows)})


if __name__ == "__main__":
    main()
