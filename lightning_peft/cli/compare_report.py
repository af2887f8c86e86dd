"""The outputs of ``lightning-peft compare``: one row per method (mean ± std over seeds) as Markdown and CSV,
and two plots (the validation metric against trainable parameters and against training time).

The metric columns are accuracy when the runs logged one (classification, chat answers with choices), else the
loss (chat SFT on free-form answers). A method that refused the model at attach gets a row saying so and its
reason under the table."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MEASURES = (
    "val_acc",
    "test_acc",
    "step_ms",
    "train_seconds",
    "peak_memory_mib",
    "latency_unmerged_ms",
    "latency_merged_ms",
    "val_loss",
    "test_loss",
)


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for fewer than two values) of the values that exist."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None


def aggregate(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method, in the order the methods first appear."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_method.setdefault(result["method"], []).append(result)
    rows = []
    for method, all_runs in by_method.items():
        runs = [r for r in all_runs if not r.get("refused")]
        first = runs[0] if runs else {}
        row: dict[str, Any] = {
            "method": method,
            "seeds": " ".join(str(r["seed"]) for r in all_runs),
            "trainable": first.get("trainable"),
            "trainable_pct": first.get("trainable_pct"),
            "adapter_bytes": first.get("adapter_bytes"),
            "adapter_is_full_model": first.get("adapter_is_full_model", False),
            "lr": all_runs[0]["lr"],
            "steps": first.get("steps"),
        }
        for measure in MEASURES:
            row[f"{measure}_mean"], row[f"{measure}_std"] = mean_std([r.get(measure) for r in runs])
        refusals = [r for r in all_runs if r.get("refused")]
        row["refused"] = refusals[0]["refused"] if refusals else None
        rows.append(row)
    return rows


def metric_kind(rows: Sequence[dict[str, Any]]) -> str:
    """``"acc"`` when any run logged an accuracy, else ``"loss"`` (when any logged a loss)."""
    if any(r["val_acc_mean"] is not None or r["test_acc_mean"] is not None for r in rows):
        return "acc"
    has_loss = any(r["val_loss_mean"] is not None or r["test_loss_mean"] is not None for r in rows)
    return "loss" if has_loss else "acc"


def _pct(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.1f}%" + (f" ± {100 * std:.1f}" if std is not None else "")


def _loss(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def human_bytes(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    kind = metric_kind(rows)
    show = _pct if kind == "acc" else _loss
    header = (
        f"| method | trainable params | trainable % | val {kind} | test {kind} | ms / step | train time (s) "
        "| peak memory (MiB) | adapter size | inference unmerged (ms) | inference merged (ms) | seeds |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["trainable"] is None:  # every seed refused: nothing was trained
            lines.append(f"| {r['method']} | refused (see below) |" + " |" * 9 + f" {r['seeds']} |")
            continue
        size = human_bytes(r["adapter_bytes"]) + (" (whole model)" if r["adapter_is_full_model"] else "")
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.2f}% "
            f"| {show(r[f'val_{kind}_mean'], r[f'val_{kind}_std'])} "
            f"| {show(r[f'test_{kind}_mean'], r[f'test_{kind}_std'])} "
            f"| {_num(r['step_ms_mean'], '.0f')} | {_num(r['train_seconds_mean'], '.0f')} "
            f"| {_num(r['peak_memory_mib_mean'], '.0f')} | {size} "
            f"| {_num(r['latency_unmerged_ms_mean'], '.1f')} | {_num(r['latency_merged_ms_mean'], '.1f')} "
            f"| {r['seeds']} |"
        )
    refused = [r for r in rows if r["refused"]]
    if refused:
        lines += ["", "Refused at attach (not trained):", ""]
        lines += [f"* **{r['method']}**: {r['refused']}" for r in refused]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    fields = list(rows[0]) if rows else ["method"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def label_offsets(
    anchors: Sequence[tuple[float, float]], names: Sequence[str], height: float = 9.0, first: float = 4.0
) -> list[float]:
    """Vertical offsets (points) for labels written to the right of their points (``anchors``, in points), so
    that no two labels overlap: a label that would cover an earlier one moves down one line at a time."""
    placed: list[tuple[float, float, float]] = []  # (left x, baseline y, width) of the labels so far
    offsets = []
    for (x, y), name in zip(anchors, names, strict=True):
        width = 5.0 * len(name)  # about 5 points per character at font size 8
        dy = first
        while any(abs(x - px) < max(width, pw) and abs((y + dy) - py) < height for px, py, pw in placed):
            dy -= height
        placed.append((x, y + dy, width))
        offsets.append(dy)
    return offsets


def write_plots(rows: Sequence[dict[str, Any]], output: Path) -> dict[str, Path]:
    """Validation accuracy (or loss, see :func:`metric_kind`) against trainable parameters (log x) and against
    training time; needs matplotlib (the ``plots`` extra). Returns the files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'lightning-peft[plots]')")
        return {}
    written = {}
    kind = metric_kind(rows)
    metric, scale = (f"val_{kind}_mean", 100.0 if kind == "acc" else 1.0)
    ylabel = "validation accuracy (%)" if kind == "acc" else "validation loss (per answer token)"
    for name, key, label, log in (
        ("accuracy_vs_params.png", "trainable", "trainable parameters", True),
        ("accuracy_vs_time.png", "train_seconds_mean", "training time (s)", False),
    ):
        points = [r for r in rows if r[metric] is not None and r[key] is not None]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for r in points:
            y, err = scale * r[metric], scale * (r[f"val_{kind}_std"] or 0.0)
            ax.errorbar(r[key], y, yerr=err or None, fmt="o", capsize=3)
        if log:
            ax.set_xscale("log")
        ax.autoscale_view()
        # methods with (nearly) the same figures, e.g. LoRA and DoRA, would print their names on top of each other
        to_points = 72.0 / fig.dpi
        anchors = [
            tuple(float(v) * to_points for v in ax.transData.transform((r[key], scale * r[metric])))
            for r in points
        ]
        offsets = label_offsets(anchors, [r["method"] for r in points])
        for r, dy in zip(points, offsets, strict=True):
            xy = (r[key], scale * r[metric])
            ax.annotate(r["method"], xy, textcoords="offset points", xytext=(5, dy), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(output / name)
        plt.close(fig)
        written[name] = output / name
    return written


def write_reports(results: Sequence[dict[str, Any]], output: Path) -> dict[str, Path]:
    rows = aggregate(results)
    (output / "results.md").write_text(markdown(rows))
    write_csv(rows, output / "results.csv")
    return {
        "results.md": output / "results.md",
        "results.csv": output / "results.csv",
        **write_plots(rows, output),
    }
