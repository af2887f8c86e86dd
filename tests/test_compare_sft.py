"""``lightning-peft compare`` on chat SFT configs: ChatDataModule's test split, CausalLMSFT's test_step, the SFT
presets, a method that refuses the model, the loss columns, and a tiny end-to-end run on a random Llama."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from tiny_llama import save_tiny, sentiment_rows, tiny_llama, write_jsonl

from lightning_peft import load_adapter
from lightning_peft.cli import main as cli_main
from lightning_peft.cli.compare import PRESETS, SFT_PRESETS, method_entry
from lightning_peft.cli.compare_report import aggregate, markdown
from lightning_peft.tasks import CausalLMSFT, ChatDataModule
from lightning_peft.tasks.causal_lm import summed_token_loss
from lightning_peft.tasks.chat_eval import accuracy_by_first_token
from lightning_peft.tasks.chat_format import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
SFT_LORA = CONFIGS / "smollm2_sft_lora.yaml"


def with_choices(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(r, choices=["negative", "positive"]) for r in rows]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved tiny random Llama + tokenizer and train/validation/test JSONL files with answer choices."""
    root = tmp_path_factory.mktemp("sft")
    rows = with_choices(sentiment_rows(24))
    return {
        "model": save_tiny(root / "tiny-llama"),
        "train": write_jsonl(root / "train.jsonl", rows[:12]),
        "val": write_jsonl(root / "val.jsonl", rows[12:18]),
        # the test rows differ from the validation rows (another order and a flipped answer)
        "test": write_jsonl(root / "test.jsonl", [rows[20], rows[19], dict(rows[23], completion="negative")]),
    }


def quiet_trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


# -- the test split and test_step ------------------------------------------------------------------------
def test_test_step_scores_the_test_file_exactly_like_validation(tiny: dict[str, Path]) -> None:
    files = {"train_file": str(tiny["train"]), "model_name_or_path": str(tiny["model"]), "batch_size": 2}
    data = ChatDataModule(**files, val_file=str(tiny["val"]), test_file=str(tiny["test"]))
    module = CausalLMSFT(model=tiny_llama(seed=3))
    tested = quiet_trainer().test(module, data, verbose=False)[0]
    assert "train" not in data.splits  # testing reads the test split alone
    assert set(tested) == {"test_loss", "test_acc"}
    # the same file as validation data gives the same figures under the val_ names
    as_val = ChatDataModule(**files, val_file=str(tiny["test"]))
    validated = quiet_trainer().validate(module, as_val, verbose=False)[0]
    assert tested["test_acc"] == pytest.approx(validated["val_acc"])
    assert tested["test_loss"] == pytest.approx(validated["val_loss"])
    # and against independent computations: first-token accuracy, and the loss one conversation at a time
    examples = read_jsonl(tiny["test"])
    assert tested["test_acc"] == pytest.approx(
        accuracy_by_first_token(module.model, data.tokenizer, examples)
    )
    total, count = torch.zeros(()), 0
    with torch.no_grad():
        for e in data.splits["test"]:
            s, n = summed_token_loss(
                module.model(input_ids=torch.tensor([e.input_ids])).logits, torch.tensor([e.labels])
            )
            total, count = total + s, count + int(n)
    assert tested["test_loss"] == pytest.approx(float(total / count), rel=1e-5)
    # test_size keeps the first N; without test_file there is nothing to test
    two = ChatDataModule(**files, test_file=str(tiny["test"]), test_size=2)
    two.setup("test")
    assert [e.answer for e in two.splits["test"]] == [0, 1]
    with pytest.warns(UserWarning, match="no test split"):
        assert quiet_trainer().test(module, ChatDataModule(**files), verbose=False) == []


