"""Files from strangers: a checkpoint carrying a pickle payload is refused by every reader, and the payload
never runs; nothing in an adapter's JSON can make the library import or call anything but a method class."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import HFModule, fast_trainer, hf_loader
from test_mixin import LoRAClassifier

from lightning_peft import LoRA, PEFTCallback, load_adapter, load_peft_checkpoint, save_adapter
from lightning_peft.cli import cli
from lightning_peft.files.safe_load import UnsafeFileError
from lightning_peft.methods import method_from_dict

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs ``exec``, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real adapter-only checkpoint written by ``LoRAClassifier`` (mixin) training."""
    tmp = tmp_path_factory.mktemp("good")
    trainer = fast_trainer(tmp, max_steps=1)
    trainer.fit(LoRAClassifier(), hf_loader("bert", n=4))
    trainer.save_checkpoint(tmp / "good.ckpt")
    return tmp / "good.ckpt"


@pytest.fixture
def payload(good_checkpoint: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(checkpoint with a payload in its hyper_parameters, marker file the payload would create)."""
    marker = tmp_path / "PWNED"
    checkpoint = torch.load(good_checkpoint, weights_only=True)  # (the test's own, trusted file)
    checkpoint["hyper_parameters"]["r"] = Payload(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(checkpoint, path)
    assert not marker.exists()
    return path, marker


def check_refused(error: BaseException | str, path: Path) -> None:
    message = str(error)
    assert "refused" in message and "weights_only=True" in message, message
    assert "exec" in message  # names what it would have built
    assert str(path) in message


def test_payload_would_run_if_unpickled(payload: tuple[Path, Path]) -> None:
    """The payload is live: the refusals below are what keeps it from running."""
    path, marker = payload
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_good_checkpoint_still_loads(good_checkpoint: Path) -> None:
    model = load_peft_checkpoint(LoRAClassifier, good_checkpoint)
    assert model.hparams.r == 4
    assert LoRAClassifier.load_from_checkpoint(good_checkpoint).hparams.r == 4


def test_load_peft_checkpoint_refuses(payload: tuple[Path, Path]) -> None:
    path, marker = payload
    with pytest.raises(UnsafeFileError) as info:
        load_peft_checkpoint(LoRAClassifier, path)
    check_refused(info.value, path)
    assert not marker.exists()


def test_mixin_load_from_checkpoint_refuses(payload: tuple[Path, Path]) -> None:
    path, marker = payload
    with pytest.raises(UnsafeFileError) as info:
        LoRAClassifier.load_from_checkpoint(path)
    check_refused(info.value, path)
    assert not marker.exists()


def test_classify_pipeline_refuses(payload: tuple[Path, Path]) -> None:
    from lightning_peft.inference.pipeline import TextClassifierPipeline

    path, marker = payload
    with pytest.raises(UnsafeFileError) as info:
        TextClassifierPipeline.from_adapter(path, base_model="minilm")
    check_refused(info.value, path)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["classify", "export-adapter"])
def test_cli_commands_refuse(command: str, payload: tuple[Path, Path], tmp_path: Path, capsys: Any) -> None:
    path, marker = payload
    args = (
        ["--adapter", str(path), "some text"] if command == "classify" else [str(path), str(tmp_path / "out")]
    )
    with pytest.raises(SystemExit) as info:
        cli([command, *args])
    assert info.value.code == 2
    check_refused(capsys.readouterr().err.replace("\n", " "), path)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_lightning_cli_ckpt_path_refuses(payload: tuple[Path, Path], tmp_path: Path, monkeypatch) -> None:
    """``lightning-peft predict|validate|fit --ckpt_path evil.ckpt``: Lightning reads it, with our allowlist."""
    path, marker = payload
    monkeypatch.setattr(sys, "argv", ["lightning-peft"])
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    args = [
        "--model", "test_mixin.LoRAClassifier",
        "--data", "helpers.TinyBertData",
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--ckpt_path", str(path),
    ]  # fmt: skip
    for subcommand in ("predict", "validate"):
        with pytest.raises(UnsafeFileError) as info:
            cli([subcommand, *args])
        check_refused(info.value, path)
    assert not marker.exists()


# -- adapter folders: JSON builds only registered method classes ------------------------------------------
def saved_folder(tmp_path: Path) -> Path:
    from helpers import tiny_bert

    from lightning_peft import apply_peft

    model = tiny_bert()
    apply_peft(model, LoRA(r=2, target_modules=["query"]))
    return save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize(
    "method",
    [
        {"method": "os.system", "r": 1},
        {"method": "builtins.exec"},
        {"method": {"class_path": "os.system"}},
        ["lora"],
        {"method": "lora", "r": 2, "__class__": "os.system"},
        {"method": "lora", "class_path": "subprocess.Popen", "init_args": {"args": ["touch", "x"]}},
    ],
)
def test_method_from_dict_builds_only_registered_classes(method: Any) -> None:
    with pytest.raises(ValueError, match="method must be one of|unknown field|must be a JSON object"):
        method_from_dict(method)


def test_adapter_json_naming_a_callable_is_refused(tmp_path: Path) -> None:
    from helpers import tiny_bert

    folder = saved_folder(tmp_path)
    config = {
        "lightning_peft": {"format_version": 1, "methods": [{"method": "os.system", "command": "touch x"}]}
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="method must be one of"):
        load_adapter(model, folder)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_callback_checkpoint_refused_by_trainer_resume(payload: tuple[Path, Path], tmp_path: Path) -> None:
    """``trainer.fit(ckpt_path=...)`` with PEFTCallback: Lightning's own torch.load(weights_only=True) refuses."""
    path, marker = payload
    trainer = fast_trainer(tmp_path, max_steps=1, callbacks=[PEFTCallback(LoRA(r=4))])
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        trainer.fit(HFModule(), hf_loader("bert", n=4), ckpt_path=path)
    assert not marker.exists()


def test_reading_keeps_the_method_classes_registered(good_checkpoint: Path) -> None:
    """torch's safe_globals context removes its globals on exit: the readers must not unregister ours."""
    before = set(map(id, torch.serialization.get_safe_globals()))
    load_peft_checkpoint(LoRAClassifier, good_checkpoint)
    LoRAClassifier.load_from_checkpoint(good_checkpoint)
    assert set(map(id, torch.serialization.get_safe_globals())) == before
    assert LoRA in torch.serialization.get_safe_globals()


def test_a_file_cannot_make_loading_fetch_a_tokenizer(tmp_path: Path) -> None:
    """A prompt-tuning file naming a text initialisation (and so a tokenizer to load) is read with a random
    initialisation instead: the file provides the values, and nothing it names is loaded."""
    from helpers import tiny_gpt2
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lightning_peft import PromptTuning, apply_peft
    from lightning_peft.core.record import attached_methods

    model = tiny_gpt2()
    apply_peft(model, PromptTuning(num_virtual_tokens=3))
    folder = save_adapter(model, tmp_path / "prompt")
    weights = str(folder / "adapter_model.safetensors")
    with safe_open(weights, "pt") as handle:
        metadata = handle.metadata()
    meta = json.loads(metadata["lightning_peft"])
    meta["methods"][0].update(init="text", init_text="hello", tokenizer_name_or_path=str(tmp_path / "evil"))
    metadata["lightning_peft"] = json.dumps(meta)
    save_file(load_file(weights), weights, metadata=metadata)
    fresh = tiny_gpt2()
    load_adapter(fresh, folder)  # would raise "could not be loaded as a tokenizer" if it tried
    (method,) = attached_methods(fresh)
    assert method.init == "random" and method.tokenizer_name_or_path is None
