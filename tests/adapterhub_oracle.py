"""The AdapterHub oracle: run by ``.venv-adapterhub/bin/python`` (transformers 4.57.6 + ``adapters`` 1.3.0),
never imported by the test suite itself (which runs on transformers 5).

Usage: ``adapterhub_oracle.py SPEC.json``. The spec holds

* ``"base"``: a folder with a tiny BERT classifier (``save_pretrained``), written here when absent;
* ``"write"``: cases ``{"name", "config": {...}, "folder", "head"}``: an AdapterHub adapter of that configuration (a
  dict as ``adapter_config.json`` holds it, or a config-union list) is added to the base, every adapter weight
  randomised (so that no adapter is an identity), saved with ``model.save_adapter`` and its outputs on
  :data:`INPUT_IDS` (with padding) written to ``folder/outputs.safetensors``; ``"head"``: ``"static"`` saves
  the (randomised) classifier as the adapter's head, ``"flex"`` uses a flexible-head model with a 2-layer head;
* ``"fusion"``: ``{"adapters": [...], "folder"}`` cases: several seq_bn adapters plus an AdapterFusion layer;
* ``"compose"``: ``{"adapters": [...], "config", "block": "stack" | "parallel", "folder"}``: composed adapters;
* ``"read"``: cases ``{"folder", "output"}``: an adapter written by lightning-peft in AdapterHub's layout is
  loaded with ``model.load_adapter`` and its outputs written to ``output``;
* ``"read_fusion"``: ``{"adapters": [folders], "fusion": folder, "output"}``: the same for a fusion.

One process serves a whole test session (importing torch and transformers is most of its cost).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

INPUT_IDS = [[2, 15, 27, 33, 8, 41, 3], [2, 9, 18, 3, 0, 0, 0], [2, 44, 5, 12, 30, 3, 0]]
ATTENTION_MASK = [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]]
CONFIG = dict(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=64,
    num_labels=3,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def build_base(folder: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**CONFIG)).eval()
    model.save_pretrained(str(folder), safe_serialization=True)


def load_base(folder: Path) -> Any:
    import adapters
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(str(folder), attn_implementation="eager").eval()
    adapters.init(model)
    return model


def adapter_config(spec: Any) -> Any:
    from adapters import AdapterConfig, ConfigUnion

    if isinstance(spec, list):
        return ConfigUnion(*(adapter_config(part) for part in spec))
    return AdapterConfig.load(spec if isinstance(spec, str) else dict(spec))


def randomise(model: Any, marker: str, seed: int) -> None:
    """Every adapter tensor gets noise on top of its init (IA3's ones stay near one, LoRA's B stops being 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if marker in name.split("."):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def outputs(model: Any) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(INPUT_IDS),
            attention_mask=torch.tensor(ATTENTION_MASK),
            output_hidden_states=True,
        )
    return {"logits": out.logits.contiguous(), "hidden": out.hidden_states[-1].contiguous()}


def write_case(base: Path, case: dict[str, Any], seed: int) -> None:
    from safetensors.torch import save_file

    name, head = case["name"], case.get("head")
    if head in ("flex", "flex1"):  # a flexible-head model with a 2-layer (1-layer) classification head
        from adapters import AutoAdapterModel

        model = AutoAdapterModel.from_pretrained(str(base), attn_implementation="eager").eval()
        model.add_adapter(name, config=adapter_config(case["config"]))
        model.add_classification_head(
            name, num_labels=CONFIG["num_labels"], layers=1 if head == "flex1" else 2
        )
    else:
        model = load_base(base)
        model.add_adapter(name, config=adapter_config(case["config"]))
    model.set_active_adapters(name)
    randomise(model, name, seed)
    if head == "static":  # the model's own classifier, trained along: saved as the adapter's head
        randomise(model, "classifier", seed + 1)
    folder = Path(case["folder"])
    model.save_adapter(str(folder), name, with_head=head is not None)
    save_file(outputs(model), str(folder / "outputs.safetensors"))


def write_fusion(base: Path, case: dict[str, Any], seed: int) -> None:
    from adapters.composition import Fuse
    from safetensors.torch import save_file

    model = load_base(base)
    names = case["adapters"]
    for name in names:
        model.add_adapter(name, config=adapter_config(case.get("config", {"architecture": "bottleneck"})))
    model.add_adapter_fusion(Fuse(*names), config=case.get("fusion_config", "dynamic"))
    model.set_active_adapters(Fuse(*names))
    for i, name in enumerate(names):
        randomise(model, name, seed + i)
    randomise(model, ",".join(names), seed + 100)
    folder = Path(case["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        model.save_adapter(str(folder / name), name, with_head=False)
    model.save_adapter_fusion(str(folder / "fusion"), names)
    save_file(outputs(model), str(folder / "outputs.safetensors"))


def write_composition(base: Path, case: dict[str, Any], seed: int) -> None:
    """Two adapters composed by a ``Stack`` or a ``Parallel`` block; each adapter saved to ``folder/<name>``."""
    from adapters.composition import Parallel, Stack
    from safetensors.torch import save_file

    model = load_base(base)
    names = case["adapters"]
    for i, name in enumerate(names):
        model.add_adapter(name, config=adapter_config(case["config"]))
        randomise(model, name, seed + i)
    model.set_active_adapters((Stack if case["block"] == "stack" else Parallel)(*names))
    folder = Path(case["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        model.save_adapter(str(folder / name), name, with_head=False)
    save_file(outputs(model), str(folder / "outputs.safetensors"))


def read_case(base: Path, case: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    model = load_base(base)
    name = model.load_adapter(case["folder"], with_head=True)
    model.set_active_adapters(name)
    save_file(outputs(model), case["output"])


def read_fusion(base: Path, case: dict[str, Any]) -> None:
    from adapters.composition import Fuse
    from safetensors.torch import save_file

    model = load_base(base)
    names = [model.load_adapter(folder, with_head=False) for folder in case["adapters"]]
    model.load_adapter_fusion(case["fusion"])
    model.set_active_adapters(Fuse(*names))
    save_file(outputs(model), case["output"])


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    base = Path(spec["base"])
    if not (base / "config.json").is_file():
        build_base(base)
    errors: dict[str, str] = {}
    for i, case in enumerate(spec.get("write", [])):
        try:
            write_case(base, case, seed=100 + i)
        except Exception as error:  # noqa: BLE001 - reported to the test that asked for the case
            errors[case["name"]] = f"{type(error).__name__}: {error}"
    for i, case in enumerate(spec.get("fusion", [])):
        write_fusion(base, case, seed=200 + 10 * i)
    for i, case in enumerate(spec.get("compose", [])):
        write_composition(base, case, seed=300 + 10 * i)
    for case in spec.get("read", []):
        read_case(base, case)
    for case in spec.get("read_fusion", []):
        read_fusion(base, case)
    Path(spec.get("errors", base / "errors.json")).write_text(json.dumps(errors))


if __name__ == "__main__":
    main()
