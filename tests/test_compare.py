"""``lightning-peft compare``: run configs, aggregation over seeds, and a tiny end-to-end run with resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from helpers import SST2_DIR

from lightning_peft.cli import main as cli_main
from lightning_peft.compare import PRESETS, method_entry, run_config, spec_hash
from lightning_peft.compare_report import aggregate, label_offsets, markdown, mean_std

ROOT = Path(__file__).resolve().parents[1]
LORA_YAML = ROOT / "examples" / "configs" / "sst2_lora.yaml"


def result(method: str, seed: int, val: float, test: float) -> dict:
    return {
        "method": method,
        "seed": seed,
        "lr": 1e-3,
        "trainable": 74_498,
        "trainable_pct": 0.33,
        "val_acc": val,
        "test_acc": test,
        "steps": 10,
        "step_ms": 100.0,
        "train_seconds": 1.0,
        "peak_memory_mib": 500.0,
        "adapter_bytes": 300_000,
        "latency_unmerged_ms": 10.0,
        "latency_merged_ms": None,
    }


def test_mean_and_sample_std_over_seeds() -> None:
    rows = aggregate([result("lora", s, v, 0.8) for s, v in ((0, 0.80), (1, 0.82), (2, 0.84))])
    assert len(rows) == 1
    assert rows[0]["val_acc_mean"] == pytest.approx(0.82)
    assert rows[0]["val_acc_std"] == pytest.approx(0.02)  # sample std of 80, 82, 84
    assert rows[0]["latency_merged_ms_mean"] is None
    table = markdown(rows)
    assert "| lora | 74,498 | 0.33% | 82.0% ± 2.0 | 80.0% ± 0.0 |" in table
    assert mean_std([0.5]) == (0.5, None)


def test_plot_labels_of_coinciding_points_do_not_overlap() -> None:
    # LoRA and DoRA often land on the same spot; a third point far away keeps its usual place
    offsets = label_offsets(
        [(100.0, 50.0), (101.0, 50.5), (102.0, 49.0), (300.0, 50.0)], ["lora", "dora", "ia3", "full"]
    )
    assert offsets[0] == offsets[3] == 4.0
    assert len({offsets[0], offsets[1], offsets[2]}) == 3
    label_y = [y + dy for (_, y), dy in zip([(0, 50.0), (0, 50.5), (0, 49.0)], offsets[:3], strict=True)]
    assert min(abs(a - b) for i, a in enumerate(label_y) for b in label_y[i + 1 :]) >= 9.0


def test_run_config_swaps_the_method_and_drops_checkpointing(tmp_path: Path) -> None:
    base = yaml.safe_load(LORA_YAML.read_text())
    method, lr = method_entry("dora", base, {})
    config = run_config(base, method, lr, seed=3, output=tmp_path, label="dora")
    paths = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert not any("ModelCheckpoint" in p for p in paths)
    peft = [c for c in config["trainer"]["callbacks"] if c["class_path"] == "lightning_peft.PEFTCallback"]
    assert len(peft) == 1
    dora = peft[0]["init_args"]["method"]
    assert dora["class_path"] == "lightning_peft.DoRA"
    # the recipe's head and targets carry over to the LoRA-like methods
    assert dora["init_args"]["modules_to_save"] == ["classifier"]
    assert dora["init_args"]["target_modules"] == ["query", "value"]
    assert config["seed_everything"] == 3 and config["trainer"]["enable_checkpointing"] is False
    assert config["model"]["init_args"]["lr"] == lr
    full, full_lr = method_entry("full", base, {"full": 3e-5})
    assert full is None and full_lr == 3e-5
    # a YAML file as a method: its PEFTCallback method and its model's lr
    ia3, ia3_lr = method_entry(str(ROOT / "examples" / "configs" / "sst2_ia3.yaml"), base, {})
    assert ia3["class_path"] == "lightning_peft.IA3" and ia3_lr == pytest.approx(3e-2)


@pytest.mark.slow
@pytest.mark.skipif(not SST2_DIR.is_dir(), reason="needs ../shared/data/sst2")
def test_compare_runs_resumes_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)  # the YAML reads ../shared/data relative to the working directory
    monkeypatch.setattr(sys, "argv", ["lightning-peft"])
    tiny = [
        "trainer.max_epochs=1",
        "trainer.max_steps=2",
        "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "data.init_args.train_size=8",
        "data.init_args.val_size=8",
        "data.init_args.batch_size=4",
        "data.init_args.max_length=32",
    ]
    argv = ["compare", "--config", str(LORA_YAML), "--methods", "full", "lora", "--output", str(tmp_path)]
    argv += ["--latency-repeats", "1", "--set", *tiny]
    assert cli_main(argv) == 0
    first = capsys.readouterr().out
    assert "[1/2] full seed 0: training" in first and "[2/2] lora seed 0: val" in first
    runs = {p.name: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*-seed0.json")}
    assert set(runs) == {"full-seed0.json", "lora-seed0.json"}
    lora, full = runs["lora-seed0.json"], runs["full-seed0.json"]
    assert lora["trainable"] == 74_498 and full["trainable"] == full["total"]
    assert lora["steps"] == 2 and 0.0 <= lora["val_acc"] <= 1.0 and 0.0 <= lora["test_acc"] <= 1.0
    assert lora["adapter_bytes"] < 1_000_000 < full["adapter_bytes"]
    assert lora["latency_merged_ms"] is not None and lora["step_ms"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| full |" in table and "| lora | 74,498 |" in table
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header.startswith("method,seeds,trainable,trainable_pct")
    pytest.importorskip("matplotlib")
    assert (tmp_path / "accuracy_vs_params.png").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_time.png").stat().st_size > 0

    # the same command again (as after an interruption): finished runs are kept, not trained again
    (tmp_path / "results.md").unlink()
    assert cli_main(argv) == 0
    second = capsys.readouterr().out
    assert "[1/2] full seed 0: kept" in second and "[2/2] lora seed 0: kept" in second
    assert "training" not in second and (tmp_path / "results.md").read_text() == table


def test_a_run_is_kept_only_for_the_same_configuration(tmp_path: Path) -> None:
    base = yaml.safe_load(LORA_YAML.read_text())
    method, lr = method_entry("lora", base, {})
    here = run_config(base, method, lr, seed=0, output=tmp_path / "a", label="lora")
    elsewhere = run_config(base, method, lr, seed=0, output=tmp_path / "b", label="lora")
    assert spec_hash(here) == spec_hash(elsewhere)  # the output folder does not change what is trained
    assert spec_hash(here) != spec_hash(run_config(base, method, 2 * lr, 0, tmp_path, "lora"))
    assert spec_hash(here) != spec_hash(run_config(base, method, lr, 1, tmp_path, "lora"))


@pytest.mark.parametrize(
    ("preset", "config"),
    [
        ("full", "sst2_full_finetune.yaml"),
        ("lora", "sst2_lora.yaml"),
        ("dora", "sst2_dora.yaml"),
        ("ia3", "sst2_ia3.yaml"),
        ("adapter", "sst2_adapter_pfeiffer.yaml"),
        ("houlsby", "sst2_adapter_houlsby.yaml"),
        ("prefix", "sst2_prefix.yaml"),
        ("prompt", "sst2_prompt.yaml"),
        ("bitfit", "sst2_bitfit.yaml"),
    ],
)
def test_presets_use_the_learning_rates_of_the_example_configs(preset: str, config: str) -> None:
    # the sweep's winners live in two places; `compare` must train what `fit --config` trains
    path = Path(__file__).parents[1] / "examples" / "configs" / config
    yaml_lr = float(yaml.safe_load(path.read_text())["model"]["init_args"]["lr"])
    assert PRESETS[preset][2] == pytest.approx(yaml_lr)
