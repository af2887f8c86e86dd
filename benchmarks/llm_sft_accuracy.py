"""SST-2 as a chat task on SmolLM2-135M-Instruct: accuracy zero-shot and after SFT, for every method, and HF
PEFT side by side (issue 20).

Each run follows a shipped YAML's recipe (method, learning rate, quantization, data, ``max_steps``) through
``PEFTCallback`` on ``lightning_peft.tasks.CausalLMSFT`` + ``ChatDataModule``, then scores the first
``--val-size`` validation sentences twice: by the answer word's first-token log-probabilities, and by greedy
generation (the answer's first word). In-training validation is off: nothing is selected on the scores.

A ``peft-<method>`` run trains HF PEFT's implementation with the same Lightning loop, data order, seed and
*initial adapter*: the matching lightning-peft run saves its adapter before the first step (``init/``, HF
PEFT's file layout), and ``PeftModel.from_pretrained(..., is_trainable=True)`` starts from those tensors.

    python benchmarks/llm_sft_accuracy.py --run zero-shot --output runs/llm_sft
    python benchmarks/llm_sft_accuracy.py --run lora --output runs/llm_sft      # then: --run peft-lora
    python benchmarks/llm_sft_accuracy.py --table runs/llm_sft                  # the markdown table

Runs: zero-shot, lora, dora, ia3, pfeiffer, houlsby, prefix, prompt, bitfit, qlora, and peft-<one of lora,
dora, ia3, prefix, prompt, qlora>. Each writes ``<output>/<run>.json``. A ``bbc-`` prefix (``bbc-zero-shot``,
``bbc-lora``) runs the same recipe unchanged on BBC News topics as a chat task (five one-word answers; articles
shortened to fit ``max_length``; ``python benchmarks/prepare_bbc_news.py`` first).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import lightning_peft as lp  # noqa: E402
from lightning_peft.library_noise import silence_known_noise  # noqa: E402
from lightning_peft.tasks import CausalLMSFT, ChatDataModule  # noqa: E402
from lightning_peft.tasks.chat_eval import accuracy_by_first_token, accuracy_by_generation  # noqa: E402
from lightning_peft.tasks.chat_format import sst2_examples  # noqa: E402
from lightning_peft.tasks.common import default_data_dir  # noqa: E402
from lightning_peft.tasks.tsv_data import read_table, table_file  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"
#: run name -> (YAML, overrides of the method's init_args, method class override)
RUNS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "lora": ("smollm2_sft_lora.yaml", {}, None),
    "dora": ("smollm2_sft_dora.yaml", {}, None),
    "ia3": ("smollm2_sft_ia3.yaml", {}, None),
    "pfeiffer": ("smollm2_sft_adapter.yaml", {"placement": "pfeiffer"}, None),
    "houlsby": ("smollm2_sft_adapter.yaml", {"placement": "houlsby"}, None),
    "prefix": ("smollm2_sft_prefix.yaml", {}, None),
    # Li & Liang's reparametrisation: the prefix comes out of a 2-layer MLP during training
    "prefix-projection": ("smollm2_sft_prefix.yaml", {"prefix_projection": True}, None),
    "prompt": ("smollm2_sft_prompt.yaml", {}, None),
    "qlora": ("smollm2_sft_qlora.yaml", {}, None),
    "bitfit": ("smollm2_sft_lora.yaml", {}, "lightning_peft.BitFit"),
}
PEFT_RUNS = ("lora", "dora", "ia3", "prefix", "prompt", "qlora")
SEED = 42


def recipe(run: str) -> tuple[lp.PEFTMethod, dict[str, Any], dict[str, Any], int]:
    """The method, CausalLMSFT arguments, ChatDataModule arguments and max_steps of a run's YAML."""
    file, overrides, class_override = RUNS[run]
    config = yaml.safe_load((CONFIGS / file).read_text())
    callback = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("PEFTCallback"))
    spec = callback["init_args"]["method"]
    class_path = class_override or spec["class_path"]
    init_args = {} if class_override else {**spec.get("init_args", {}), **overrides}
    module_name, class_name = class_path.rsplit(".", 1)
    method = getattr(importlib.import_module(module_name), class_name)(**init_args)
    return method, config["model"]["init_args"], config["data"]["init_args"], config["trainer"]["max_steps"]


def score(model: torch.nn.Module, tokenizer: Any, examples: list) -> dict[str, float]:
    start = time.perf_counter()
    by_token = accuracy_by_first_token(model, tokenizer, examples, batch_size=16)
    by_generation, answers = accuracy_by_generation(
        model, tokenizer, examples, max_new_tokens=3, batch_size=16
    )
    return {
        "acc_logprob": by_token,
        "acc_generation": by_generation,
        "score_s": time.perf_counter() - start,
        "answers": answers,
    }


class _DropVirtualPositions(torch.nn.Module):
    """HF PEFT's prompt tuning returns logits for its virtual tokens too (B, P + L, V); CausalLMSFT's loss takes
    (B, L, V), which is what lightning-peft's prompt tuning returns. Training only: scoring uses the PEFT model."""

    def __init__(self, model: torch.nn.Module, virtual: int) -> None:
        super().__init__()
        self.model = model
        self.virtual = virtual

    def forward(self, **inputs: Any) -> Any:
        out = self.model(**inputs)
        out.logits = out.logits[:, self.virtual :]  # (B, L, V)
        return out


