"""AdapterHub's adapter folders, against AdapterHub's own library (``adapters`` 1.3.0 on transformers 4.57.6).

The oracle runs in its own venv (``.venv-adapterhub``, built by ``make test``): one subprocess per test
session (tests/adapterhub_oracle.py) builds a tiny seeded BERT classifier, adds every configuration below with
randomised weights (no adapter is an identity), saves it with ``save_adapter`` and writes its outputs on padded
inputs. Here (transformers 5) the same base loads each folder with ``lightning_peft.load_adapter`` and must give
the same logits and last hidden states to 1e-5, or refuse naming the option, leaving the model untouched.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import lightning_peft as lp
from lightning_peft.core.record import is_attached
from lightning_peft.files.adapterhub import AdapterHubOptionError
from lightning_peft.files.reader import read_methods
from lightning_peft.files.safe_load import UnsafeFileError
from lightning_peft.ops.composition import Stack, set_composition
from lightning_peft.ops.named_adapters import set_adapter

ROOT = Path(__file__).resolve().parents[1]
ORACLE_PYTHON = ROOT / ".venv-adapterhub" / "bin" / "python"
ORACLE = Path(__file__).resolve().parent / "adapterhub_oracle.py"
INPUT_IDS = [[2, 15, 27, 33, 8, 41, 3], [2, 9, 18, 3, 0, 0, 0], [2, 44, 5, 12, 30, 3, 0]]
ATTENTION_MASK = [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]]

#: configurations that load with AdapterHub's outputs (AdapterHub's config strings)
LOADS = {
    "seq_bn": "seq_bn[reduction_factor=4]",
    "double_seq_bn": "double_seq_bn[reduction_factor=4]",
    "par_bn": "par_bn[reduction_factor=4]",
    "scaled_par_bn": "scaled_par_bn[reduction_factor=4]",
    "seq_bn_options": "seq_bn[reduction_factor=4,ln_before=True,ln_after=True,residual_before_ln=False,"
    "non_linearity='gelu',leave_out=[1],mh_adapter=True]",
    "seq_bn_post_add": "seq_bn[reduction_factor=8,residual_before_ln='post_add',adapter_residual_before_ln=True,"
    "ln_after=True,scaling=0.5]",
    "channel_scaled": "double_seq_bn[reduction_factor=4,scaling='channel']",
    "lora": "lora[r=4,alpha=8,attn_matrices=['q','k','v'],intermediate_lora=True,output_lora=True,leave_out=[0]]",
    "ia3": "ia3[alpha=2.0]",
    "prefix_mlp": "prefix_tuning[prefix_length=5,bottleneck_size=16]",
    "prefix_flat": "prefix_tuning_flat[prefix_length=4]",
    "mam": "prefix_tuning[prefix_length=3,bottleneck_size=8]|par_bn[reduction_factor=8]",
    "static_head": "seq_bn[reduction_factor=4]",
    "flex_head": "lora[r=2]",
}
#: AdapterFusion over two adapters "fa", "fb" of one configuration, with AdapterHub's "dynamic"/"static" fusion
FUSIONS = {
    "fusion_pfeiffer": ("seq_bn[reduction_factor=4]", "dynamic"),
    "fusion_houlsby_static": ("double_seq_bn[reduction_factor=8]", "static"),
}

#: two adapters "sa", "sb" composed by AdapterHub's Stack block (AdapterHub 1.3.0's Parallel fails on BERT with an
#: attention mask, "Expected size ... [12, 7] but got [12, 14]": Parallel is checked in tests/test_adapter_fusion.py)
COMPOSITIONS = {
    "stack_pfeiffer": ("seq_bn[reduction_factor=4,ln_after=True]", "stack"),
    "stack_residual_after_ln": ("seq_bn[reduction_factor=4,residual_before_ln=False]", "stack"),
}

#: cases saved with a prediction head: the model's own classifier ("static") or a flexible 2-layer head ("flex")
HEADS = {"static_head": "static", "flex_head": "flex", "flex_head_1_layer": "flex1"}

#: configurations refused at load, and the option the error must name
REFUSED = {
    "prompt_tuning": ("prompt_tuning[prompt_length=3]", "architecture='prompt_tuning'"),
    "seq_bn_inv": ("seq_bn_inv[reduction_factor=4]", "inv_adapter='nice'"),
    "unipelt": ("unipelt", "use_gating=True"),
    "compacter": ("compacter[reduction_factor=4]", "phm_layer=True"),
    "ln_after_false": ("seq_bn[reduction_factor=4,original_ln_after=False]", "original_ln_after=False"),
    "flex_head_1_layer": ("seq_bn[reduction_factor=4]", "layers=1.*to keep the model's own head, move"),
}
#: loaded cases that cannot be saved back in AdapterHub's layout (BERT's pooler is no AdapterHub head)
NOT_SAVED = {"flex_head": "modules_to_save"}


@pytest.fixture(scope="session")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every AdapterHub folder of this module, written by one oracle process."""
    if not ORACLE_PYTHON.is_file():
        message = "AdapterHub's oracle venv is missing: run `make .venv-adapterhub` (make test builds it)"
        if os.environ.get("CI") or os.environ.get("LIGHTNING_PEFT_REQUIRE_ORACLE"):
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("adapterhub")
    cases = {**LOADS, **{name: config for name, (config, _) in REFUSED.items()}}
    spec = {
        "base": str(root / "base"),
        "write": [
            {"name": name, "config": config, "folder": str(root / name), "head": HEADS.get(name)}
            for name, config in cases.items()
        ],
        "fusion": [
            {"adapters": ["fa", "fb"], "config": config, "fusion_config": kind, "folder": str(root / case)}
            for case, (config, kind) in FUSIONS.items()
        ],
        "compose": [
            {"adapters": ["sa", "sb"], "config": config, "block": block, "folder": str(root / case)}
            for case, (config, block) in COMPOSITIONS.items()
        ],
        "errors": str(root / "errors.json"),
    }
    run_oracle(root, spec)
    errors = json.loads((root / "errors.json").read_text())
    assert not errors, f"the oracle could not write: {errors}"
    return root


