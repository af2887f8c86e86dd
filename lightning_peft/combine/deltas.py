"""Combining several LoRA/DoRA adapters of one base model into one adapter: the math, layer by layer.

Every adapter ``i`` of a target layer with base weight ``W`` (out × in) is taken as its *delta weight*, with its
own scaling folded in (``s_i = alpha_i / r_i``, or ``alpha_i / sqrt(r_i)`` with rsLoRA, and ``lora_bias`` as an
extra column):

    ΔW_i = s_i · B_i A_i,        Δb_i = s_i · b_i      (b_i = 0 without lora_bias)

and the combination with weights ``w_i`` is defined on those deltas (``how``):

=================  =========================================================================================
``"linear"``       ΔW = Σ w_i ΔW_i, exactly, re-factorised by SVD at rank min(Σ r_i, out, in)
``"cat"``          ΔW = Σ w_i ΔW_i, exactly, as the concatenation A = [A_1; …], B = [w_1 s_1 B_1, …] (rank Σ r_i)
``"svd"``          the best rank-k approximation (Eckart–Young) of Σ w_i ΔW_i, k = ``rank`` (default max r_i)
``"ties"``         TIES-merging (Yadav et al. 2023, arXiv:2306.01708) of the task vectors τ_i = w_i ΔW_i:
                   trim each τ_i to its top ``density`` fraction by magnitude, elect the sign of every entry
                   (``"total"``: sign of Σ τ̂_i; ``"frequency"``: sign of Σ sign(τ̂_i)), and average the entries
                   that agree with it: ΔW[p] = Σ_{i: sign τ̂_i[p] = γ[p]} τ̂_i[p] / |{i : sign τ̂_i[p] = γ[p]}|
``"dare_linear"``  DARE (Yu et al. 2023, arXiv:2311.03099): drop each entry of ΔW_i with probability 1 − density
                   and rescale the rest by 1 / density, then ΔW = Σ w_i DARE(ΔW_i)
``"dare_ties"``    DARE on each ΔW_i (instead of TIES' trimming), then TIES' sign election and disjoint mean
=================  =========================================================================================

The weights multiply the task vectors before the sign election (so ``w_i = λ`` for all i is the paper's λ·mean).
TIES and DARE change single entries, so their result is in general of full rank: it is stored exactly (rank
min(out, in)) unless ``rank`` asks for a truncation. The combined adapter has scaling 1 (``alpha = r``).

DoRA (``W'_i = m_i ⊙ (W + ΔW_i) / n_i`` with ``n_i = ‖W + ΔW_i‖`` per row) is combined on the effective weights,
``W* = W + Σ w_i (W'_i − W)``. Row by row ``W* = α ⊙ (W + D)`` with

    α = 1 + Σ w_i (m_i / n_i − 1),        D = Σ_i diag(w_i m_i / (n_i α)) ΔW_i       (rank ≤ Σ r_i)

so ``linear`` and ``cat`` are exact DoRA adapters with direction update D and magnitude ``m = α ⊙ ‖W + D‖``; ``svd``
truncates D and keeps that magnitude. A plain LoRA adapter in the mix counts as ``m_i = n_i``. There is no exact
meaning, and an error, for: DoRA without the base weight (its update depends on W), TIES/DARE with DoRA (a DoRA
update mixes W into every entry, so trimming entries leaves no DoRA adapter below full rank), and rows with
α = 0 (the combined row is not a rescaled W + D).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


@dataclass
class LoRAFactors:
    """One adapter on one layer: ``A`` (r × in), ``B`` (out × r), its scaling, and optionally DoRA's magnitude
    ``m`` (out,) and lora_bias' ``bias`` (out,)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:
        """s · B A as an (out, in) float64 matrix."""
        return self.scaling * (self.B.double() @ self.A.double())

    def bias_delta(self) -> torch.Tensor | None:
        return None if self.bias is None else self.scaling * self.bias.double()


