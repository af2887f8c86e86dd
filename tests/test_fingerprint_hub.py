"""The base-model fingerprint every saved adapter records, and loading adapters from the Hub (offline, from a
Hub cache made on disk)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODELS, HFModule, model_output, tiny_batch, tiny_encoder
from safetensors import safe_open
from torch import nn

import lightning_peft
from lightning_peft import BitFit, LoRA, apply_peft, load_adapter, save_adapter
from lightning_peft.core.record import is_attached


def tiny_bert_variant(
    cls_name: str = "BertForSequenceClassification", hidden: int = 32, labels: int = 2
) -> nn.Module:
    return tiny_encoder(cls_name, hidden_size=hidden, num_labels=labels)


def saved(folder: Path, method: object, model: nn.Module | None = None) -> nn.Module:
    model = model if model is not None else TINY_MODELS["bert"]()
    apply_peft(model, method)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1)
    save_adapter(model, folder)
    return model


def header_meta(folder: Path) -> dict:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return json.loads(f.metadata()["lightning_peft"])


def test_every_saved_adapter_records_version_and_base(tmp_path: Path) -> None:
    saved(tmp_path / "lora", LoRA(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    meta = header_meta(tmp_path / "lora")  # the JSON is HF PEFT's own, so the record is in the header
    assert "lightning_peft" not in json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert meta["library_version"] == lightning_peft.__version__
    assert meta["base_fingerprint"] == {
        "architecture": "BertForSequenceClassification",
        "targets": {f"bert.encoder.layer.{i}.attention.self.query": [32, 32] for i in range(2)},
        "tensors": {"classifier.weight": [2, 32], "classifier.bias": [2]},
    }
    saved(tmp_path / "bitfit", BitFit(biases="attention"))  # no HF PEFT equivalent: the record is in our JSON
    record = json.loads((tmp_path / "bitfit" / "adapter_config.json").read_text())["lightning_peft"]
    assert record["base_fingerprint"]["architecture"] == "BertForSequenceClassification"
    assert (
        record["base_fingerprint"]["targets"] == {}
        and "bert.encoder.layer.0.attention.self.query.bias" in record["base_fingerprint"]["tensors"]
    )


def test_a_different_base_is_refused_unless_allowed(tmp_path: Path) -> None:
    saved(tmp_path, LoRA(r=2, target_modules=["query", "value"]))
    other = tiny_bert_variant("BertForTokenClassification")  # same layers and shapes, another head
    other.bert.load_state_dict(TINY_MODELS["bert"]().bert.state_dict(), strict=False)  # it has no pooler
    with pytest.raises(
        ValueError,
        match="different base model .*architecture BertForSequenceClassification != "
        "BertForTokenClassification.*allow_base_mismatch=True",
    ):
        load_adapter(other, tmp_path)
    assert not is_attached(other)
    load_adapter(other, tmp_path, allow_base_mismatch=True)
    reference = load_adapter(TINY_MODELS["bert"](), tmp_path)
    batch = {"input_ids": tiny_batch("bert")["input_ids"]}
    with torch.no_grad():
        torch.testing.assert_close(
            other.bert(**batch).last_hidden_state, reference.bert(**batch).last_hidden_state
        )

    wider = tiny_bert_variant(hidden=48)
    with pytest.raises(
        ValueError,
        match=r"target 'bert.encoder.layer.0.attention.self.query' has shape \[48, 48\], "
        r"not \[32, 32\]",
    ):
        load_adapter(wider, tmp_path)


def test_a_different_head_size_is_a_difference(tmp_path: Path) -> None:
    saved(tmp_path, LoRA(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match=r"tensor 'classifier.weight' has shape \[3, 32\], not \[2, 32\]"):
        load_adapter(tiny_bert_variant(labels=3), tmp_path)


def test_one_of_several_named_adapters_records_the_bare_base(tmp_path: Path) -> None:
    from lightning_peft import add_adapter

    model = TINY_MODELS["bert"]()
    apply_peft(model, LoRA(r=2, target_modules=["query"]))
    add_adapter(
        model, LoRA(r=3, target_modules=["query", "value"]), "other"
    )  # stacked on the same query layers
    save_adapter(model, tmp_path, adapter_name="other")
    targets = header_meta(tmp_path)["base_fingerprint"]["targets"]
    assert targets and all(shape == [32, 32] for shape in targets.values())
    load_adapter(TINY_MODELS["bert"](), tmp_path)  # the same base: no mismatch


def test_the_fingerprint_ignores_the_lightning_module_around_the_model(tmp_path: Path) -> None:
    module = HFModule("bert")
    saved(tmp_path, LoRA(r=2, target_modules=["query"], modules_to_save=["classifier"]), module)
    bare = load_adapter(TINY_MODELS["bert"](), tmp_path)  # the record is relative to the transformers model
    batch = tiny_batch("bert")
    torch.testing.assert_close(model_output(bare, batch), model_output(module.model.eval(), batch))


def test_target_shapes_are_logical_for_packed_quantised_weights() -> None:
    from lightning_peft.files.fingerprint import target_shape

    layer = nn.Linear(8, 6)
    assert target_shape(layer) == [6, 8]
    layer.weight = nn.Parameter(
        torch.zeros(24, 1, dtype=torch.uint8), requires_grad=False
    )  # packed 4-bit storage
    assert target_shape(layer) == [6, 8]


def test_the_architecture_is_seen_through_fsdp2_s_subclass() -> None:
    from lightning_peft.files.fingerprint import architecture

    model = TINY_MODELS["bert"]()
    # fully_shard() swaps the class for a dynamic FSDP<Class>(FSDPModule, Class) subclass
    marker = type("FSDPModule", (), {})
    model.__class__ = type("FSDPBertForSequenceClassification", (marker, type(model)), {})
    assert architecture(model) == "BertForSequenceClassification"


def test_a_qlora_adapter_loads_onto_the_full_precision_base(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from helpers import tiny_bert
    from transformers import BertForSequenceClassification, BitsAndBytesConfig

    tiny_bert().save_pretrained(tmp_path / "base")
    quantised = BertForSequenceClassification.from_pretrained(
        tmp_path / "base",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier"]
        ),
        device_map="cpu",
    )
    assert quantised.bert.encoder.layer[0].attention.self.query.weight.shape != (32, 32)  # packed
    saved(tmp_path / "adapter", LoRA(r=2, target_modules=["query"]), quantised)
    full = load_adapter(
        BertForSequenceClassification.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
    assert type(full.bert.encoder.layer[0].attention.self.query).__name__ == "LoRALinear"


# -- the Hub ------------------------------------------------------------------------------------------------
REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, source: Path, subfolder: str = "") -> Path:
    """The Hub cache layout: models--org--name/{refs/main, snapshots/<revision>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION / subfolder
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (snapshot / name).write_bytes((source / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return root


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_load_adapter_from_a_hub_id_uses_the_cache_offline(tmp_path: Path, offline_cache: Path) -> None:
    model = saved(tmp_path / "adapter", LoRA(r=2, target_modules=["query", "value"]))
    hub_cache(offline_cache, "some-org/tiny-lora", tmp_path / "adapter")
    hub_cache(offline_cache, "some-org/many", tmp_path / "adapter", subfolder="task_a")
    batch = tiny_batch("bert")
    loaded = load_adapter(TINY_MODELS["bert"](), "some-org/tiny-lora")
    torch.testing.assert_close(model_output(loaded, batch), model_output(model, batch), atol=0, rtol=0)
    nested = load_adapter(TINY_MODELS["bert"](), "some-org/many/task_a")
    torch.testing.assert_close(model_output(nested, batch), model_output(model, batch), atol=0, rtol=0)


def test_a_missing_hub_adapter_is_a_clear_error(offline_cache: Path) -> None:
    model = TINY_MODELS["bert"]()
    with pytest.raises(FileNotFoundError, match="'some-org/absent' was not found in the local Hub cache"):
        load_adapter(model, "some-org/absent")
    with pytest.raises(FileNotFoundError, match="is neither an adapter folder nor a .ckpt file"):
        load_adapter(model, "no-such-folder")
    assert not is_attached(model)
