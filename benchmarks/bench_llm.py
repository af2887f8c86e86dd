"""Decoder-LLM measurements for issue 20, side by side in one process (memory: one subprocess per variant).

``--generate``: merged and unmerged greedy ``generate()`` on SmolLM2 give the same tokens (LoRA and DoRA with
    moved-off-zero adapters, a few chat prompts, ``--new-tokens`` each); prints the tokens that differ (none).
``--step``: one LoRA SFT training step (forward + backward + AdamW) on SST-2-as-chat batches, lightning-peft
    against HF PEFT on the same base, batch and initial adapter: interleaved rounds, the median of each round's
    time ratio; and the peak resident memory of a step above the memory before it (Linux ``VmHWM``), each
    variant in its own process.
``--packing``: real (non-padding) tokens per second of training passes with best-fit packed rows against
    three paddings of the same conversations (to ``--max-length``, dynamic, dynamic length-grouped):
    interleaved rounds, the median of each round's ratio; the real-token fraction and the mean answer-token
    loss of every layout (the same up to float error). See ``llm_packing.py``.
``--qlora``: peak step memory of QLoRA (NF4 with double quantization, activation checkpointing) against fp32
    LoRA, on SmolLM2 and on a randomly initialised ~1B Llama built from a config (``--models``).

    python benchmarks/bench_llm.py --generate
    python benchmarks/bench_llm.py --step --rounds 6 --batch 4
    python benchmarks/bench_llm.py --packing --rows 64 --batch 4 --rounds 3
    python benchmarks/bench_llm.py --qlora --models smollm2 llama-1b
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from bench_memory import _reset_peak, _status_kib  # noqa: E402
from torch import nn  # noqa: E402

import lightning_peft as lp  # noqa: E402
from lightning_peft.packaged_models import resolve_model_path  # noqa: E402

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPTS = [
    "What is the capital of France?",
    "Is the sentiment of this sentence positive or negative? Answer with one word.\n\na dull, lifeless film",
    "Write one sentence about the sea.",
]
#: ~1.1B parameters, Llama-architecture (TinyLlama's shape), random weights: memory only
LLAMA_1B = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
}


def smollm2() -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path("smollm2")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def moved(model: nn.Module, seed: int = 1, scale: float = 0.02) -> nn.Module:
    """Move every trainable tensor off its initial value (LoRA's B = 0 would make merging trivially exact)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def bench_generate(args: argparse.Namespace) -> dict[str, Any]:
    import copy

    base, tokenizer = smollm2()
    results: dict[str, Any] = {}
    for name, method in (
        ("lora", lp.LoRA(r=8, target_modules=ATTENTION)),
        ("dora", lp.DoRA(r=8, target_modules=ATTENTION)),
    ):
        model = copy.deepcopy(base)
        lp.apply_peft(model, method)
        moved(model)
        differing = 0
        for prompt in PROMPTS:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            kwargs = dict(
                ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
            with torch.no_grad():
                unmerged = model.generate(**kwargs)
                lp.merge_adapter(model)
                merged = model.generate(**kwargs)
                lp.unmerge_adapter(model)
            differing += int((unmerged != merged).sum()) + abs(unmerged.shape[1] - merged.shape[1])
        results[name] = {
            "prompts": len(PROMPTS),
            "new_tokens": args.new_tokens,
            "differing_tokens": differing,
        }
        print(
            f"{name}: {differing} differing tokens over {len(PROMPTS)} prompts x {args.new_tokens} new tokens",
            flush=True,
        )
    return results


def sft_batches(tokenizer: Any, batch: int, count: int, length: int = 128) -> list[dict[str, torch.Tensor]]:
    """SST-2 training conversations as dynamically padded batches built by lightning_peft.tasks."""
    from llm_packing import encoded_conversations

    from lightning_peft.tasks.batching import pad_batch

    encoded = encoded_conversations(tokenizer, batch * count, length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [pad_batch(encoded[i : i + batch], pad) for i in range(0, len(encoded), batch)]


def sft_module(model: nn.Module) -> nn.Module:
    from lightning_peft.tasks import CausalLMSFT

    return CausalLMSFT(model_name_or_path=None, model=model)


def step_fn(module: nn.Module, batches: list[dict[str, torch.Tensor]]) -> Any:
    from lightning_peft.tasks.causal_lm import summed_token_loss

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    state = {"i": 0}

    def step() -> None:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        total, count = summed_token_loss(module(**batch).logits, batch["labels"])
        (total / count.clamp(min=1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def variant(name: str, base: nn.Module) -> nn.Module:
    import copy

    model = copy.deepcopy(base).train()
    torch.manual_seed(1)
    if name == "lightning-peft":
        lp.apply_peft(model, lp.LoRA(r=8, alpha=16, target_modules=ATTENTION))
        return model
    import peft

    config = peft.LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ATTENTION
    )
    return peft.get_peft_model(model, config)


def bench_step(args: argparse.Namespace) -> dict[str, Any]:
    base, tokenizer = smollm2()
    batches = sft_batches(tokenizer, args.batch, 4)
    steps = {name: step_fn(sft_module(variant(name, base)), batches) for name in ("lightning-peft", "peft")}
    times = common.interleaved(steps, repeats=args.rounds, warmup=1)
    ratio = common.paired(times["lightning-peft"].wall, times["peft"].wall)
    cpu_ratio = common.paired(times["lightning-peft"].cpu, times["peft"].cpu)
    memory = {
        name: run_worker(
            ["--memory-worker", name, "--batch", str(args.batch), "--threads", str(args.threads)]
        )
        for name in steps
    }
    result = {"step_wall_ratio": ratio, "step_cpu_ratio": cpu_ratio, "memory": memory}
    print(json.dumps(result, indent=2), flush=True)
    return result


def memory_worker(name: str, batch: int, model_name: str = "smollm2") -> dict[str, Any]:
    """One training step of ``name`` in this fresh process: peak resident memory above the memory before."""
    if name in ("lightning-peft", "peft"):
        base, tokenizer = smollm2()
        module = sft_module(variant(name, base))
        del base
    else:  # "lora" / "qlora" on model_name
        module, tokenizer = qlora_variant(name, model_name)
    batches = sft_batches(tokenizer, batch, 2) if tokenizer is not None else [random_batch(batch)]
    step = step_fn(module, batches)
    before = _reset_peak()
    step()
    first = _status_kib("VmHWM") * 1024 - before
    before = _reset_peak()
    # resident memory before the step split into anonymous (tensors) and file-backed (mmapped weight files) pages
    split = {f"before_{k.lower()}_mib": _status_kib(k) / 1024 for k in ("RssAnon", "RssFile")}
    step()
    return {
        **split,
        "variant": name,
        "model": model_name,
        "first_step_peak_delta_mib": first / 2**20,
        "steady_step_peak_delta_mib": (_status_kib("VmHWM") * 1024 - before) / 2**20,
        "steady_step_peak_mib": _status_kib("VmHWM") / 1024,
        "resident_mib": _status_kib("VmRSS") / 1024,
    }


def random_batch(batch: int, length: int = 128) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 32000, (batch, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def qlora_variant(name: str, model_name: str) -> tuple[nn.Module, Any]:
    """fp32 LoRA or QLoRA (nf4-dq + activation checkpointing) on SmolLM2 or the random ~1B Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lightning_peft.core.base_model import set_activation_checkpointing
    from lightning_peft.tasks.common import quantization_kwargs

    tokenizer = None
    if model_name == "smollm2":
        path = resolve_model_path("smollm2")
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:  # a random ~1B Llama saved once (bf16 on disk) so that from_pretrained can quantize it
        path = str(Path(tempfile.gettempdir()) / "lightning-peft-llama-1b-random")
        if not (Path(path) / "config.json").is_file():
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16).save_pretrained(path)
    quantized = (
        quantization_kwargs("nf4-dq", device_map="cpu", skip_modules=("lm_head",)) if name == "qlora" else {}
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **quantized)
    if name == "qlora":
        set_activation_checkpointing(model, use_reentrant=False)
    lp.apply_peft(model, lp.LoRA(r=8, alpha=16, target_modules=ATTENTION))
    return sft_module(model).train(), tokenizer


def bench_packing(args: argparse.Namespace) -> dict[str, Any]:
    import llm_packing

    base, tokenizer = smollm2()
    return llm_packing.bench_packing(args, sft_module(variant("lightning-peft", base)), tokenizer)


def bench_qlora(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for model_name in args.models:
        rows = {
            v: run_worker(
                ["--memory-worker", v, "--model", model_name, "--batch", str(args.batch)]
                + ["--threads", str(args.threads)]
            )
            for v in ("lora", "qlora")
        }
        ratios: dict[str, float | None] = {"step_delta": None, "process_peak": None}
        if all("error" not in r for r in rows.values()):
            ratios = {
                key: rows["qlora"][f"steady_step_peak{suffix}_mib"]
                / rows["lora"][f"steady_step_peak{suffix}_mib"]
                for key, suffix in (("step_delta", "_delta"), ("process_peak", ""))
            }
        results[model_name] = {**rows, "qlora_over_lora": ratios}
        print(json.dumps(results[model_name], indent=2), flush=True)
    return results


def run_worker(extra: list[str]) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    done = subprocess.run([sys.executable, __file__, *extra], env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": ((done.stderr.strip().splitlines() or ["no output"])[-1])[:200]}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--generate", action="store_true")
    parser.add_argument("--step", action="store_true")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--qlora", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=64, help="conversations for --packing")
    parser.add_argument("--max-length", type=int, default=128, help="--packing: tokens per conversation")
    parser.add_argument(
        "--pack-length",
        type=int,
        default=None,
        help="--packing: tokens per packed row (default --max-length)",
    )
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama-1b"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.batch, args.model)))
        return
    results: dict[str, Any] = {"environment": common.environment()}
    for flag, bench in (
        ("generate", bench_generate),
        ("step", bench_step),
        ("packing", bench_packing),
        ("qlora", bench_qlora),
    ):
        if getattr(args, flag):
            results[flag] = bench(args)
    if args.json:
        common.write_json(args.json, results)


if __name__ == "__main__":
    main()