def check_combination(
    how: str, weights: Sequence[float], count: int, density: float, majority_sign: str
) -> list[float]:
    """Validate the options shared by :func:`combine_layer` and the folder-level ``combine_adapters``."""
    if how not in COMBINATIONS:
        raise ValueError(f"how must be one of {', '.join(map(repr, COMBINATIONS))}, got {how!r}")
    if count < 1:
        raise ValueError("combining needs at least one adapter, got none")
    values = list(weights)
    if len(values) != count or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and torch.isfinite(torch.tensor(float(w)))
        for w in values
    ):
        raise ValueError(f"weights must be {count} finite numbers (one per adapter), got {list(weights)!r}")
    if how in ("ties", "dare_linear", "dare_ties") and not (
        isinstance(density, (int, float)) and 0.0 < density <= 1.0
    ):
        raise ValueError(f"density must be a number in (0, 1] for how={how!r}, got {density!r}")
    if majority_sign not in SIGN_METHODS:
        raise ValueError(f"majority_sign must be one of {SIGN_METHODS}, got {majority_sign!r}")
    return [float(w) for w in values]


# -- the formulas on full delta matrices ------------------------------------------------------------------
def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep the ``density`` fraction of entries with the largest magnitude, zero the rest."""
    keep = max(1, round(density * tau.numel())) if density > 0 else 0
    if keep >= tau.numel():
        return tau.clone()
    threshold = tau.abs().flatten().kthvalue(tau.numel() - keep + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def dare(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability 1 − density, rescale the kept ones by 1 / density."""
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float64) < density
    return torch.where(keep, tau / density, torch.zeros_like(tau))


