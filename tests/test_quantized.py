"""Every method on bitsandbytes 4-bit (NF4/FP4, with and without double quantization) and 8-bit bases, as
transformers' BitsAndBytesConfig loads them on the CPU: training leaves the quantized weights bit-identical,
counting unpacks 4-bit weights, DoRA uses the dequantized weight, merging requantizes within its bound,
unmerging is exact, and adapters move between quantized and full-precision bases."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import model_output, tiny_batch
from quantized_helpers import (
    QUANTIZATIONS,
    assert_bit_identical,
    load_bert,
    quantized_tensors,
    save_tiny_bert,
)

from lightning_peft import (
    IA3,
    Adapter,
    BitFit,
    DoRA,
    LoRA,
    PEFTMethod,
    PrefixTuning,
    PromptTuning,
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
from lightning_peft.ops.parameters import peft_layers

bnb = pytest.importorskip("bitsandbytes")

from lightning_peft.core.quantized import (  # noqa: E402
    dequantized_weight,
    hold_standard_layout,
    merge_error_bound,
    quantization_of,
    quantized_modules,
)
from lightning_peft.distributed.strategies import check_fsdp_quant_storage  # noqa: E402
from lightning_peft.lightning.precision import keep_adapter_unquantized  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")

METHODS: dict[str, Callable[[], PEFTMethod]] = {
    "lora": lambda: LoRA(r=4, alpha=8, modules_to_save=["classifier"]),
    "dora": lambda: DoRA(r=4, alpha=8),
    "ia3": lambda: IA3(),
    "adapter_houlsby": lambda: Adapter(placement="houlsby", bottleneck_size=8),
    "adapter_pfeiffer": lambda: Adapter(placement="pfeiffer", bottleneck_size=8),
    "prefix": lambda: PrefixTuning(num_virtual_tokens=4),
    "prompt": lambda: PromptTuning(num_virtual_tokens=4),
    "bitfit": lambda: BitFit(),
}
MERGEABLE = ("lora", "dora", "ia3")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def train_steps(model: torch.nn.Module, steps: int = 2, lr: float = 1e-2) -> None:
    batch = tiny_batch("bert")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def adapter_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in trainable_parameter_names(model)}


def nudge(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Random adapter values, as after training (LoRA's B and DoRA's B start at zero)."""
    g = torch.Generator().manual_seed(3)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in trainable_parameter_names(model):
            params[name].add_(scale * torch.randn(params[name].shape, generator=g))


def test_layers_are_bitsandbytes_and_nothing_imports_it_for_plain_models(
    bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_bert(bert_dir, "nf4")
    kinds = {quantization_of(m) for _, m in quantized_modules(model)}
    assert kinds == {"4bit"}
    assert quantization_of(model.classifier) is None  # llm_int8_skip_modules keeps the head in float
    assert {quantization_of(m) for _, m in quantized_modules(load_bert(bert_dir, "int8"))} == {"8bit"}
    # a plain model never needs bitsandbytes: with it unimportable, every operation still works
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError):
        import bitsandbytes  # noqa: F401
    plain = load_bert(bert_dir, None)
    apply_peft(plain, DoRA(r=4))
    nudge(plain)
    assert count_parameters(plain).trainable > 0
    merge_and_unload(plain, dequantize=True)


@pytest.mark.parametrize("kind", list(QUANTIZATIONS))
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_and_leaves_quantized_weights_bit_identical(
    bert_dir: Path, kind: str, method: str
) -> None:
    model = load_bert(bert_dir, kind)
    batch = tiny_batch("bert")
    frozen = quantized_tensors(model)
    counts = apply_peft(model, METHODS[method]())
    assert 0 < counts.trainable < counts.total
    before = adapter_snapshot(model)
    out_before = model_output(model, batch)
    train_steps(model)
    after = adapter_snapshot(model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) > len(before) / 2, method  # (a key bias, for one, gets no gradient)
    assert torch.isfinite(model_output(model, batch)).all()
    assert not torch.equal(model_output(model, batch), out_before)
    assert_bit_identical(frozen, quantized_tensors(model))
    assert all(not m.weight.requires_grad for _, m in quantized_modules(model))


