"""`make demo`: LoRA on the packaged all-MiniLM-L6-v2, SST-2, the classic tutorial recipe.

LoRA r=8, alpha=16, dropout 0.1 on query and value, classifier head trainable; 2,000 training
sentences, 2 epochs, batch 16, lr 2e-4. Validates after each epoch on 1,000 sentences of validation.tsv,
then reports accuracy once on the 872-sentence GLUE dev set (test.tsv, never used for any choice), saves the
adapter, reloads it onto a fresh base model and classifies a few sentences. Offline.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_peft import LoRA, PEFTCallback, count_parameters, load_adapter, save_adapter  # noqa: E402
from lightning_peft.quiet import silence_known_noise  # noqa: E402
from lightning_peft.tasks import SequenceClassifier, TextClassificationDataModule  # noqa: E402

EXAMPLES = [
    "a gripping, beautifully acted film that stays with you long after the credits roll",
    "a tedious, overlong mess with nothing new to say",
    "the jokes are stale and the plot makes no sense",
    "one of the most charming and funny movies of the year",
]
LABELS = ("negative", "positive")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--output", default=None, help="where to save the adapter (default: a temp folder)")
    args = parser.parse_args()

    pl.seed_everything(42, verbose=False)
    silence_known_noise()  # Lightning's litlogger tip and an internal deprecation warning
    data = TextClassificationDataModule(
        train_size=args.train_size, val_size=1000, batch_size=16, max_length=128
    )
    model = SequenceClassifier(lr=args.lr)
    lora = LoRA(r=8, alpha=16, dropout=0.1, target_modules=["query", "value"], modules_to_save=["classifier"])
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        callbacks=[PEFTCallback(lora)],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,  # PEFTCallback prints the trainable-parameter line
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - start
    val_acc = float(trainer.callback_metrics["val_acc"])
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    print(f"\nSST-2 validation (1,000 sentences of validation.tsv): accuracy {100 * val_acc:.1f}%")
    print(
        f"SST-2 test.tsv (872 sentences, read once at the end): accuracy {100 * metrics['test_acc']:.1f}%, "
        f"F1 {metrics['test_f1']:.3f}"
    )
    print(
        f"training time (validation included): {train_seconds:.0f} s on {torch.get_num_threads()} CPU threads"
    )

    output = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="lightning-peft-demo-"))
    save_adapter(model, output)
    size = sum(f.stat().st_size for f in output.iterdir())
    print(f"adapter saved to {output} ({size / 1e6:.2f} MB)")

    fresh = SequenceClassifier()
    load_adapter(fresh, output)
    fresh.eval()
    print(f"reloaded onto a fresh base model; {count_parameters(fresh)}")
    encoded = data.tokenizer(EXAMPLES, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = fresh.model(**encoded).logits.softmax(dim=-1)
    for text, p in zip(EXAMPLES, probs):
        label = int(p.argmax())
        print(f"  {LABELS[label]:>8} ({p[label]:.2f})  {text}")


if __name__ == "__main__":
    main()
