"""bitsandbytes' AVX512-BF16 CPU packing of 4-bit weights (``packing_format_for_cpu``) on adapted models.

Every lightning-peft operation first brings a packed layer back to the standard layout, with the same bits as a
layer converted back by hand, and an adapted model never packs. The packed state is produced in two ways:
``simulated`` (bitsandbytes' own conversion function, on any CPU) and ``kernel`` (an eval-mode forward with the
packing allowed, which also runs bitsandbytes' AVX512-BF16 ``gemv_4bit`` kernel; only where the CPU has
AVX512-BF16, ``bitsandbytes.functional.has_avx512bf16()``, and never skipped there).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import model_output, tiny_batch
from quantized_helpers import load_bert, quantized_tensors, save_tiny_bert

from lightning_peft import (
    DoRA,
    LoRA,
    apply_peft,
    count_parameters,
    load_adapter,
    merge_adapter,
    merge_and_unload,
    remove_peft,
    save_adapter,
    trainable_parameter_names,
    unmerge_adapter,
)

bnb = pytest.importorskip("bitsandbytes")

from bitsandbytes.functional import _convert_weight_packed_for_cpu, has_avx512bf16  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from lightning_peft.core.quantized import (  # noqa: E402
    dequantized_weight,
    hold_standard_layout,
    is_packed,
    standard_layout,
)

pytestmark = pytest.mark.filterwarnings("ignore:lightning-peft. merging into a quantized")

MODES = ["simulated", "kernel"]
ADAPTED = "bert.encoder.layer.0.attention.self.query"  # wrapped by LoRA/DoRA
UNADAPTED = "bert.encoder.layer.1.attention.self.key"  # a 4-bit layer no method touches


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def base_of(model: torch.nn.Module, name: str) -> torch.nn.Module:
    module = model.get_submodule(name)
    return getattr(module, "base_layer", module)


def pack(layer: torch.nn.Module, mode: str) -> None:
    """Put a bitsandbytes ``Linear4bit`` into the CPU packing layout, as bitsandbytes does at an eval forward."""
    weight = layer.weight
    if mode == "simulated":
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    else:
        if not has_avx512bf16():
            pytest.skip("the CPU has no AVX512-BF16: bitsandbytes' packed kernel cannot run here")
        flag, training = layer.support_avx512bf16_for_cpu, layer.training
        layer.support_avx512bf16_for_cpu = True  # as if something switched bitsandbytes' packing back on
        layer.eval()
        with torch.no_grad():
            out = layer(torch.randn(2, layer.in_features))  # runs gemv_4bit, the AVX512-BF16 kernel
        layer.support_avx512bf16_for_cpu = flag
        layer.train(training)
        assert torch.isfinite(out).all()
    assert is_packed(layer.weight) and tuple(layer.weight.shape) == (
        layer.out_features,
        layer.in_features // 2,
    )


def pack_by_hand(layer: torch.nn.Module) -> None:
    """The reference: packed by the conversion function and converted back directly, no lightning-peft op."""
    pack(layer, "simulated")
    assert standard_layout(layer.weight)


def layout_of(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    assert not is_packed(layer.weight)
    state = layer.weight.quant_state
    return {"weight": layer.weight.data.clone(), **state.as_dict(packed=True)}


def assert_same(got: Any, expected: Any) -> None:
    """Bit for bit: tensors, dicts of tensors, sequences, anything else by ``==``."""
    if isinstance(got, torch.Tensor):
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    elif isinstance(got, dict):
        assert set(got) == set(expected)
        for key in got:
            assert_same(got[key], expected[key])
    elif isinstance(got, (list, tuple)):
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert_same(a, b)
    else:
        assert got == expected


def adapted(folder: Path, kind: str, dora: bool = False) -> torch.nn.Module:
    model = load_bert(folder, kind)
    torch.manual_seed(0)  # LoRA's A
    method = (DoRA if dora else LoRA)(r=4, alpha=8, target_modules=["query", "value"])
    apply_peft(model, method)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as after training (B starts at zero)
        for name in trainable_parameter_names(model):
            params[name].add_(0.05 * torch.randn(params[name].shape, generator=g))
    return model


def _training_forward(model: torch.nn.Module, folder: Path) -> Any:
    model.train()
    loss = model(**tiny_batch("bert")).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n)
    return loss.detach(), grads


def _eval_forward(model: torch.nn.Module, folder: Path) -> Any:
    return model_output(model.eval(), tiny_batch("bert"))


def _merge(model: torch.nn.Module, folder: Path) -> Any:
    merge_adapter(model)
    return quantized_tensors(model), model_output(model.eval(), tiny_batch("bert"))


def _unmerge(model: torch.nn.Module, folder: Path) -> Any:
    unmerge_adapter(model)
    return quantized_tensors(model), model_output(model.eval(), tiny_batch("bert"))


def _state_dict(model: torch.nn.Module, folder: Path) -> Any:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _save(model: torch.nn.Module, folder: Path) -> Any:
    save_adapter(model, folder)
    return load_file(str(folder / "adapter_model.safetensors"))


def _count(model: torch.nn.Module, folder: Path) -> Any:
    counts = count_parameters(model)
    return counts.trainable, counts.total


def _dora_norm(model: torch.nn.Module, folder: Path) -> Any:
    return model.get_submodule(ADAPTED).weight_norm()


def _load(model: torch.nn.Module, folder: Path) -> Any:
    load_adapter(model, folder.parent / "saved")
    return model_output(model.eval(), tiny_batch("bert"))


def _dequantize(model: torch.nn.Module, folder: Path) -> Any:
    plain = merge_and_unload(model, dequantize=True)
    assert type(plain.get_submodule(ADAPTED)) is torch.nn.Linear
    return {k: v.clone() for k, v in plain.state_dict().items()}, model_output(
        plain.eval(), tiny_batch("bert")
    )


#: operation -> (its function, whether it acts on the whole model (both packed layers) or one layer)
OPERATIONS: dict[str, tuple[Callable[[torch.nn.Module, Path], Any], bool]] = {
    "training forward": (_training_forward, True),
    "eval forward": (_eval_forward, True),
    "merge": (_merge, True),
    "unmerge": (_unmerge, True),
    "state_dict": (_state_dict, True),
    "save": (_save, True),
    "count_parameters": (_count, True),
    "DoRA norm": (_dora_norm, False),
    "load": (_load, True),
    "merge_and_unload(dequantize=True)": (_dequantize, True),
}


def build(folder: Path, tmp: Path, kind: str, operation: str) -> torch.nn.Module:
    """The model an operation starts from, before any layer is packed."""
    if operation == "load":
        if not (tmp / "saved").exists():
            save_adapter(adapted(folder, kind), tmp / "saved")
        return load_bert(folder, kind)  # packed before the adapter is loaded onto it
    model = adapted(folder, kind, dora=operation == "DoRA norm")
    if operation == "unmerge":
        merge_adapter(model)  # packed while merged
    return model


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["nf4", "fp4-dq"])
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_every_operation_first_brings_a_packed_layer_back(
    tmp_path: Path, bert_dir: Path, operation: str, kind: str, mode: str
) -> None:
    run, whole_model = OPERATIONS[operation]
    names = [ADAPTED, UNADAPTED] if whole_model else [ADAPTED]
    model = build(bert_dir, tmp_path, kind, operation)
    reference = build(bert_dir, tmp_path, kind, operation)
    for name in names:
        pack(base_of(model, name), mode)
        pack_by_hand(base_of(reference, name))
    expected_layout = {name: layout_of(base_of(reference, name)) for name in names}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(model, tmp_path / "got")
    assert any("repacked the 4-bit weight" in str(w.message) for w in caught), operation  # never silent
    expected = run(reference, tmp_path / "expected")
    assert_same(got, expected)
    if operation != "merge_and_unload(dequantize=True)":  # (which leaves no 4-bit layer)
        for name in names:
            layer = base_of(model, name)
            assert not is_packed(layer.weight), name
            if operation not in ("merge", "unmerge") or name == UNADAPTED:  # a merge rewrites the weight
                assert_same(layout_of(layer), expected_layout[name])


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "fp4", "fp4-dq"])
def test_converting_back_restores_the_block_statistics(bert_dir: Path, kind: str) -> None:
    """bitsandbytes' own inverse leaves the statistics of a weight without double quantization transposed and in
    bfloat16 (dequantizing then reads them in the wrong order); lightning-peft's conversion puts them back in
    block order. What remains is the packing's own bfloat16 rounding of the statistics (and, with double
    quantization, quantizing them again)."""
    layer = base_of(load_bert(bert_dir, kind), ADAPTED)
    before = dequantized_weight(layer)
    dtype = layer.weight.quant_state.absmax.dtype
    pack(layer, "simulated")
    assert standard_layout(layer.weight)
    assert layer.weight.quant_state.absmax.dtype == dtype and layer.weight.quant_state.absmax.dim() == 1
    after = dequantized_weight(layer)
    # bfloat16 keeps 8 significant bits: 2^-8 relative per block statistic, plus double quantization's step
    tolerance = 2**-8 * before.abs() + (0.02 * before.abs().max() if kind.endswith("-dq") else 0)
    assert bool(((after - before).abs() <= tolerance + 1e-7).all()), float((after - before).abs().max())


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq"])
def test_adapted_models_never_pack_and_removing_gives_bitsandbytes_its_setting_back(
    bert_dir: Path, kind: str
) -> None:
    """The real kernel where the CPU has it: bitsandbytes packs at eval on a plain model, never on an adapted
    one (neither the adapted layers nor the others), and packs again once the adapter is removed."""
    plain = load_bert(bert_dir, kind)
    flags = {name: m.support_avx512bf16_for_cpu for name, m in plain.named_modules() if is_4bit(m)}
    assert set(flags.values()) == {has_avx512bf16()}  # bitsandbytes' own choice, from the CPU
    model_output(plain, tiny_batch("bert"))
    assert all(is_packed(m.weight) == has_avx512bf16() for m in plain.modules() if is_4bit(m))

    model = load_bert(bert_dir, kind)
    frozen = quantized_tensors(model)
    apply_peft(model, LoRA(r=4, target_modules=["query", "value"]))
    assert not any(m.support_avx512bf16_for_cpu for m in model.modules() if is_4bit(m))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):  # train -> evaluate, twice: the sequence that crashed
        model.train()
        model(**tiny_batch("bert")).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        model_output(model, tiny_batch("bert"))
        assert not any(is_packed(m.weight) for m in model.modules() if is_4bit(m))
    assert quantized_tensors(model).keys() == frozen.keys()
    assert_same(quantized_tensors(model), frozen)

    remove_peft(model)
    restored = {name: m.support_avx512bf16_for_cpu for name, m in model.named_modules() if is_4bit(m)}
    assert restored == flags
    assert not any(m._forward_pre_hooks or m._state_dict_pre_hooks for m in model.modules() if is_4bit(m))
    model_output(model, tiny_batch("bert"))
    assert all(is_packed(m.weight) == has_avx512bf16() for m in model.modules() if is_4bit(m))


def test_held_before_attaching_stays_held_and_matches_a_cpu_without_avx512bf16(bert_dir: Path) -> None:
    """``hold_standard_layout(model)`` right after loading keeps an evaluation before attaching exact; the
    adapted model then computes what it computes with bitsandbytes' packing switched off from the start (as on a
    CPU without AVX512-BF16), bit for bit."""
    held = load_bert(bert_dir, "nf4-dq")
    hold_standard_layout(held)
    off = load_bert(bert_dir, "nf4-dq")
    for module in off.modules():
        if is_4bit(module):
            module.support_avx512bf16_for_cpu = False
    batch = tiny_batch("bert")
    assert_same(model_output(held, batch), model_output(off, batch))
    for model in (held, off):
        torch.manual_seed(0)
        apply_peft(model, DoRA(r=4, target_modules=["query", "value"]))
        model.train()
        model(**batch).loss.backward()
    assert_same(
        {n: p.grad for n, p in held.named_parameters() if p.requires_grad},
        {n: p.grad for n, p in off.named_parameters() if p.requires_grad},
    )
    remove_peft(held)  # the hold taken before attaching is the caller's: it stays
    assert not any(m.support_avx512bf16_for_cpu for m in held.modules() if is_4bit(m))


def is_4bit(module: torch.nn.Module) -> bool:
    return isinstance(module, bnb.nn.Linear4bit) and module.weight.quant_state is not None
