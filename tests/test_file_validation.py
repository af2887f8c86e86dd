"""Bad values in adapter files: every error names the file, the tensor and expected versus found, and the model
is left exactly as it was. ``adapter_config.json`` is the one source of truth for the configuration."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import MLP, tiny_bert
from safetensors.torch import load_file, save_file

from lightning_peft import BitFit, LoRA, apply_peft, load_adapter, save_adapter
from lightning_peft.core.record import is_attached

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
KEY = "base_model.model.fc1.lora_A.weight"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = MLP()
    apply_peft(model, LoRA(r=2, target_modules=["fc1"]))
    return save_adapter(model, tmp_path / "adapter")


def rewrite(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change the tensors, keeping the header's metadata."""
    from safetensors import safe_open

    path = str(folder / WEIGHTS)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def load_fails(folder: Path, match: str, **kwargs: bool) -> ValueError:
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match) as info:
        load_adapter(model, folder, **kwargs)
    assert not is_attached(model)
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    return info.value


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_refused_by_default_and_allowed_on_request(folder: Path, value: float) -> None:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[KEY][0, 1] = value

    rewrite(folder, poison)
    error = load_fails(folder, "non-finite values")
    assert KEY in str(error) and str(folder / WEIGHTS) in str(error) and "allow_nonfinite=True" in str(error)
    model = MLP()
    load_adapter(model, folder, allow_nonfinite=True)
    (loaded,) = [v for k, v in model.state_dict().items() if "lora_A" in k]
    assert torch.equal(torch.isfinite(loaded), torch.isfinite(load_file(folder / WEIGHTS)[KEY]))


@pytest.mark.parametrize("keep", [0, 4, 20, 200, -8, -1])
def test_truncated_file(folder: Path, keep: int) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[:keep])
    error = load_fails(folder, "truncated|corrupt")
    assert str(folder / WEIGHTS) in str(error)
    if keep < 0:  # header intact, data cut: the message names the tensor whose bytes are missing
        assert "tensor 'base_model.model.fc1.lora_" in str(error) and "needs bytes" in str(error)


def test_wrong_dtype(folder: Path) -> None:
    rewrite(folder, lambda t: t.update({KEY: t[KEY].to(torch.int64)}))
    error = load_fails(folder, "has dtype torch.int64; expected a floating-point tensor")
    assert KEY in str(error) and "torch.float32" in str(error) and str(folder / WEIGHTS) in str(error)


def test_other_float_dtype_is_cast(folder: Path) -> None:
    rewrite(folder, lambda t: t.update({KEY: t[KEY].to(torch.float16)}))
    model = MLP()
    load_adapter(model, folder)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_missing_key(folder: Path) -> None:
    rewrite(folder, lambda t: t.pop(KEY))
    error = load_fails(folder, "is missing")
    assert KEY in str(error) and "expected 2 tensors, found 1" in str(error)


def test_extra_key(folder: Path) -> None:
    rewrite(folder, lambda t: t.update({"base_model.model.fc9.lora_A.weight": torch.zeros(2, 8)}))
    error = load_fails(folder, "does not belong to the attached adapter")
    assert "fc9" in str(error) and str(folder / WEIGHTS) in str(error)


def test_wrong_shape(folder: Path) -> None:
    rewrite(folder, lambda t: t.update({KEY: torch.zeros(3, 8)}))
    error = load_fails(folder, r"has shape \(3, 8\) but the model expects \(2, 8\)")
    assert "fc1.lora_A" in str(error) and str(folder / WEIGHTS) in str(error)


def test_config_not_json(folder: Path) -> None:
    (folder / CONFIG).write_bytes(b"\xff\xfe not json")
    error = load_fails(folder, "not valid JSON")
    assert str(folder / CONFIG) in str(error)


# -- one source of truth ----------------------------------------------------------------------------------
@pytest.fixture
def peft_folder(tmp_path: Path) -> Path:
    """A LoRA folder in HF PEFT's format: PEFT's JSON, our configuration in the safetensors header."""
    model = tiny_bert()
    apply_peft(model, LoRA(r=4, alpha=8, target_modules=["query", "value"]))
    folder = save_adapter(model, tmp_path / "peft")
    assert json.loads((folder / CONFIG).read_text())["peft_type"] == "LORA"
    return folder


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("r", 8),
        ("lora_alpha", 32),
        ("lora_dropout", 0.5),
        ("use_rslora", True),
        ("peft_type", "IA3"),
        ("rank_pattern", {"query": 2}),
        ("alpha_pattern", {"value": 3.0}),
        ("layers_to_transform", [0]),
        ("lora_bias", True),
        ("target_modules", ["query"]),
        ("modules_to_save", ["classifier"]),
        ("exclude_modules", ["value"]),
    ],
)
def test_edited_peft_json_disagreeing_with_the_header_is_an_error(
    peft_folder: Path, field: str, value: object
) -> None:
    config = json.loads((peft_folder / CONFIG).read_text())
    config[field] = value
    (peft_folder / CONFIG).write_text(json.dumps(config))
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=f"field '{field}' is {re.escape(repr(value))} here but .* in the safetensors header"
    ):
        load_adapter(model, peft_folder)
    assert not is_attached(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_peft_json_without_header_metadata_is_read_alone(peft_folder: Path) -> None:
    weights = str(peft_folder / WEIGHTS)
    save_file(load_file(weights), weights)  # as HF PEFT writes it: no lightning-peft metadata
    model = tiny_bert()
    load_adapter(model, peft_folder)
    assert is_attached(model)


def test_our_json_disagreeing_with_the_header_is_an_error(tmp_path: Path) -> None:
    model = MLP()
    apply_peft(
        model, [LoRA(r=2, target_modules=["fc1"]), BitFit(biases="pattern", target_modules=["fc2"])]
    )  # no PEFT equivalent
    folder = save_adapter(model, tmp_path / "ours")
    config = json.loads((folder / CONFIG).read_text())
    config["lightning_peft"]["methods"][0]["r"] = 3
    (folder / CONFIG).write_text(json.dumps(config))
    error = load_fails(folder, r"field 'methods\[0\]\.r' is 3 here but 2 in the safetensors header")
    assert str(folder / CONFIG) in str(error)


def test_nonfinite_checkpoint_refused_by_load_peft_checkpoint_and_the_mixin(tmp_path: Path) -> None:
    from helpers import HFModule

    from lightning_peft import PEFTMixin, load_peft_checkpoint
    from lightning_peft.lightning.checkpoints import filter_checkpoint

    class Module(PEFTMixin, HFModule):
        def __init__(self) -> None:
            super().__init__("bert")
            self.peft_method = LoRA(r=2, target_modules=["query"])

    module = Module()
    module.apply_peft()
    import lightning

    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": {},
        "pytorch-lightning_version": lightning.__version__,
    }
    filter_checkpoint(module, checkpoint)
    key = next(k for k in checkpoint["state_dict"] if k.endswith("lora_B"))
    checkpoint["state_dict"][key] = torch.full_like(checkpoint["state_dict"][key], float("nan"))
    path = tmp_path / "nan.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=f"tensor '{key}' holds non-finite values"):
        load_peft_checkpoint(Module, path)
    with pytest.raises(ValueError, match=f"tensor '{key}' holds non-finite values"):
        Module.load_from_checkpoint(path)
    loaded = load_peft_checkpoint(Module, path, allow_nonfinite=True)
    assert torch.isnan(loaded.state_dict()[key]).all()