def run_oracle(root: Path, spec: dict[str, Any]) -> None:
    """Runs the AdapterHub oracle (its own venv) on ``spec``, written to ``root/spec.json``."""
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [str(ORACLE_PYTHON), str(ORACLE), str(root / "spec.json")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


@functools.cache
def _pristine(folder: str) -> Any:
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(folder).eval()


def base_model(root: Path) -> Any:
    """A fresh copy of the oracle's base model (read from disk once)."""
    return copy.deepcopy(_pristine(str(root / "base")))


def outputs(model: Any) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(INPUT_IDS),
            attention_mask=torch.tensor(ATTENTION_MASK),
            output_hidden_states=True,
        )
    return {"logits": out.logits, "hidden": out.hidden_states[-1]}


@pytest.mark.parametrize("case", sorted(LOADS))
def test_adapterhub_folder_gives_adapterhubs_outputs(oracle: Path, case: str) -> None:
    model = base_model(oracle)
    before = outputs(model)
    lp.load_adapter(model, oracle / case)
    got, want = outputs(model), load_file(str(oracle / case / "outputs.safetensors"))
    for key in ("logits", "hidden"):
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=f"{case}: {key}")
    # the adapter changes the outputs, so the comparison above tests the adapter, not the base
    assert (before["hidden"] - want["hidden"]).abs().max() > 1e-2


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_options_are_refused_naming_them(oracle: Path, case: str) -> None:
    model = base_model(oracle)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterHubOptionError, match=REFUSED[case][1].replace("[", r"\[")):
        lp.load_adapter(model, oracle / case)
    assert not is_attached(model)
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_read_adapter_config_of_an_adapterhub_folder(oracle: Path) -> None:
    methods = read_methods(oracle / "seq_bn")
    assert len(methods) == 1 and isinstance(methods[0], lp.Adapter)
    assert methods[0].original_ln_before and methods[0].bottleneck_size == 8