def test_sst2_test_split_is_test_tsv(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na good film\t1\n")
    (tmp_path / "validation.tsv").write_text("sentence\tlabel\nfine\t1\n")
    data = ChatDataModule(dataset="sst2", data_dir=str(tmp_path), model_name_or_path=None, test_size=2)
    from tiny_llama import tiny_tokenizer

    data._tokenizer = tiny_tokenizer()
    with pytest.raises(FileNotFoundError, match=r"test\.tsv"):
        data.setup("test")
    (tmp_path / "test.tsv").write_text("sentence\tlabel\nawful plot\t0\ngreat acting\t1\nthe plot\t0\n")
    data.setup("test")
    tok = data.tokenizer
    texts = [tok.decode(e.input_ids) for e in data.splits["test"]]
    assert len(texts) == 2 and "awful plot" in texts[0] and "great acting" in texts[1]
    assert [e.choices[e.answer] for e in data.splits["test"]] == ["negative", "positive"]
    with pytest.raises(ValueError, match="test_file='t.jsonl' is for JSONL data"):
        ChatDataModule(dataset="sst2", test_file="t.jsonl")
    with pytest.raises(ValueError, match="test_size must be a positive integer"):
        ChatDataModule(dataset="sst2", test_size=0)


# -- presets -------------------------------------------------------------------------------------------
def test_sft_runs_take_the_yamls_own_method_and_the_sft_recipes(tmp_path: Path) -> None:
    base = yaml.safe_load(SFT_LORA.read_text())
    own = base["trainer"]["callbacks"][0]["init_args"]["method"]
    assert method_entry("lora", base, {}) == (own, 1e-3)  # exactly what `fit --config` trains
    dora, dora_lr = method_entry("dora", base, {})
    assert (
        dora_lr == pytest.approx(1e-3) != PRESETS["dora"][2]
    )  # the SFT recipe, not the encoder sweep's 3e-3
    assert dora["init_args"] == {**own["init_args"]}  # r 8, alpha 16, dropout 0.05 and the YAML's targets
    assert method_entry("prefix", base, {})[1] == pytest.approx(1e-2)
    assert method_entry("prefix", base, {"prefix": 5e-3})[1] == pytest.approx(5e-3)
    # a user's own recipe for the YAML's method is kept; the others still come from the presets
    base["model"]["init_args"]["lr"] = 5e-4
    own["init_args"]["r"] = 16
    assert method_entry("lora", base, {}) == (own, 5e-4)
    assert method_entry("dora", base, {})[0]["init_args"]["r"] == 8
    # Pfeiffer and Houlsby adapters are one class: only the YAML's placement is its own method
    adapter = yaml.safe_load((CONFIGS / "smollm2_sft_adapter.yaml").read_text())
    assert method_entry("houlsby", adapter, {})[0]["init_args"] == {
        "placement": "houlsby",
        "bottleneck_size": 16,
    }
    # encoder configs keep the classification presets, even where the YAML's own lr differs
    encoder = yaml.safe_load((CONFIGS / "sst2_lora.yaml").read_text())
    encoder["model"]["init_args"]["lr"] = 5e-4
    assert method_entry("lora", encoder, {})[1] == pytest.approx(PRESETS["lora"][2])


@pytest.mark.parametrize(
    ("preset", "config", "placement"),
    [
        ("lora", "smollm2_sft_lora.yaml", None),
        ("dora", "smollm2_sft_dora.yaml", None),
        ("ia3", "smollm2_sft_ia3.yaml", None),
        ("adapter", "smollm2_sft_adapter.yaml", None),
        ("houlsby", "smollm2_sft_adapter.yaml", "houlsby"),
        ("prefix", "smollm2_sft_prefix.yaml", None),
        ("prompt", "smollm2_sft_prompt.yaml", None),
    ],
)
def test_sft_presets_are_the_example_sft_recipes(preset: str, config: str, placement: str | None) -> None:
    recipe = yaml.safe_load((CONFIGS / config).read_text())
    method = next(c for c in recipe["trainer"]["callbacks"] if c["class_path"].endswith("PEFTCallback"))
    method = method["init_args"]["method"]
    args = {k: v for k, v in (method.get("init_args") or {}).items() if k != "target_modules"}
    if placement is not None:
        args["placement"] = placement
    class_path, init_args, lr = SFT_PRESETS[preset]
    assert (class_path, init_args) == (method["class_path"], args)
    assert lr == pytest.approx(float(recipe["model"]["init_args"]["lr"]))


# -- report ---------------------------------------------------------------------------------------------
def test_report_shows_losses_without_accuracy_and_lists_refusals() -> None:
    def run(method: str, seed: int, loss: float) -> dict[str, Any]:
        return {
            "method": method, "seed": seed, "lr": 1e-3, "trainable": 4096, "trainable_pct": 1.5,
            "val_acc": None, "test_acc": None, "val_loss": loss, "test_loss": loss + 0.1, "steps": 2,
            "step_ms": 50.0, "train_seconds": 1.0, "peak_memory_mib": 300.0, "adapter_bytes": 20_000,
            "latency_unmerged_ms": 2.0, "latency_merged_ms": 1.5,
        }  # fmt: skip

    refused = {"method": "bitfit", "seed": 0, "lr": 3e-3, "refused": "BitFit found no bias parameters"}
    rows = aggregate([run("lora", 0, 1.0), run("lora", 1, 1.2), refused])
    table = markdown(rows)
    assert "| val loss | test loss |" in table
    assert "| lora | 4,096 | 1.50% | 1.1000 ± 0.1414 | 1.2000 ± 0.1414 |" in table
    assert "| bitfit | refused (see below) |" in table
    assert "* **bitfit**: BitFit found no bias parameters" in table
    assert all(line.count("|") == 13 for line in table.splitlines() if line.startswith("|"))


# -- end to end ----------------------------------------------------------------------------------------
def sft_config(tiny: dict[str, Path]) -> dict[str, Any]:
    lora = {
        "class_path": "lightning_peft.LoRA",
        "init_args": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
    }
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "lightning_peft.PEFTCallback", "init_args": {"method": lora}},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"monitor": "val_acc"},
                },
            ],
        },
        "model": {
            "class_path": "lightning_peft.tasks.CausalLMSFT",
            "init_args": {"model_name_or_path": str(tiny["model"]), "lr": 5e-2},
        },
        "data": {
            "class_path": "lightning_peft.tasks.ChatDataModule",
            "init_args": {
                "train_file": str(tiny["train"]),
                "val_file": str(tiny["val"]),
                "test_file": str(tiny["test"]),
                "model_name_or_path": str(tiny["model"]),
                "batch_size": 4,
                "max_length": 64,
            },
        },
    }


