"""``lightning-peft fit`` with a YAML naming lightning_peft.tasks classes, run outside the checkout."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_llama import save_tiny, sentiment_rows, write_jsonl

import lightning_peft

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  accumulate_grad_batches: 2
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: runs, name: sft}}
  callbacks:
    - class_path: lightning_peft.PEFTCallback
      init_args:
        method:
          class_path: lightning_peft.LoRA
          init_args: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
model:
  class_path: lightning_peft.tasks.CausalLMSFT
  init_args: {{model_name_or_path: {model}, lr: 1.0e-2, warmup_ratio: 0.25}}
data:
  class_path: lightning_peft.tasks.ChatDataModule
  init_args:
    train_file: {train}
    val_file: {val}
    model_name_or_path: {model}
    batch_size: 4
    max_length: 64
    packing: true
"""


def test_fit_from_a_directory_outside_the_checkout(tmp_path: Path) -> None:
    # the package as if installed elsewhere: a copy of lightning_peft/ alone, no repository on the path
    site = tmp_path / "site"
    shutil.copytree(
        Path(lightning_peft.__file__).parent,
        site / "lightning_peft",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    work = tmp_path / "work"
    work.mkdir()
    model = save_tiny(tmp_path / "tiny-llama")
    rows = sentiment_rows(16)
    for r in rows:
        r["choices"] = ["negative", "positive"]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", rows[:8])
    config = work / "sft.yaml"
    config.write_text(CONFIG.format(model=model, train=train, val=val))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(site)
    command = [sys.executable, "-c", "import sys; from lightning_peft.cli import main; sys.exit(main())"]
    check = subprocess.run(
        [sys.executable, "-c", "import lightning_peft; print(lightning_peft.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert check.stdout.strip() == str(site / "lightning_peft" / "__init__.py")
    done = subprocess.run(
        [*command, "fit", "--config", str(config)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((work / "runs" / "sft").glob("version_*"))
    assert len(runs) == 1
    assert (runs[0] / "adapter" / "adapter_model.safetensors").is_file()
    with open(runs[0] / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    val_acc = [float(r["val_acc"]) for r in metrics if r.get("val_acc")]
    assert len(val_acc) >= 1 and all(0.0 <= a <= 1.0 for a in val_acc)
    assert any(r.get("train_loss") for r in metrics)


@pytest.mark.parametrize(
    "config", sorted(p.name for p in (Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml"))
)
def test_shipped_configs_name_package_classes(config: str) -> None:
    text = (Path(__file__).parents[1] / "examples" / "configs" / config).read_text()
    paths = [line.split("class_path:")[1].strip() for line in text.splitlines() if "class_path:" in line]
    assert paths and all(p.startswith(("lightning_peft.", "lightning.")) for p in paths), paths