class _Payload:
    """Unpickling this runs ``os.system`` (were the file ever unpickled)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_payload_in_pytorch_adapter_bin_never_runs(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    folder, marker = tmp_path / "evil", tmp_path / "ran"
    folder.mkdir()
    config = {
        "config": {"architecture": "lora", "r": 2, "alpha": 2},
        "model_class": "BertForSequenceClassification",
    }
    config.update({"model_type": "bert", "name": "evil", "hidden_size": 32, "version": "adapters.1.3.0"})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with open(folder / "pytorch_adapter.bin", "wb") as file:
        pickle.dump({"weights": _Payload(marker)}, file)
    torch.save({"x": _Payload(marker)}, folder / "second.bin")  # the torch.save (zip) form too
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        )
    )
    with pytest.raises(UnsafeFileError):
        lp.load_adapter(model, folder)
    (folder / "second.bin").replace(folder / "pytorch_adapter.bin")
    with pytest.raises(UnsafeFileError):
        lp.load_adapter(model, folder)
    assert not marker.exists()
    assert not is_attached(model)


#: lightning-peft adapters made here, saved in AdapterHub's layout and read by AdapterHub
NATIVE = {
    "native_adapter": lambda: [lp.Adapter(bottleneck_size=4, activation="gelu")],
    "native_houlsby_block": lambda: [
        lp.Adapter(placement="houlsby", train_layernorms=False, bottleneck_size=3, original_ln_before=True)
    ],
    "native_lora": lambda: [lp.LoRA(r=2, alpha=6.0, target_modules=["query", "key"])],
    "native_lora_head": lambda: [lp.LoRA(r=2, target_modules=["query"], modules_to_save=["classifier"])],
    "native_ia3": lambda: [
        lp.IA3(target_modules=["key", "value", "intermediate.dense"], feedforward_modules=[])
    ],
    "native_prefix_lora": lambda: [
        lp.PrefixTuning(num_virtual_tokens=3, shift_positions=False),
        lp.LoRA(r=2, target_modules=["value"]),
    ],
}


def randomise(model: Any, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="session")
def read_back(oracle: Path) -> Path:
    """Every LOADS folder loaded here and saved back with format="adapterhub", and every NATIVE adapter saved
    so; AdapterHub (one oracle process) loads each and writes its outputs to ``<folder>.out.safetensors``."""
    root = oracle / "back"
    root.mkdir(exist_ok=True)
    cases = []
    for case in LOADS:
        model = base_model(oracle)
        lp.load_adapter(model, oracle / case)
        if case in NOT_SAVED:
            with pytest.raises(ValueError, match=NOT_SAVED[case]):
                lp.save_adapter(model, root / case, format="adapterhub")
            continue
        lp.save_adapter(model, root / case, format="adapterhub")
        cases.append(case)
    for i, (case, methods) in enumerate(NATIVE.items()):
        model = base_model(oracle)
        lp.apply_peft(model, methods())
        randomise(model, seed=i)
        save_file(
            {k: v.contiguous() for k, v in outputs(model).items()}, str(root / f"{case}.ours.safetensors")
        )
        lp.save_adapter(model, root / case, format="adapterhub")
        cases.append(case)
    for case in FUSIONS:
        model = load_fusion(oracle / case)
        for name in ("fa", "fb", "fusion"):
            lp.save_adapter(model, root / case / name, adapter_name=name, format="adapterhub")
    spec = {
        "base": str(oracle / "base"),
        "read": [{"folder": str(root / c), "output": str(root / f"{c}.out.safetensors")} for c in cases],
        "read_fusion": [
            {
                "adapters": [str(root / case / "fa"), str(root / case / "fb")],
                "fusion": str(root / case / "fusion"),
                "output": str(root / f"{case}.out.safetensors"),
            }
            for case in FUSIONS
        ],
        "errors": str(root / "errors.json"),
    }
    run_oracle(root, spec)
    return root


@pytest.mark.parametrize("case", sorted(set(LOADS) - set(NOT_SAVED)))
def test_saved_back_in_adapterhubs_layout_adapterhub_gives_the_same_outputs(
    read_back: Path, case: str
) -> None:
    got = load_file(str(read_back / f"{case}.out.safetensors"))
    want = load_file(str(read_back.parent / case / "outputs.safetensors"))
    for key in ("logits", "hidden"):
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=f"{case}: {key}")


@pytest.mark.parametrize("case", sorted(NATIVE))
def test_lightning_peft_adapters_load_in_adapterhub(read_back: Path, case: str) -> None:
    got = load_file(str(read_back / f"{case}.out.safetensors"))
    want = load_file(str(read_back / f"{case}.ours.safetensors"))
    for key in ("logits", "hidden"):
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=f"{case}: {key}")
    # and lightning-peft reads its own AdapterHub folder back to the same outputs
    model = base_model(read_back.parent)
    lp.load_adapter(model, read_back / case)
    torch.testing.assert_close(outputs(model)["logits"], want["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("methods", "argument"),
    [
        (lambda: [lp.Adapter(placement="houlsby")], "train_layernorms=True"),
        (
            lambda: [lp.IA3(target_modules=["key", "output.dense"], feedforward_modules=["output.dense"])],
            "feedforward",
        ),
        (lambda: [lp.PrefixTuning(num_virtual_tokens=2)], "shift_positions=True"),
        (lambda: [lp.LoRA(r=2, target_modules=["query"], use_rslora=True)], "use_rslora=True"),
        (
            lambda: [lp.LoRA(r=2, target_modules=["query"], modules_to_save=["pooler.dense"])],
            "modules_to_save",
        ),
        (lambda: [lp.BitFit()], "BitFit"),
    ],
)
def test_saving_what_adapterhub_cannot_express_is_refused(
    tmp_path: Path, methods: Any, argument: str
) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    )
    model = BertForSequenceClassification(config)
    lp.apply_peft(model, methods())
    with pytest.raises(ValueError, match=argument):
        lp.save_adapter(model, tmp_path / "out", format="adapterhub")
    assert not (tmp_path / "out").exists()


def test_saving_a_model_adapterhub_has_no_names_for_is_refused_naming_it(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config)
    lp.apply_peft(model, lp.LoRA(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM \(model_type='llama'\).*'bert'"):
        lp.save_adapter(model, tmp_path / "out", format="adapterhub")
    assert not (tmp_path / "out").exists()


def load_fusion(folder: Path) -> Any:
    """The oracle's base with AdapterHub's adapters fa, fb and their fusion (named "fusion", active)."""
    model = base_model(folder.parent)
    for name in ("fa", "fb"):
        lp.load_adapter(model, folder / name, adapter_name=name)
    lp.load_adapter(model, folder / "fusion", adapter_name="fusion")
    set_adapter(model, "fusion")
    return model


@pytest.mark.parametrize("case", sorted(FUSIONS))
def test_adapterhub_fusion_gives_adapterhubs_outputs(oracle: Path, case: str) -> None:
    got, want = outputs(load_fusion(oracle / case)), load_file(str(oracle / case / "outputs.safetensors"))
    for key in ("logits", "hidden"):
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=f"{case}: {key}")
    model = load_fusion(oracle / case)
    set_adapter(model, "fa")  # one adapter alone differs from the fusion: the test sees the fusion
    assert (outputs(model)["hidden"] - want["hidden"]).abs().max() > 1e-3


@pytest.mark.parametrize("case", sorted(FUSIONS))
def test_fusion_saved_back_loads_in_adapterhub(read_back: Path, case: str) -> None:
    got = load_file(str(read_back / f"{case}.out.safetensors"))
    want = load_file(str(read_back.parent / case / "outputs.safetensors"))
    for key in ("logits", "hidden"):
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=f"{case}: {key}")


@pytest.mark.parametrize("case", sorted(COMPOSITIONS))
def test_stack_gives_adapterhubs_outputs(oracle: Path, case: str) -> None:
    model = base_model(oracle)
    for name in ("sa", "sb"):
        lp.load_adapter(model, oracle / case / name, adapter_name=name)
    want = load_file(str(oracle / case / "outputs.safetensors"))
    set_composition(model, Stack("sa", "sb"))
    got = outputs(model)
    for key in ("logits", "hidden"):
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=f"{case}: {key}")
    set_adapter(model, "sb")  # one adapter alone differs: the test sees the composition
    assert (outputs(model)["hidden"] - want["hidden"]).abs().max() > 1e-3