@pytest.mark.parametrize("kind", list(QUANTIZATIONS))
def test_count_parameters_unpacks_4bit_weights(bert_dir: Path, kind: str) -> None:
    full = count_parameters(load_bert(bert_dir, None))
    quantized = load_bert(bert_dir, kind)
    assert count_parameters(quantized).total == full.total
    reference, adapted = load_bert(bert_dir, None), quantized
    expected = apply_peft(reference, LoRA(r=4, target_modules=["query", "value"]))
    got = apply_peft(adapted, LoRA(r=4, target_modules=["query", "value"]))
    assert (got.trainable, got.total) == (expected.trainable, expected.total)
    assert got.percent == pytest.approx(expected.percent)


@pytest.mark.parametrize("kind", ["nf4", "fp4-dq", "int8"])
def test_dora_magnitude_is_the_norm_of_the_dequantized_weight(bert_dir: Path, kind: str) -> None:
    model = load_bert(bert_dir, kind)
    hold_standard_layout(model)  # the base output below, before attaching: as the adapted model computes it
    batch = tiny_batch("bert")
    base = model_output(model, batch)
    apply_peft(model, DoRA(r=4, target_modules=["query", "value"]))
    for _, layer in peft_layers(model):
        norm = torch.linalg.vector_norm(dequantized_weight(layer.base_layer).float(), dim=1)
        torch.testing.assert_close(layer.lora_magnitude_vector.detach(), norm)
    # B = 0: m / ||W|| = 1, so the model is unchanged (up to the float rounding of m / n)
    torch.testing.assert_close(model_output(model, batch), base, atol=1e-5, rtol=0)


def _merge_with_warning(model: torch.nn.Module) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_adapter(model)
    return [str(w.message) for w in caught if "lightning-peft" in str(w.message)]


@pytest.mark.parametrize("kind", ["nf4", "fp4-dq", "int8"])
def test_lora_merge_requantizes_within_the_bound_and_unmerge_is_exact(bert_dir: Path, kind: str) -> None:
    model = load_bert(bert_dir, kind)
    frozen = quantized_tensors(model)
    apply_peft(model, LoRA(r=4, alpha=8, target_modules=["query", "value"]))
    nudge(model)
    batch = tiny_batch("bert")
    adapted = model_output(model, batch)
    layers = [layer for _, layer in peft_layers(model)]
    expected = [dequantized_weight(layer.base_layer) + layer.delta_weight().detach() for layer in layers]
    messages = _merge_with_warning(model)
    assert len(messages) == len(layers) and "rounds the merged weight" in messages[0]
    for layer, target in zip(layers, expected):
        error = (dequantized_weight(layer.base_layer) - target).abs()
        # double quantization rounds the stored absmax itself (documented: up to about 1.1x); int8 adds the
        # float16 rounding of its input
        bound = merge_error_bound(layer.base_layer) * 1.1 + 1e-3 * target.abs()
        assert bool((error <= bound).all()), float((error - bound).max())
        assert float(error.max()) > 0  # the merged weight really went through the quantisation grid
    merged = model_output(model, batch)
    assert float((merged - adapted).abs().max()) < 0.05
    unmerge_adapter(model)
    assert_bit_identical(frozen, quantized_tensors(model))
    torch.testing.assert_close(model_output(model, batch), adapted, atol=0, rtol=0)


@pytest.mark.parametrize("method", MERGEABLE)
@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_merge_never_fails_on_shapes_and_unmerge_restores(bert_dir: Path, kind: str, method: str) -> None:
    model = load_bert(bert_dir, kind)
    frozen = quantized_tensors(model)
    apply_peft(model, METHODS[method]())
    nudge(model, 0.02)
    batch = tiny_batch("bert")
    adapted = model_output(model, batch)
    assert _merge_with_warning(model)
    assert float((model_output(model, batch) - adapted).abs().max()) < 0.05
    unmerge_adapter(model)
    assert_bit_identical(frozen, quantized_tensors(model))
    # IA3 divides its scale back out of the float bias: exact up to float rounding
    torch.testing.assert_close(
        model_output(model, batch), adapted, atol=1e-6 if method == "ia3" else 0, rtol=0
    )