def test_compare_on_a_tiny_llama_sft_config(
    tiny: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(ROOT)  # the workers import this checkout's lightning_peft
    monkeypatch.setattr(sys, "argv", ["lightning-peft"])
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(sft_config(tiny)))
    out = tmp_path / "out"
    argv = ["compare", "--config", str(config), "--methods", "lora", "bitfit", "--output", str(out)]
    assert cli_main([*argv, "--latency-repeats", "1"]) == 0
    printed = capsys.readouterr().out
    assert "presets: the chat SFT (CausalLMSFT) recipes" in printed
    assert "[2/2] bitfit seed 0: refused: BitFit found no bias parameters" in printed
    lora = json.loads((out / "runs" / "lora-seed0.json").read_text())
    bitfit = json.loads((out / "runs" / "bitfit-seed0.json").read_text())
    assert "no bias" in bitfit["refused"] and "trainable" not in bitfit
    assert lora["steps"] == 2 and lora["lr"] == pytest.approx(5e-2) and "refused" not in lora
    assert lora["trainable"] == 2 * 4 * (32 + 32)  # r 4 on q_proj (32 -> 32) in 2 layers: the YAML's own LoRA
    assert lora["val_loss"] > 0 and lora["test_loss"] > 0 and lora["latency_unmerged_ms"] > 0
    # the reported accuracies are the final adapter's, on the validation and on the test file
    module = CausalLMSFT(model_name_or_path=str(tiny["model"]))
    load_adapter(module, out / "runs" / "lora-seed0" / "adapter")
    data = ChatDataModule(train_file=str(tiny["train"]), model_name_or_path=str(tiny["model"]))
    for split in ("val", "test"):
        expected = accuracy_by_first_token(module.model, data.tokenizer, read_jsonl(tiny[split]))
        assert lora[f"{split}_acc"] == pytest.approx(expected)
    table = (out / "results.md").read_text()
    assert "| val acc | test acc |" in table
    assert "| lora | 512 | " in table and f"{100 * lora['test_acc']:.1f}%" in table
    assert "| bitfit | refused (see below) |" in table and "* **bitfit**: BitFit found no bias" in table
    with (out / "results.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert rows["bitfit"]["refused"].startswith("BitFit found no bias") and rows["lora"]["refused"] == ""
    assert float(rows["lora"]["test_loss_mean"]) == pytest.approx(lora["test_loss"])
