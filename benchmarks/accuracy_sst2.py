"""SST-2 accuracy of the classic recipe, lightning-peft next to HF PEFT in the same process.

Recipe: the packaged all-MiniLM-L6-v2, the first 2,000 sentences of train.tsv, 2 epochs, batch 16, max length
128, AdamW; accuracy on the first 1,000 sentences of validation.tsv after each epoch and, once at the end, on
the 872-sentence test.tsv (the GLUE dev set). Nothing is selected on test.tsv. Every variant sees the same batches in
the same order; ``peft-lora``/``peft-dora`` start from *the same* LoRA weights as ``lora``/``dora`` (copied
over), so the two libraries' runs differ only by their arithmetic.

    .venv/bin/python benchmarks/accuracy_sst2.py --variants lora peft-lora --lr 2e-4
    .venv/bin/python benchmarks/accuracy_sst2.py --variants full --lr 2e-5
    # full data, one epoch (60,614 sentences), LoRA on every linear layer, warm-up then linear decay
    .venv/bin/python benchmarks/accuracy_sst2.py --variants lora --train-size 0 --epochs 1 --max-length 66 \
        --targets query key value dense --lr 5e-4 --warmup-ratio 0.06 --log-every 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from text_classification import TextClassificationDataModule, resolve_model_path  # noqa: E402

import lightning_peft as lp  # noqa: E402
from lightning_peft.library_noise import quiet_model_loading  # noqa: E402

TARGETS = ["query", "value"]
METHOD_ARGS: dict[str, Any] = {}
OURS = {
    "lora": lambda: lp.LoRA(r=8, alpha=16, dropout=0.1, target_modules=list(TARGETS)),
    "dora": lambda: lp.DoRA(r=8, alpha=16, dropout=0.1, target_modules=list(TARGETS)),
    "ia3": lambda: lp.IA3(),
    "adapter": lambda: lp.Adapter(bottleneck_size=24),
    "prefix": lambda: lp.PrefixTuning(num_virtual_tokens=20),
    "prompt": lambda: lp.PromptTuning(num_virtual_tokens=20),
    "bitfit": lambda: lp.BitFit(),
}


def base_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the new classifier head
    with quiet_model_loading():  # the new head is expected to be missing from the checkpoint
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path("minilm"), num_labels=2
        )


def build(variant: str, seed: int, reference: dict[str, dict[str, torch.Tensor]]) -> nn.Module:
    model = base_model(seed)
    if variant == "full":
        return model
    if variant in OURS:
        method = OURS[variant]()
        method.modules_to_save = ["classifier"]
        for key, value in METHOD_ARGS.items():  # --method-args
            setattr(method, key, resolve_model_path(value) if key == "tokenizer_name_or_path" else value)
        method.__post_init__()  # validate the overridden fields
        torch.manual_seed(seed + 1)
        lp.apply_peft(model, method)
        # the initial adapter (cloned: this model trains before the HF PEFT variant is built)
        reference[variant] = {n: t.clone() for n, t in lp.adapter_state_dict(model).items()}
        return model
    import peft  # test/benchmark-only oracle

    kind = variant.removeprefix("peft-")
    config = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=8,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=list(TARGETS),
        use_dora=kind == "dora",
    )
    wrapped = peft.get_peft_model(model, config)
    initial = reference.get(kind)
    if initial is not None:  # start from exactly the same adapter weights
        params = dict(wrapped.named_parameters())
        for name, tensor in initial.items():
            if name.endswith(("lora_A", "lora_B")):
                params[f"base_model.model.{name}.default.weight"].data.copy_(tensor)
    return wrapped


def evaluate(model: nn.Module, loader: Any) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    return correct / total


def schedule(optimizer: torch.optim.Optimizer, total: int, warmup_ratio: float) -> Any:
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0 (constant when 0)."""
    warmup = max(int(total * warmup_ratio), 1)

    def factor(step: int) -> float:
        if not warmup_ratio:
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(total - warmup, 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run(variant: str, args: argparse.Namespace, data: TextClassificationDataModule, reference: dict) -> dict:
    model = build(variant, args.seed, reference)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    steps_per_epoch = -(-len(data.splits["train"]) // 16)
    scheduler = schedule(optimizer, args.epochs * steps_per_epoch, args.warmup_ratio)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed + 2)  # dropout masks
    start = time.perf_counter()
    val_accuracy: list[float] = []
    step = 0
    stopped = False
    for _ in range(args.epochs):
        model.train()
        loader = torch.utils.data.DataLoader(
            data.splits["train"], batch_size=16, shuffle=True, generator=generator, collate_fn=data.collate
        )
        for batch in loader:
            if args.max_minutes and time.perf_counter() - start > 60 * args.max_minutes:
                print(
                    f"  {variant}: stopped at step {step}: --max-minutes {args.max_minutes} reached",
                    flush=True,
                )
                stopped = True
                break
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if args.log_every and step % args.log_every == 0:
                elapsed = time.perf_counter() - start
                print(
                    f"  {variant} step {step}/{args.epochs * steps_per_epoch} loss {loss.item():.3f} {elapsed:.0f} s",
                    flush=True,
                )
        val_accuracy.append(evaluate(model, data.val_dataloader()))
        if stopped:
            break
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, data.test_dataloader())
    trainable = sum(p.numel() for p in params)
    return {
        "variant": variant,
        "lr": args.lr,
        "method_args": METHOD_ARGS,
        "warmup_ratio": args.warmup_ratio,
        "epochs": args.epochs,
        "val_accuracy": val_accuracy,
        "accuracy": accuracy,
        "train_seconds": seconds,
        "steps": step,
        "trainable": trainable,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["lora", "peft-lora"])
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=2000, help="0 = all 60,614 sentences")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--warmup-ratio", type=float, default=0.0)
    parser.add_argument("--targets", nargs="+", default=TARGETS, help="LoRA/DoRA target modules")
    parser.add_argument("--log-every", type=int, default=0, help="print the loss every N steps")
    parser.add_argument(
        "--method-args",
        type=json.loads,
        default={},
        help="JSON fields set on the lightning-peft method, e.g. '{\"num_virtual_tokens\": 10}'",
    )
    parser.add_argument("--max-minutes", type=float, default=0, help="stop training after this long")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    TARGETS[:] = args.targets
    METHOD_ARGS.update(args.method_args)
    transformers.logging.set_verbosity_error()
    data = TextClassificationDataModule(
        train_size=args.train_size or None, batch_size=16, max_length=args.max_length
    )
    data.setup("fit")
    data.setup("test")
    reference: dict[str, dict[str, torch.Tensor]] = {}
    results = []
    print(
        "| variant | lr | trainable | val acc per epoch | SST-2 test acc | train s |\n|---|---|---|---|---|---|"
    )
    for variant in args.variants:
        r = run(variant, args, data, reference)
        results.append(r)
        print(
            f"| {variant} | {r['lr']:g} | {r['trainable']:,} | {' / '.join(f'{100 * v:.1f}%' for v in r['val_accuracy'])} "
            f"| {100 * r['accuracy']:.1f}% | {r['train_seconds']:.0f} |",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
