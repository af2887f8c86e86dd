"""Combining adapters: every ``how`` against its formula on delta weights (rsLoRA, different ranks, lora_bias,
DoRA), and the folder-level ``combine_adapter_folders`` against merged models."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODELS, model_output, tiny_batch, with_biases
from torch import nn

from lightning_peft import (
    DoRA,
    LoRA,
    apply_peft,
    combine_adapter_folders,
    load_adapter,
    merge_and_unload,
    save_adapter,
)
from lightning_peft.combine.deltas import LoRAFactors, combine_layer, dora_norm, dora_weight

OUT, IN = 6, 5
WEIGHTS = [0.7, -0.4, 1.3]


def factors(
    rank: int, seed: int, alpha: float = 8.0, rslora: bool = False, bias: bool = False
) -> LoRAFactors:
    g = torch.Generator().manual_seed(seed)
    scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
    return LoRAFactors(
        A=torch.randn(rank, IN, generator=g, dtype=torch.float64),
        B=torch.randn(OUT, rank, generator=g, dtype=torch.float64),
        scaling=scaling,
        bias=torch.randn(OUT, generator=g, dtype=torch.float64) if bias else None,
    )


def adapters() -> list[LoRAFactors]:
    # different ranks, one with rsLoRA scaling, one with lora_bias
    return [factors(2, 0), factors(3, 1, alpha=4.0, rslora=True), factors(1, 2, alpha=2.0, bias=True)]


def task_vectors(items: list[LoRAFactors], weights: list[float]) -> torch.Tensor:
    """w_i [s_i B_i A_i | s_i b_i], written out independently of the library."""
    vectors = []
    for w, a in zip(weights, items):
        bias = a.bias if a.bias is not None else torch.zeros(OUT, dtype=torch.float64)
        vectors.append(w * a.scaling * torch.cat([a.B @ a.A, bias[:, None]], 1))
    return torch.stack(vectors)


def result(f: LoRAFactors) -> torch.Tensor:
    bias = f.bias if f.bias is not None else torch.zeros(OUT, dtype=torch.float64)
    return f.scaling * torch.cat([f.B @ f.A, bias[:, None]], 1)


def ties_by_hand(taus: torch.Tensor, density: float, majority: str) -> torch.Tensor:
    k = round(density * taus[0].numel())
    trimmed = []
    for t in taus:
        cut = t.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(t.abs() >= cut, t, 0.0))
    return elect_and_mean(torch.stack(trimmed), majority)


def elect_and_mean(taus: torch.Tensor, majority: str) -> torch.Tensor:
    gamma = torch.sign(taus.sum(0)) if majority == "total" else torch.sign(torch.sign(taus).sum(0))
    out = torch.zeros_like(taus[0])
    for p in range(out.numel()):
        values = [
            float(t.flatten()[p])
            for t in taus
            if t.flatten()[p] != 0 and torch.sign(t.flatten()[p]) == gamma.flatten()[p]
        ]
        out.view(-1)[p] = sum(values) / len(values) if values else 0.0
    return out


def dare_masks(seed: int, density: float, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(OUT, IN + 1, generator=g, dtype=torch.float64) < density for _ in range(count)]


def test_linear_and_cat_are_the_weighted_sum_of_scaled_deltas() -> None:
    expected = task_vectors(adapters(), WEIGHTS).sum(0)
    linear = combine_layer(adapters(), WEIGHTS, "linear")
    cat = combine_layer(adapters(), WEIGHTS, "cat")
    torch.testing.assert_close(result(linear), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(result(cat), expected, atol=1e-10, rtol=0)
    assert cat.rank == 2 + 3 + 1 and linear.rank == min(6, OUT, IN) and linear.scaling == cat.scaling == 1.0


def test_rslora_scaling_is_folded_in() -> None:
    one = factors(4, 5, alpha=8.0, rslora=True)
    combined = combine_layer([one], [1.0], "cat")
    torch.testing.assert_close(combined.delta(), (8.0 / 2.0) * one.B @ one.A, atol=1e-10, rtol=0)


@pytest.mark.parametrize("rank", [None, 2])
def test_svd_is_the_best_low_rank_approximation(rank: int | None) -> None:
    full = task_vectors(adapters(), WEIGHTS).sum(0)[:, :IN]
    combined = combine_layer(adapters(), WEIGHTS, "svd", rank=rank)
    k = rank or 3  # default: the largest input rank
    assert combined.rank == k
    singular = torch.linalg.svdvals(full)
    error = torch.linalg.matrix_norm(full - combined.delta())
    torch.testing.assert_close(error, singular[k:].square().sum().sqrt(), atol=1e-10, rtol=0)  # Eckart-Young


@pytest.mark.parametrize("majority", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_ties_matches_trim_elect_disjoint_mean(density: float, majority: str) -> None:
    expected = ties_by_hand(task_vectors(adapters(), WEIGHTS), density, majority)
    combined = combine_layer(adapters(), WEIGHTS, "ties", density=density, majority_sign=majority)
    torch.testing.assert_close(result(combined), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("how", ["dare_linear", "dare_ties"])
def test_dare_drops_and_rescales(how: str) -> None:
    density = 0.6
    taus = task_vectors(adapters(), WEIGHTS)
    masks = dare_masks(11, density, 3)
    dropped = torch.stack([torch.where(m, t / density, 0.0) for m, t in zip(masks, taus)])
    expected = dropped.sum(0) if how == "dare_linear" else elect_and_mean(dropped, "total")
    combined = combine_layer(
        adapters(), WEIGHTS, how, density=density, generator=torch.Generator().manual_seed(11)
    )
    torch.testing.assert_close(result(combined), expected, atol=1e-10, rtol=0)
    # density 1 keeps everything: DARE-linear is then linear
    if how == "dare_linear":
        full = combine_layer(adapters(), WEIGHTS, how, density=1.0)
        torch.testing.assert_close(result(full), taus.sum(0), atol=1e-10, rtol=0)


def dora_factors(rank: int, seed: int, base: torch.Tensor, rslora: bool = False) -> LoRAFactors:
    f = factors(rank, seed, rslora=rslora)
    g = torch.Generator().manual_seed(100 + seed)
    f.magnitude = dora_norm(base, f.delta()) * (1 + 0.3 * torch.rand(OUT, generator=g, dtype=torch.float64))
    return f


def base_weight() -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(42), dtype=torch.float64)


@pytest.mark.parametrize("how", ["linear", "cat", "svd"])
def test_dora_combination_is_the_weighted_sum_of_effective_updates(how: str) -> None:
    w = base_weight()
    items = [dora_factors(2, 0, w), dora_factors(3, 1, w, rslora=True), factors(1, 2)]  # DoRA, DoRA, LoRA
    expected = w + sum(c * (dora_weight(w, f) - w) for c, f in zip(WEIGHTS, items))
    rank = 6 if how == "svd" else None  # svd at the full rank Σ r_i is exact; lower ranks approximate
    combined = combine_layer(items, WEIGHTS, how, base_weight=w, rank=rank)
    assert combined.magnitude is not None
    torch.testing.assert_close(dora_weight(w, combined), expected, atol=1e-10, rtol=0)


def test_dora_refuses_combinations_without_an_exact_meaning() -> None:
    w = base_weight()
    items = [dora_factors(2, 0, w), dora_factors(3, 1, w)]
    for how in ("ties", "dare_linear", "dare_ties"):
        with pytest.raises(ValueError, match=f"how='{how}' has no exact meaning for DoRA"):
            combine_layer(items, [0.5, 0.5], how, base_weight=w)
    with pytest.raises(ValueError, match="needs base_weight"):
        combine_layer(items, [0.5, 0.5], "linear")
    one = dora_factors(2, 0, w)
    one.magnitude = 2 * dora_norm(w, one.delta())  # m/n = 2: the weight -1 makes every row 0 · W
    with pytest.raises(ValueError, match="rows \\[0, 1, 2, 3, 4\\]"):
        combine_layer([one], [-1.0], "linear", base_weight=w)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"how": "mean"},
            "how must be one of 'linear', 'cat', 'svd', 'ties', 'dare_linear', 'dare_ties', got 'mean'",
        ),
        ({"weights": [1.0]}, "weights must be 3 finite numbers"),
        ({"weights": [1.0, float("nan"), 1.0]}, "weights must be 3 finite numbers"),
        ({"how": "ties", "density": 0.0}, r"density must be a number in \(0, 1\]"),
        ({"majority_sign": "mode"}, "majority_sign must be one of"),
        ({"rank": 0}, "rank must be a positive integer or None, got 0"),
    ],
)
def test_validation(kwargs: dict, message: str) -> None:
    options = {"weights": WEIGHTS, "how": "linear", **kwargs}
    with pytest.raises(ValueError, match=message):
        combine_layer(adapters(), options.pop("weights"), options.pop("how"), **options)


# -- adapter folders --------------------------------------------------------------------------------------
def trained(method: object, folder: Path, seed: int, biased: bool = True) -> nn.Module:
    model = (with_biases(TINY_MODELS["bert"]) if biased else TINY_MODELS["bert"])()
    apply_peft(model, method)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=g))
    save_adapter(model, folder)
    return model


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in merge_and_unload(copy.deepcopy(model)).state_dict().items()}


@pytest.mark.parametrize("how", ["linear", "cat"])
def test_combined_folder_is_the_weighted_sum_of_merged_updates(tmp_path: Path, how: str) -> None:
    base = with_biases(TINY_MODELS["bert"])()
    models = [
        trained(
            LoRA(r=2, target_modules=["query", "value"], use_rslora=True, modules_to_save=["classifier"]),
            tmp_path / "a",
            1,
        ),
        trained(LoRA(r=4, target_modules=["query", "key"], lora_bias=True), tmp_path / "b", 2),
        trained(
            LoRA(
                r=3,
                target_modules=["value"],
                bias="lora_only",
                rank_pattern={"layer.1.attention.self.value": 1},
            ),
            tmp_path / "c",
            3,
        ),
    ]
    base_state = {k: v.double() for k, v in base.state_dict().items()}
    combine_adapter_folders(base, [tmp_path / n for n in "abc"], WEIGHTS, tmp_path / "out", how=how)
    assert all(
        torch.equal(v, base.state_dict()[k])
        for k, v in with_biases(TINY_MODELS["bert"])().state_dict().items()
    )

    expected = {
        k: v + sum(w * (merged_state(m)[k] - v) for w, m in zip(WEIGHTS, models))
        for k, v in base_state.items()
    }
    combined = load_adapter(with_biases(TINY_MODELS["bert"])(), tmp_path / "out")
    got = merged_state(combined)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=0, msg=key)

    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(with_biases(TINY_MODELS["bert"])(), str(tmp_path / "out"))
    batch = tiny_batch("bert")
    torch.testing.assert_close(
        model_output(theirs.eval(), batch), model_output(combined, batch), atol=1e-5, rtol=0
    )


def test_combined_dora_folders_match_the_effective_weights(tmp_path: Path) -> None:
    models = [
        trained(DoRA(r=2, target_modules=["query", "value"]), tmp_path / "a", 1),
        trained(LoRA(r=3, target_modules=["query"], use_rslora=True), tmp_path / "b", 2),
    ]
    base = with_biases(TINY_MODELS["bert"])()
    base_state = {k: v.double() for k, v in base.state_dict().items()}
    combine_adapter_folders(base, [tmp_path / "a", tmp_path / "b"], [0.5, 0.8], tmp_path / "out")
    combined = load_adapter(with_biases(TINY_MODELS["bert"])(), tmp_path / "out")
    assert type(combined.bert.encoder.layer[0].attention.self.query).__name__ == "DoRALinear"
    got = merged_state(combined)
    for key, value in base_state.items():
        want = value + sum(w * (merged_state(m)[key] - value) for w, m in zip([0.5, 0.8], models))
        torch.testing.assert_close(got[key], want, atol=1e-5, rtol=0, msg=key)


def test_ties_folder_combines_and_refuses_other_methods(tmp_path: Path) -> None:
    from lightning_peft import IA3

    trained(LoRA(r=2, target_modules=["query"]), tmp_path / "a", 1)
    trained(LoRA(r=2, target_modules=["query"]), tmp_path / "b", 2)
    trained(IA3(), tmp_path / "ia3", 3)
    base = with_biases(TINY_MODELS["bert"])()
    combine_adapter_folders(
        base, [tmp_path / "a", tmp_path / "b"], [1.0, 1.0], tmp_path / "ties", how="ties", rank=4
    )
    layer = (
        load_adapter(with_biases(TINY_MODELS["bert"])(), tmp_path / "ties")
        .bert.encoder.layer[0]
        .attention.self.query
    )
    assert layer.r == 4 and layer.scaling == 1.0
    with pytest.raises(ValueError, match="combines LoRA and DoRA adapters only.*IA3"):
        combine_adapter_folders(base, [tmp_path / "a", tmp_path / "ia3"], [1.0, 1.0], tmp_path / "bad")
    assert not any(type(m).__name__ == "LoRALinear" for m in base.modules())


@pytest.mark.parametrize("how", ["cat", "svd"])
def test_agrees_with_hf_peft_where_hf_peft_is_exact(tmp_path: Path, how: str) -> None:
    """HF PEFT's "cat", and its "svd" at the full rank, are exact for plain LoRA (no rsLoRA, no lora_bias, no
    DoRA: huggingface/peft#3761); there both must give the same model."""
    peft = pytest.importorskip("peft")
    trained(LoRA(r=2, alpha=4, target_modules=["query", "value"]), tmp_path / "a", 1)
    trained(LoRA(r=3, alpha=3, target_modules=["query", "key"]), tmp_path / "b", 2)
    theirs = peft.PeftModel.from_pretrained(
        with_biases(TINY_MODELS["bert"])(), str(tmp_path / "a"), adapter_name="a"
    )
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    options = {"svd_rank": 5} if how == "svd" else {}
    theirs.add_weighted_adapter(["a", "b"], [0.6, -0.9], "ab", combination_type=how, **options)
    theirs.set_adapter("ab")

    combine_adapter_folders(
        with_biases(TINY_MODELS["bert"])(),
        [tmp_path / "a", tmp_path / "b"],
        [0.6, -0.9],
        tmp_path / "ab",
        how=how,
        rank=5 if how == "svd" else None,
    )
    ours = load_adapter(with_biases(TINY_MODELS["bert"])(), tmp_path / "ab")
    batch = tiny_batch("bert")
    torch.testing.assert_close(
        model_output(ours, batch), model_output(theirs.eval(), batch), atol=1e-5, rtol=0
    )


def test_combines_an_hf_peft_adapter_with_ours(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query"], use_rslora=True, task_type="SEQ_CLS"
    )
    theirs = peft.get_peft_model(with_biases(TINY_MODELS["bert"])(), config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=g))
    theirs.save_pretrained(str(tmp_path / "hf"))
    ours = trained(LoRA(r=3, target_modules=["value"], modules_to_save=["classifier"]), tmp_path / "ours", 1)
    hf_as_ours = load_adapter(with_biases(TINY_MODELS["bert"])(), tmp_path / "hf")
    base = with_biases(TINY_MODELS["bert"])()
    base_state = {k: v.double() for k, v in base.state_dict().items()}
    combine_adapter_folders(base, [tmp_path / "hf", tmp_path / "ours"], [0.5, 0.5], tmp_path / "out")
    got = merged_state(load_adapter(with_biases(TINY_MODELS["bert"])(), tmp_path / "out"))
    for key, value in base_state.items():
        want = value + sum(0.5 * (merged_state(m)[key] - value) for m in (hf_as_ours, ours))
        torch.testing.assert_close(got[key], want, atol=1e-5, rtol=0, msg=key)