@pytest.mark.parametrize("method", MERGEABLE)
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_and_unload_dequantize_gives_a_full_precision_model(
    bert_dir: Path, kind: str, method: str
) -> None:
    model = load_bert(bert_dir, kind)
    apply_peft(model, METHODS[method]())
    nudge(model, 0.02)
    batch = tiny_batch("bert")
    adapted = model_output(model, batch)
    if method == "lora":
        _merge_with_warning(
            model
        )  # merged into the quantized weights first: dequantize starts from the original
    plain = merge_and_unload(model, dequantize=True)
    assert not list(quantized_modules(plain)) and not list(peft_layers(plain))
    assert all(type(m) is torch.nn.Linear for n, m in plain.named_modules() if n.endswith(("query", "value")))
    assert all(p.is_floating_point() for p in plain.parameters())
    assert not hasattr(plain.config, "quantization_config")
    # int8 layers multiply in float16 inside bitsandbytes; the float model does not
    atol = 1e-5 if kind == "nf4" else 5e-3
    torch.testing.assert_close(model_output(plain, batch), adapted, atol=atol, rtol=0)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_save_load_onto_fresh_quantized_and_full_precision_bases(
    tmp_path: Path, bert_dir: Path, kind: str, method: str
) -> None:
    model = load_bert(bert_dir, kind)
    apply_peft(model, METHODS[method]())
    nudge(model)
    batch = tiny_batch("bert")
    expected = model_output(model, batch)
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(load_bert(bert_dir, kind), tmp_path / "adapter")
    assert torch.equal(model_output(fresh, batch), expected)
    full = load_adapter(load_bert(bert_dir, None), tmp_path / "adapter")
    saved = adapter_snapshot(model)
    assert all(torch.equal(v, adapter_snapshot(full)[k]) for k, v in saved.items())
    # the full-precision base differs from the quantized one by the quantisation error only
    assert float((model_output(full, batch) - expected).abs().max()) < 0.3


def test_remove_peft_gives_back_the_quantized_base(bert_dir: Path) -> None:
    model = load_bert(bert_dir, "nf4")
    hold_standard_layout(model)  # no AVX512-BF16 repacking at the evaluation before attaching
    frozen = quantized_tensors(model)
    batch = tiny_batch("bert")
    base = model_output(model, batch)
    apply_peft(model, DoRA(r=4))
    nudge(model)
    with pytest.warns(UserWarning, match="rounds the merged weight to its 4bit grid"):  # said once per layer
        merge_adapter(model)
    remove_peft(model)
    assert_bit_identical(frozen, quantized_tensors(model))
    assert torch.equal(model_output(model, batch), base)


def test_fsdp_refuses_integer_quant_storage(bert_dir: Path) -> None:
    with pytest.raises(TypeError, match=r"stored as torch.uint8.*bnb_4bit_quant_storage=torch.bfloat16"):
        check_fsdp_quant_storage(load_bert(bert_dir, "nf4"))
    with pytest.raises(TypeError, match="8-bit bitsandbytes layer"):
        check_fsdp_quant_storage(load_bert(bert_dir, "int8"))
    floating = load_bert(bert_dir, "nf4", bnb_4bit_quant_storage=torch.float32)
    check_fsdp_quant_storage(floating)  # a floating-point storage can be sharded
    assert count_parameters(floating).total == count_parameters(load_bert(bert_dir, None)).total
    apply_peft(floating, LoRA(r=4))
    train_steps(floating)


def test_bitsandbytes_precision_plugin_converts_only_the_frozen_base_layers(bert_dir: Path) -> None:
    """Lightning's BitsandbytesPrecision replaces nn.Linear layers at strategy setup (it quantizes them only on
    CUDA: tests/gpu/test_qlora_gpu.py trains through it); the adapter's own layers and the head must stay."""
    from lightning.pytorch.plugins import BitsandbytesPrecision

    plugin = BitsandbytesPrecision("nf4-dq", ignore_modules={"bert.pooler"})
    model = load_bert(bert_dir, None)
    lora_and_adapter = [
        LoRA(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
        Adapter(placement="pfeiffer", bottleneck_size=8),
    ]
    apply_peft(model, lora_and_adapter)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ignored = keep_adapter_unquantized(model, plugin)
    assert "classifier" in ignored and any(n.endswith("adapter_down") for n in ignored)
    assert "bert.pooler" in plugin.ignore_modules  # the user's own entries stay
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    plugin.convert_module(model)
    converted = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert converted == linears - set(ignored) - {"bert.pooler.dense"}
    assert {n for n in converted if n.endswith(("query.base_layer", "layer.1.output.dense.base_layer"))}
    kept = {
        n: m for n, m in model.named_modules() if n.endswith(("adapter_up", "adapter_down", "classifier"))
    }
    assert len(kept) == 5
    assert all(isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear4bit) for m in kept.values())
    after = dict(model.named_parameters())
    assert all(after[n] is p and p.requires_grad for n, p in trainable.items())
    assert keep_adapter_unquantized(model, object()) == []  # any other plugin: nothing to do