class SaveInitial(pl.Callback):
    """Saves the adapter as it is before the first optimizer step (the HF PEFT run starts from it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lp.save_adapter(pl_module.model, self.folder)


def run_one(run: str, output: Path, val_size: int) -> dict[str, Any]:
    dataset = "bbc_news" if run.startswith("bbc-") else "sst2"
    library = "peft" if run.removeprefix("bbc-").startswith("peft-") else "lightning_peft"
    name = run.removeprefix("bbc-").removeprefix("peft-")
    method, model_args, data_args, max_steps = recipe("lora" if name == "zero-shot" else name)
    pl.seed_everything(SEED, verbose=False)
    data = ChatDataModule(**{**data_args, "dataset": dataset, "val_size": val_size})
    if dataset == "sst2":
        rows = read_table(table_file(default_data_dir("sst2"), "validation"))[:val_size]
        examples = sst2_examples(rows)
    else:  # the data module's own conversion: articles shortened so the answer fits max_length
        examples = data._examples("validation", val_size)
    module = CausalLMSFT(**model_args)
    result: dict[str, Any] = {
        "run": run,
        "dataset": dataset,
        "library": library,
        "method": type(method).__name__,
        "val_size": val_size,
    }
    if name == "zero-shot":
        return {**result, "method": "none", **score(module.model, data.tokenizer, examples)}
    result.update(lr=model_args["lr"], max_steps=max_steps, batch_size=data_args["batch_size"])
    callbacks: list[pl.Callback] = []
    if library == "peft":
        from peft import PeftModel

        init = output / f"{run.replace('peft-', '')}-init"
        if not (init / "adapter_config.json").is_file():
            raise SystemExit(
                f"run {name!r} first: {init} holds the initial adapter the HF PEFT run starts from"
            )
        if name in ("prefix", "prompt"):
            # PeftModel.from_pretrained refuses is_trainable for prompt learning: build it from the saved
            # config, then load the saved initial tensors into it
            from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
            from safetensors.torch import load_file

            module.model = get_peft_model(module.model, PeftConfig.from_pretrained(str(init)))
            tensors = load_file(str(init / "adapter_model.safetensors"))
            set_peft_model_state_dict(module.model, tensors)
            loaded = module.model.prompt_encoder["default"].embedding.weight
            if not torch.equal(loaded, tensors["prompt_embeddings"]):
                raise SystemExit("HF PEFT did not take the initial prompt embeddings")
            if name == "prompt":
                module.model = _DropVirtualPositions(module.model, tensors["prompt_embeddings"].shape[0])
        else:
            module.model = PeftModel.from_pretrained(module.model, str(init), is_trainable=True)
        module.model.train()
    else:
        if name == "bitfit":  # Llama has no biases: expected to refuse at attach, with the reason
            try:
                lp.apply_peft(module.model, method)
            except ValueError as error:
                return {**result, "refused": str(error)}
            lp.remove_peft(module.model)
        callbacks = [lp.PEFTCallback(method), SaveInitial(output / f"{run}-init")]
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    result["train_s"] = time.perf_counter() - start
    result["train_loss_last"] = float(trainer.callback_metrics.get("train_loss", float("nan")))
    if isinstance(module.model, _DropVirtualPositions):
        module.model = module.model.model
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    result["trainable_params"] = trainable
    return {**result, **score(module.model, data.tokenizer, examples)}


def table(folder: Path) -> str:
    results = {r["run"]: r for r in (json.loads(p.read_text()) for p in sorted(folder.glob("*.json")))}
    order = ["zero-shot", *RUNS, "bbc-zero-shot", "bbc-lora"]
    lines = [
        "| method | lr | trainable params | log-prob acc | greedy acc | HF PEFT log-prob | HF PEFT greedy "
        "| train s (ours / PEFT) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in order:
        ours = results.get(name)
        if ours is None:
            continue
        theirs = results.get(f"peft-{name}", {})
        if "refused" in ours:
            lines.append(f"| {name} | | | refused at attach: {ours['refused'][:120]} | | | | |")
            continue

        def pct(r: dict[str, Any], key: str) -> str:
            return f"{100 * r[key]:.1f}%" if key in r else "-"

        times = f"{ours.get('train_s', 0):.0f} / {theirs['train_s']:.0f}" if "train_s" in theirs else ""
        lines.append(
            f"| {name} | {ours.get('lr', '')} | {ours.get('trainable_params', '')} | {pct(ours, 'acc_logprob')} "
            f"| {pct(ours, 'acc_generation')} | {pct(theirs, 'acc_logprob')} | {pct(theirs, 'acc_generation')} "
            f"| {times} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sst2_runs = ["zero-shot", *RUNS, *(f"peft-{r}" for r in PEFT_RUNS)]
    parser.add_argument("--run", choices=[*sst2_runs, *(f"bbc-{r}" for r in sst2_runs)])
    parser.add_argument("--output", default="runs/llm_sft")
    parser.add_argument("--val-size", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--table", metavar="FOLDER", help="print the markdown table of a folder's runs")
    args = parser.parse_args()
    if args.table:
        print(table(Path(args.table)))
        return
    if args.run is None:
        parser.error("give --run or --table")
    silence_known_noise()
    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    result = run_one(args.run, output, args.val_size)
    (output / f"{args.run}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "answers"}), flush=True)


if __name__ == "__main__":
    main()
