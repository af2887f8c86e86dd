"""Single- vs multi-process equivalence of lightning-peft training on CPU (gloo), as one table.

Runs ``tests/distributed_script.py`` in each mode (the same runs the CI tests assert on): tiny BERT with LoRA
r=4 on query/value plus the classifier, 32 samples, 2 epochs (4 AdamW steps), dropout off. Two processes
with batch 8 each are compared with one process with batch 16, and a run resumed from the epoch-1 checkpoint
with the uninterrupted run. Prints the largest absolute difference over every adapter tensor.

    python benchmarks/distributed_equivalence.py [--json PATH]      # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from distributed_script import max_diff, reference_adapter, run_script  # noqa: E402

#: mode -> (label, final tensors of rank 0 and 1, resumed tensors or None)
RUNS: dict[str, list[tuple[str, str, str, str | None]]] = {
    "ddp": [("DDP, PEFTCallback", "final_rank0.pt", "final_rank1.pt", "resumed_rank0.pt")],
    "ddp_spawn": [
        ("ddp_spawn, PEFTCallback", "spawn_final_rank0.pt", "spawn_final_rank1.pt", None),
        (
            "ddp_spawn, PEFTMixin (main process after fit)",
            "spawn_mixin_main.pt",
            "spawn_final_rank0.pt",
            None,
        ),
    ],
    "fsdp2": [
        (
            "FSDP2 (ModelParallelStrategy), PEFTCallback",
            "final_rank0.pt",
            "final_rank1.pt",
            "resumed_rank0.pt",
        ),
        ("FSDP2, PEFTMixin (apply_peft before fully_shard)", "mixin_rank0.pt", "mixin_rank1.pt", None),
    ],
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    reference = reference_adapter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, runs in RUNS.items():
            out = Path(tmp) / mode
            print(f"running {mode} (2 processes) ...", flush=True)
            run_script(out, mode)
            for label, first, second, resumed in runs:
                final = torch.load(out / first)
                rows.append(
                    {
                        "run": label,
                        "vs_one_process": max_diff(final, reference),
                        "between": max_diff(final, torch.load(out / second)),
                        "resume": None if resumed is None else max_diff(torch.load(out / resumed), final),
                    }
                )
    lines = [
        "| run | max abs diff vs 1 process × batch 16 | vs the other copy | resumed vs uninterrupted |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        resume = "" if r["resume"] is None else f"{r['resume']:.1e}"
        lines.append(f"| {r['run']} | {r['vs_one_process']:.1e} | {r['between']:.1e} | {resume} |")
    table = "\n".join(lines)
    print(table, flush=True)
    results = {"environment": common.environment(), "rows": rows, "table": table}
    if args.json:
        common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
