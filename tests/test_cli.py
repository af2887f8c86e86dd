"""The ``lightning-peft`` console script (LightningCLI) on every example config, with the real MiniLM and SST-2.

Runs are short (one epoch of two batches of 4 sentences) and in-process; the console script itself and a
user's own LightningCLI script run once each as subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_peft.cli import cli
from lightning_peft.cli.lightning_cli import PEFTLightningCLI, prediction_rows
from lightning_peft.inference.labels import label_names
from lightning_peft.methods.registry import _REGISTRY
from lightning_peft.ops.parameters import trainable_parameter_names

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
SST2 = ROOT.parent / "shared" / "data" / "sst2"
METHOD_CONFIGS = ["lora", "dora", "adapter_houlsby", "adapter_pfeiffer", "prefix", "prompt", "bitfit", "ia3"]
ALL_CONFIGS = [*METHOD_CONFIGS, "full_finetune"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SST2.is_dir(), reason="needs ../shared/data/sst2"),
]


@pytest.fixture(autouse=True)
def repo_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # the configs read ../shared/data relative to the working directory
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # LightningCLI warns when given args while sys.argv holds pytest's own
    monkeypatch.setattr(sys, "argv", ["lightning-peft"])


def short(tmp_path: Path, *extra: str) -> list[str]:
    """Overrides that turn a recipe into a two-step run writing under ``tmp_path``."""
    return [
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.limit_predict_batches",
        "1",
        "--trainer.limit_test_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--data.train_size",
        "8",
        "--data.batch_size",
        "4",
        "--data.max_length",
        "32",
        *extra,
    ]


def run(*args: str) -> PEFTLightningCLI:
    result = cli(list(args))
    assert isinstance(result, PEFTLightningCLI)
    return result


def frozen_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    trainable = set(trainable_parameter_names(module))
    return {n: p.detach().clone() for n, p in module.named_parameters() if n not in trainable}


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_fit_validate_predict(name: str, tmp_path: Path) -> None:
    config = str(CONFIGS / f"sst2_{name}.yaml")
    fitted = run("fit", "--config", config, *short(tmp_path))
    log_dir = Path(fitted.trainer.log_dir)
    fit_val_loss = float(fitted.trainer.callback_metrics["val_loss"])
    last = log_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert (log_dir / "config.yaml").is_file()
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    if name == "full_finetune":
        assert not (log_dir / "adapter").exists()
        assert "lightning_peft" not in checkpoint
    else:
        trainable = set(trainable_parameter_names(fitted.model))
        assert trainable and set(checkpoint["state_dict"]) == trainable  # adapter-only checkpoint
        assert (log_dir / "adapter" / "adapter_model.safetensors").is_file()
        assert any(n.startswith("model.classifier.") for n in trainable)  # modules_to_save: [classifier]

    # a fresh process-like run restores the weights from the checkpoint: same validation loss
    validated = run("validate", "--config", config, *short(tmp_path), "--ckpt_path", str(last))
    assert float(validated.trainer.callback_metrics["val_loss"]) == pytest.approx(fit_val_loss, abs=1e-5)

    if name == "lora":  # the test subcommand takes the same path as validate; once is enough
        tested = run("test", "--config", config, *short(tmp_path), "--ckpt_path", str(last))
        assert 0.0 <= float(tested.trainer.callback_metrics["test_acc"]) <= 1.0

    predicted = run("predict", "--config", config, *short(tmp_path), "--ckpt_path", str(last))
    lines = (Path(predicted.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 4
    assert all(r["label"] in ("negative", "positive") and 0.5 <= r["score"] <= 1.0 for r in rows)


def test_print_config_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(CONFIGS / "sst2_lora.yaml")
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    parsed = yaml.safe_load(printed)
    method = parsed["trainer"]["callbacks"][0]["init_args"]["method"]
    assert method["class_path"] == "lightning_peft.LoRA"
    assert method["init_args"]["target_modules"] == ["query", "value"]
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    # printing the printed config gives the same config back, and it runs unchanged
    with pytest.raises(SystemExit):
        cli(["fit", "--config", str(saved), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == parsed
    fitted = run("fit", "--config", str(saved), *short(tmp_path))
    assert (Path(fitted.trainer.log_dir) / "adapter" / "adapter_config.json").is_file()


def test_misspelled_method_field_is_a_parse_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (CONFIGS / "sst2_lora.yaml").read_text().replace("            r: 8\n", "            rank: 8\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--config", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'rank'" in err and "lightning_peft.LoRA" in err


def test_invalid_method_value_names_the_argument(tmp_path: Path) -> None:
    text = (CONFIGS / "sst2_lora.yaml").read_text().replace("            r: 8\n", "            r: 0\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises((ValueError, SystemExit), match="r must be a positive integer, got 0"):
        cli(["fit", "--config", str(bad)])


def _option_help(text: str, option: str) -> str:
    """The help text printed for ``option`` (up to the next option), without the type/default part."""
    match = re.search(rf"^\s+{re.escape(option)}\b.*?(?=^\s+--|\Z)", text, re.S | re.M)
    assert match, f"{option} is missing from --help"
    body = match.group(0).split("\n", 1)[1] if "\n" in match.group(0) else ""
    first_line = match.group(0).splitlines()[0]
    inline = first_line.split(None, 2)[2] if len(first_line.split(None, 2)) > 2 else ""
    return re.sub(r"\((type|required).*", "", " ".join((inline + " " + body).split()), flags=re.S).strip()


@pytest.mark.parametrize("method", sorted(_REGISTRY))
def test_help_documents_every_method_field(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    cls = _REGISTRY[method]
    class_path = f"lightning_peft.{cls.__name__}"
    with pytest.raises(SystemExit):
        cli(
            [
                "fit",
                "--trainer.callbacks",
                "lightning_peft.PEFTCallback",
                "--trainer.callbacks.method.help",
                class_path,
            ]
        )
    text = capsys.readouterr().out
    assert f"Help for --method.help={class_path}" in text
    for field in dataclasses.fields(cls):
        assert _option_help(text, f"--method.{field.name}"), f"{cls.__name__}.{field.name} has no help text"


def test_cli_optimizer_and_scheduler_train_the_adapter_only(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from lightning_peft.inference.rebuild import resolve_model_path

    config = str(CONFIGS / "sst2_lora.yaml")
    # the optimizer from the command line, the scheduler from YAML: LightningCLI merges both routes
    scheduler = tmp_path / "scheduler.yaml"
    scheduler.write_text(
        "lr_scheduler:\n  class_path: torch.optim.lr_scheduler.StepLR\n  init_args: {step_size: 1, gamma: 0.5}\n"
    )
    extra = ["--optimizer", "torch.optim.AdamW", "--optimizer.lr", "0.01", "--config", str(scheduler)]
    fitted = run("fit", "--config", config, *short(tmp_path, *extra))
    model = fitted.model
    optimizer = fitted.trainer.optimizers[0]
    assert type(optimizer).__name__ == "AdamW"
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = dict(model.named_parameters())
    assert held == {id(params[n]) for n in trainable_parameter_names(model)}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)  # StepLR stepped once (1 epoch)
    # adapters trained, frozen weights bit-identical to the pretrained model
    lora_b = [p for n, p in params.items() if n.endswith("lora_B")]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=2)
    reference = dict(base.named_parameters())
    frozen = frozen_snapshot(model)
    assert len(frozen) >= len(reference) - 2  # everything but the classifier head
    for name, value in frozen.items():
        key = name.removeprefix("model.").replace(".base_layer.", ".")
        assert torch.equal(value, reference[key]), name


def test_label_names_and_prediction_rows() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    small = dict(
        vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    )
    named = BertForSequenceClassification(BertConfig(**small, id2label={0: "neg", 1: "pos"}))
    assert label_names(named) == ["neg", "pos"]
    assert label_names(BertForSequenceClassification(BertConfig(**small))) is None
    probs = [torch.tensor([[0.2, 0.8], [0.9, 0.1]])]
    assert prediction_rows(probs, ["neg", "pos"]) == [
        {"label": "pos", "score": pytest.approx(0.8)},
        {"label": "neg", "score": pytest.approx(0.9)},
    ]
    logits = [torch.tensor([[0.0, 2.0]])]  # not probabilities: softmax first
    assert prediction_rows(logits)[0]["score"] == pytest.approx(torch.tensor([0.0, 2.0]).softmax(0)[1].item())
    # without names a class is transformers' LABEL_<i>, as in TextClassifierPipeline and classify
    assert prediction_rows(logits)[0]["label"] == "LABEL_1"
    assert prediction_rows(probs, ["neg"])[0]["label"] == "LABEL_1"  # too few names: the same placeholder
    with pytest.raises(TypeError, match=r"\(batch, classes\)"):
        prediction_rows([torch.zeros(3)])


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``command`` offline in ``cwd`` (with the repository importable); fail with its stderr."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_console_script_fit_then_classify_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # outside a checkout the data sets are found through LIGHTNING_PEFT_DATA (the default is relative to the cwd)
    monkeypatch.setenv("LIGHTNING_PEFT_DATA", str(ROOT.parent / "shared" / "data"))
    script = Path(sys.executable).parent / "lightning-peft"
    if not script.is_file():
        pytest.skip("the lightning-peft console script is not installed (pip install -e .)")
    config = str(CONFIGS / "sst2_lora.yaml")
    # cwd: the logger's save_dir "runs" is relative to it
    _run([str(script), "fit", "--config", config, *short(tmp_path)[2:]], cwd=tmp_path)
    adapters = list((tmp_path / "runs" / "sst2_lora").glob("version_*/adapter"))
    assert len(adapters) == 1
    classify = _run(
        [str(script), "classify", "--adapter", str(adapters[0]), "a moving film", "a dull film"], tmp_path
    )
    rows = [json.loads(line) for line in classify.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["a moving film", "a dull film"]
    assert all(r["label"] in ("negative", "positive") and 0.5 <= r["score"] <= 1 for r in rows)


USER_SCRIPT = '''
"""A user's own LightningCLI script: it never imports lightning_peft; the YAML names the callback."""
import json
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification


