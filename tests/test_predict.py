"""TextClassifierPipeline, ``lightning-peft classify`` and ``export-adapter`` on the real MiniLM.

One LoRA adapter with non-zero weights is built in memory (no training needed), saved as a folder and as an
adapter-only ``.ckpt``; every way of loading it must give the in-memory model's probabilities.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_peft import LoRA, apply_peft, save_adapter
from lightning_peft.cli import cli, record_metadata
from lightning_peft.io import filter_checkpoint
from lightning_peft.predict import TextClassifierPipeline, load_classifier, main, resolve_model_path
from lightning_peft.tasks import SequenceClassifier

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a gripping, beautifully acted film", "a tedious, overlong mess", "fine", "the jokes are stale"]
LABELS = ["negative", "positive"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A SequenceClassifier with a LoRA adapter (random non-zero B), its folder, its .ckpt and reference probs."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    module = SequenceClassifier(model_name_or_path="minilm", labels=LABELS)
    apply_peft(module, LoRA(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.2)
    module.eval()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    with torch.no_grad():
        encoded = tokenizer(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
        probs = module.model(**encoded).logits.softmax(-1)
    tmp = tmp_path_factory.mktemp("adapted")
    folder = save_adapter(module, tmp / "adapter")
    record_metadata(folder, "minilm", LABELS)
    bare = save_adapter(module, tmp / "bare")  # no label names recorded
    checkpoint: dict[str, Any] = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    filter_checkpoint(module, checkpoint)
    ckpt = tmp / "adapter.ckpt"
    torch.save(checkpoint, ckpt)
    return {"probs": probs, "folder": folder, "bare": bare, "ckpt": ckpt, "tmp": tmp}


def _expected(probs: torch.Tensor, labels: list[str] | None = LABELS) -> list[tuple[Any, float]]:
    best, index = probs.max(-1)
    return [(labels[i] if labels else i, p) for p, i in zip(best.tolist(), index.tolist())]


def _check(rows: list[dict[str, Any]], probs: torch.Tensor, labels: list[str] | None = LABELS) -> None:
    assert [r["label"] for r in rows] == [label for label, _ in _expected(probs, labels)]
    assert [r["score"] for r in rows] == pytest.approx([p for _, p in _expected(probs, labels)], abs=1e-5)


def test_pipeline_from_adapter_folder_matches_the_trained_model(adapted: dict[str, Any]) -> None:
    pipeline = TextClassifierPipeline.from_adapter(adapted["folder"], batch_size=3)  # 2 batches
    assert pipeline.labels == LABELS  # recorded with the adapter
    _check(pipeline.predict_texts(TEXTS), adapted["probs"])
    assert pipeline("fine") == pipeline.predict_texts(["fine"])
    assert pipeline.predict_texts([]) == []
    # the adapter changes the predictions: the base model with a fresh head would not give these
    assert not torch.allclose(pipeline.predict_proba(TEXTS), torch.full((4, 2), 0.5), atol=1e-3)


def test_pipeline_from_checkpoint_matches_the_folder(adapted: dict[str, Any]) -> None:
    pipeline = TextClassifierPipeline.from_adapter(adapted["ckpt"])
    assert pipeline.labels == LABELS  # from the checkpoint's hyper-parameters
    _check(pipeline.predict_texts(TEXTS), adapted["probs"])


def test_labels_default_to_the_config_and_can_be_given(adapted: dict[str, Any]) -> None:
    bare = TextClassifierPipeline.from_adapter(adapted["bare"], base_model="minilm")
    _check(bare.predict_texts(TEXTS), adapted["probs"], labels=["LABEL_0", "LABEL_1"])
    named = TextClassifierPipeline.from_adapter(adapted["bare"], base_model="minilm", labels=["neg", "pos"])
    _check(named.predict_texts(TEXTS), adapted["probs"], labels=["neg", "pos"])
    with pytest.raises(ValueError, match=r"labels has 3 names .* 2 classes"):
        TextClassifierPipeline(named.model, named.tokenizer, labels=["a", "b", "c"])


def test_classify_command_jsonl_table_and_file(
    adapted: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--adapter", str(adapted["folder"]), *TEXTS]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == TEXTS
    _check(rows, adapted["probs"])

    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\n".join(TEXTS[:2]) + "\n\n")
    assert (
        cli(["classify", "--adapter", str(adapted["ckpt"]), "--file", str(texts_file), "--format", "table"])
        == 0
    )
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["label", "score", "text"]
    expected = _expected(adapted["probs"][:2])
    for line, text, (label, score) in zip(table[1:], TEXTS[:2], expected):
        assert line.split(None, 2) == [label, f"{score:.4f}", text]

    assert (
        main(["--adapter", str(adapted["bare"]), "--model", "minilm", "--labels", "bad, good", "fine"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["label"] in ("bad", "good")


def test_classify_errors(adapted: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--adapter", str(adapted["folder"])])
    assert "give texts to classify" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--adapter", str(tmp_path / "missing"), "x"])
    assert "neither an adapter folder nor a .ckpt" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="neither an adapter folder nor a .ckpt"):
        load_classifier(tmp_path / "missing")
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(ValueError, match="not an adapter-only checkpoint"):
        load_classifier(plain)
    no_base = tmp_path / "no_base"
    no_base.mkdir()
    config = json.loads((adapted["bare"] / "adapter_config.json").read_text())
    config.pop("base_model_name_or_path", None)
    (no_base / "adapter_config.json").write_text(json.dumps(config))
    (no_base / "adapter_model.safetensors").write_bytes(
        (adapted["bare"] / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="no base model is recorded"):
        load_classifier(no_base)


def test_export_adapter_from_checkpoint(adapted: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    out = adapted["tmp"] / "exported"
    assert cli(["export-adapter", str(adapted["ckpt"]), str(out)]) == 0
    assert "LoRA adapter written to" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["label_names"] == LABELS and config["base_model_name_or_path"]
    pipeline = TextClassifierPipeline.from_adapter(out)
    _check(pipeline.predict_texts(TEXTS), adapted["probs"])
