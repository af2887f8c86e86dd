"""Chat SFT fits under 2-process DDP on CPU (gloo) for tests/test_tasks_ddp.py.

Run as ``python tests/ddp_sft_script.py OUT TOKENIZER_FOLDER TRAIN_JSONL``: one fit with packing off and one
with packing on, both with ``strategy="ddp"``, ``devices=2`` and ``accumulate_grad_batches=2``; Lightning
re-runs this script for rank 1. Each rank writes ``<name>_rank<r>.pt`` (the final adapter and the gradient at
every optimizer step) and ``<name>_rank<r>.json`` (what it trained on and what it logged). The single-process
reference comes from :func:`fit` too, called by the test.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
from tiny_llama import tiny_llama  # noqa: E402

from lightning_peft import LoRA, PEFTCallback, adapter_state_dict  # noqa: E402
from lightning_peft.tasks import CausalLMSFT, ChatDataModule  # noqa: E402
from lightning_peft.tasks.causal_lm import summed_token_loss  # noqa: E402
from lightning_peft.tasks.chat_format import IGNORE_INDEX  # noqa: E402

SCRIPT = Path(__file__).resolve()
#: name -> ChatDataModule arguments: 16 conversations in 8 batches of 2; packed, 10 rows of at most 48 tokens
#: in batches of 1 (so the last window holds one batch per process)
SETTINGS: dict[str, dict[str, Any]] = {
    "plain": {"batch_size": 2, "max_length": 64, "packing": False},
    "packed": {"batch_size": 1, "max_length": 48, "packing": True},
}
ACCUMULATE = 2
EPOCHS = 2


def data_module(tokenizer: Path, train: Path, name: str) -> ChatDataModule:
    """Shuffled, length-grouped batches (the defaults), the same in every process."""
    return ChatDataModule(train_file=str(train), model_name_or_path=str(tokenizer), seed=3, **SETTINGS[name])


def fingerprint(input_ids: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """A row's tokens up to its last labelled one: the same for a row whatever padding its batch gave it."""
    labelled = (labels != IGNORE_INDEX).nonzero()
    return input_ids[: int(labelled.max()) + 1].tolist()


class Recording(CausalLMSFT):
    """CausalLMSFT that keeps each micro-batch's own summed loss and token count, and what it logged."""

    def __init__(self) -> None:
        super().__init__(model=tiny_llama(seed=2), lr=1e-2)
        self.record: dict[str, list[Any]] = {"local": [], "logged": [], "rows": []}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        with torch.no_grad():  # dropout is 0: the same forward again
            total, count = summed_token_loss(self(**batch).logits, batch["labels"])
        self.record["local"].append([float(total), int(count), int(batch["num_answer_tokens"])])
        rows = [fingerprint(i, lab) for i, lab in zip(batch["input_ids"], batch["labels"], strict=True)]
        self.record["rows"].append(rows)
        return loss

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if name == "train_loss":
            self.record["logged"].append(float(value))
        super().log(name, value, *args, **kwargs)


class SeedAtSetup(pl.Callback):
    """Placed before PEFTCallback: the same LoRA init in every process and run."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.manual_seed(1234)


class GradCapture(pl.Callback):
    """The trainable parameters' gradients at every optimizer step (after DDP's averaging)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        self.steps.append(grads)


def fit(tokenizer: Path, train: Path, name: str, devices: int, accumulate: int) -> dict[str, Any]:
    """Fit LoRA on the tiny Llama; returns the final adapter, the gradients and the module's record."""
    module, grads = Recording(), GradCapture()
    lora = LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"])  # dropout 0: deterministic
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",  # use_distributed_sampler stays at its default, True
        max_epochs=EPOCHS,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        callbacks=[SeedAtSetup(), PEFTCallback(lora, verbose=False), grads],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(module, data_module(tokenizer, train, name))
    adapter = {k: v.detach().clone() for k, v in adapter_state_dict(module).items()}
    return {
        "adapter": adapter,
        "grads": grads.steps,
        "record": module.record,
        "batches_per_epoch": trainer.num_training_batches,
    }


def run_script(out: Path, tokenizer: Path, train: Path, timeout: float = 600) -> None:
    """Run this script in a subprocess (it starts rank 1 itself); fails with its output's tail."""
    from multiprocess import clean_env, run_distributed

    # this checkout's package, not whichever copy is installed
    env = clean_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[1]), env.get("PYTHONPATH", "")])
    command = [sys.executable, str(SCRIPT), str(out), str(tokenizer), str(train)]
    proc = run_distributed(command, env, timeout)
    assert proc.returncode == 0, f"{SCRIPT.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def main() -> None:
    out, tokenizer, train = (Path(a) for a in sys.argv[1:4])
    out.mkdir(parents=True, exist_ok=True)
    for name in SETTINGS:
        result = fit(tokenizer, train, name, devices=2, accumulate=ACCUMULATE)
        rank = torch.distributed.get_rank()
        torch.save({"adapter": result["adapter"], "grads": result["grads"]}, out / f"{name}_rank{rank}.pt")
        info = {"record": result["record"], "batches_per_epoch": result["batches_per_epoch"]}
        (out / f"{name}_rank{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