def disjoint_merge(taus: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """TIES steps 2-3 on stacked task vectors (n, ...): elect a sign per entry, average the agreeing entries."""
    signs = torch.sign(taus)
    elected = torch.sign(taus.sum(0) if majority_sign == "total" else signs.sum(0))
    agree = (signs == elected) & (taus != 0)
    count = agree.sum(0).clamp(min=1)
    return (taus * agree).sum(0) / count


def combine_deltas(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    how: str,
    density: float = 0.5,
    majority_sign: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The combined delta (any shape, entrywise for TIES/DARE) of the full deltas ``ΔW_i``; ``"cat"`` and
    ``"svd"`` combine like ``"linear"`` here (they differ only in how the result is factorised)."""
    weights = check_combination(how, weights, len(deltas), density, majority_sign)
    taus = torch.stack([w * d.double() for w, d in zip(weights, deltas)])  # (n, ...)
    if how in ("linear", "cat", "svd"):
        return taus.sum(0)
    if how == "ties":
        return disjoint_merge(torch.stack([trim(t, density) for t in taus]), majority_sign)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    # DARE draws its mask on the unweighted ΔW_i; dropping commutes with the weight
    dropped = torch.stack([dare(t, density, generator) for t in taus])
    return dropped.sum(0) if how == "dare_linear" else disjoint_merge(dropped, majority_sign)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A the best rank-``rank`` approximation of ``delta`` (exact when rank ≥ its rank)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    return root[:, None] * vh[:k], u[:, :k] * root[None, :]


# -- one layer ----------------------------------------------------------------------------------------------
def combine_layer(
    adapters: Sequence[LoRAFactors],
    weights: Sequence[float],
    how: str = "linear",
    *,
    rank: int | None = None,
    density: float = 0.5,
    majority_sign: str = "total",
    base_weight: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> LoRAFactors:
    """The adapter (scaling 1) that combines ``adapters`` on one layer; see the module docstring for each
    ``how``. ``base_weight`` (out × in) is needed when a DoRA adapter is among them."""
    weights = check_combination(how, weights, len(adapters), density, majority_sign)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
    dtype = adapters[0].A.dtype
    if any(a.magnitude is not None for a in adapters):
        return _combine_dora(adapters, weights, how, rank, base_weight, dtype)
    out_features, in_features = adapters[0].B.shape[0], adapters[0].A.shape[1]
    biases = [a.bias_delta() for a in adapters]
    has_bias = any(b is not None for b in biases)
    if how == "cat":
        a_cat = torch.cat([a.A.double() for a in adapters])
        b_cat = torch.cat([w * a.scaling * a.B.double() for w, a in zip(weights, adapters)], dim=1)
        bias = _weighted_bias(biases, weights, out_features) if has_bias else None
        return _factors(a_cat, b_cat, bias, dtype)
    # lora_bias is one more column of the task vector (TIES/DARE treat its entries like the weights')
    deltas = [a.delta() for a in adapters]
    if has_bias:
        zeros = torch.zeros(out_features, dtype=torch.float64)
        deltas = [torch.cat([d, (b if b is not None else zeros)[:, None]], 1) for d, b in zip(deltas, biases)]
    combined = combine_deltas(deltas, weights, how, density, majority_sign, generator)
    bias = combined[:, in_features] if has_bias else None
    combined = combined[:, :in_features]
    if how == "svd":
        k = rank or max(a.rank for a in adapters)
    elif how == "linear":
        k = rank or min(sum(a.rank for a in adapters), out_features, in_features)
    else:
        k = rank or min(out_features, in_features)
    a_new, b_new = low_rank(combined, k)
    return _factors(a_new, b_new, bias, dtype)


def _weighted_bias(biases: list[torch.Tensor | None], weights: list[float], size: int) -> torch.Tensor:
    total = torch.zeros(size, dtype=torch.float64)
    for w, b in zip(weights, biases):
        if b is not None:
            total += w * b
    return total


def _factors(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    magnitude: torch.Tensor | None = None,
) -> LoRAFactors:
    return LoRAFactors(
        A=a.to(dtype).contiguous(),
        B=b.to(dtype).contiguous(),
        scaling=1.0,
        magnitude=None if magnitude is None else magnitude.to(dtype),
        bias=None if bias is None else bias.to(dtype),
    )


def dora_norm(base_weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """‖W + ΔW‖ per output row, in float64."""
    return torch.linalg.vector_norm(base_weight.double() + delta, dim=1)


def _combine_dora(
    adapters: Sequence[LoRAFactors],
    weights: list[float],
    how: str,
    rank: int | None,
    base_weight: torch.Tensor | None,
    dtype: torch.dtype,
) -> LoRAFactors:
    if how not in ("linear", "cat", "svd"):
        raise ValueError(
            f"how={how!r} has no exact meaning for DoRA adapters: a DoRA update W' − W = (m/‖W + ΔW‖ − 1) ⊙ W + … "
            "mixes the base weight into every entry, so trimming or dropping entries leaves no DoRA adapter of a "
            "rank below full; combine DoRA adapters with how='linear', 'cat' or 'svd'"
        )
    if base_weight is None:
        raise ValueError(
            "combining DoRA adapters needs base_weight (the layer's (out, in) weight W): a DoRA update depends on "
            "W through the norm ‖W + ΔW‖"
        )
    if any(a.bias is not None for a in adapters):
        raise ValueError("lora_bias is not defined for DoRA adapters; got a DoRA combination with a bias")
    weight = base_weight.double()
    ratios = []  # m_i / n_i per row; 1 for a plain LoRA adapter
    for a in adapters:
        if a.magnitude is None:
            ratios.append(torch.ones(weight.shape[0], dtype=torch.float64))
        else:
            ratios.append(a.magnitude.double() / dora_norm(weight, a.delta()))
    alpha = 1 + sum(w * (r - 1) for w, r in zip(weights, ratios))
    zero_rows = (alpha.abs() < 1e-12).nonzero().flatten().tolist()
    if zero_rows:
        raise ValueError(
            f"the combined DoRA weight has rows {zero_rows[:5]} where 1 + Σ w_i (m_i/‖W + ΔW_i‖ − 1) = 0: those "
            "rows are not a rescaled W + low-rank update, so no DoRA adapter represents them; change the weights"
        )
    # D = Σ_i diag(w_i m_i / (n_i α)) s_i B_i A_i as a concatenation (rank Σ r_i)
    a_cat = torch.cat([a.A.double() for a in adapters])
    b_cat = torch.cat(
        [(w * r / alpha)[:, None] * (a.scaling * a.B.double()) for w, r, a in zip(weights, ratios, adapters)],
        1,
    )
    exact_norm = dora_norm(weight, b_cat @ a_cat)
    magnitude = alpha * exact_norm  # = ‖W*‖ with the sign of α
    if how == "linear" or how == "svd":
        out_features, in_features = weight.shape
        total = sum(a.rank for a in adapters)
        k = rank or (max(a.rank for a in adapters) if how == "svd" else min(total, out_features, in_features))
        a_cat, b_cat = low_rank(b_cat @ a_cat, k)
    return _factors(a_cat, b_cat, None, dtype, magnitude)


def dora_weight(base_weight: torch.Tensor, factors: LoRAFactors) -> torch.Tensor:
    """The effective weight ``m ⊙ (W + ΔW) / ‖W + ΔW‖`` of a DoRA adapter (``W + ΔW`` for a LoRA one)."""
    delta = factors.delta()
    combined = base_weight.double() + delta
    if factors.magnitude is None:
        return combined
    return (factors.magnitude.double() / dora_norm(base_weight, delta))[:, None] * combined