class TinyClassifier(pl.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        config = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=2)
        self.model = BertForSequenceClassification(config)

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, 50, (16, 8), generator=g)
        return DataLoader(TensorDataset(ids, ids[:, 0] % 2), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


if __name__ == "__main__":
    torch.manual_seed(0)
    start = {n: p.detach().clone() for n, p in TinyClassifier().named_parameters()}
    cli = LightningCLI(TinyClassifier)
    if cli.subcommand == "fit":
        changed = sorted(n for n, p in cli.model.named_parameters()
                         if n.replace(".base_layer", "") not in start
                         or not torch.equal(p, start[n.replace(".base_layer", "")]))
        trainable = sorted(n for n, p in cli.model.named_parameters() if p.requires_grad)
        print("RESULT " + json.dumps({"changed": changed, "trainable": trainable}))
'''

USER_CONFIG = """
trainer:
  max_epochs: 1
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_peft.PEFTCallback
      init_args:
        method:
          - class_path: lightning_peft.LoRA
            init_args: {r: 2, target_modules: [query, value], modules_to_save: [classifier]}
model:
  hidden: 32
"""


def test_user_lightning_cli_script_with_peft_callback_in_yaml(tmp_path: Path) -> None:
    (tmp_path / "user_cli.py").write_text(USER_SCRIPT)
    (tmp_path / "peft.yaml").write_text(USER_CONFIG)
    done = _run([sys.executable, "user_cli.py", "fit", "--config", "peft.yaml"], tmp_path)
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    expected = {
        f"model.bert.encoder.layer.{i}.attention.self.{proj}.{ab}"
        for i in range(2)
        for proj in ("query", "value")
        for ab in ("lora_A", "lora_B")
    } | {"model.classifier.weight", "model.classifier.bias"}
    assert set(result["trainable"]) == expected
    # new LoRA tensors count as "changed" (absent at start); every other change must be trainable
    assert set(result["changed"]) <= expected
    assert {n for n in result["changed"] if "lora_B" in n or "classifier" in n} == {
        n for n in expected if "lora_B" in n or "classifier" in n
    }


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_causal_lm_example_steers_generation(method: str) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import causal_lm_prompt_tuning as example
    finally:
        sys.path.remove(str(ROOT / "examples"))
    results = example.main(["--method", method])
    target = results["target"]
    # the frozen model picked the other verdict for most subjects; the learned prompt/prefix flips them
    assert sum(not text.endswith(f"{target}.") for text in results["base"].values()) >= 2
    for subject in example.TUNED_SUBJECTS:
        assert results["tuned"][subject] == example.sentence(subject, target)
