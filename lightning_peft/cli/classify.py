"""``lightning-peft classify``: classify texts with a saved adapter (an adapter folder or an adapter-only
``.ckpt``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_peft.inference.pipeline import TextClassifierPipeline


# -- lightning-peft classify ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-peft classify",
        description="Classify texts with a saved adapter; prints one result per text.",
    )
    parser.add_argument("texts", nargs="*", help="texts to classify (or use --file)")
    parser.add_argument(
        "--adapter",
        required=True,
        help="adapter folder (adapter_config.json + adapter_model.safetensors) or .ckpt",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="base model name or path; 'minilm' = the packaged all-MiniLM-L6-v2 "
        "(default: the base model recorded with the adapter)",
    )
    parser.add_argument("--file", default=None, help="read texts from this file, one per line ('-' = stdin)")
    parser.add_argument("--labels", default=None, help="comma-separated class names, e.g. negative,positive")
    parser.add_argument("--num-labels", type=int, default=None, help="default: from the adapter's head")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--format", choices=("jsonl", "table"), default="jsonl", help="JSON lines (default) or a text table"
    )
    return parser


def read_texts(file: str | None, texts: Sequence[str]) -> list[str]:
    lines = list(texts)
    if file is not None:
        data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise UnicodeDecodeError(
                error.encoding, error.object, error.start, error.end,
                f"not UTF-8 text (byte 0x{data[error.start]:02x} on line {line} cannot be decoded)",
            ) from None  # fmt: skip
        lines += [line for line in text.splitlines() if line.strip()]
    return lines


def format_rows(texts: Sequence[str], rows: Sequence[dict[str, Any]], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(
            json.dumps({"text": t, "label": r["label"], "score": round(r["score"], 6)}) + "\n"
            for t, r in zip(texts, rows)
        )
    width = max([len(str(r["label"])) for r in rows] + [5])
    lines = [f"{'label':<{width}}  score   text"]
    lines += [f"{str(r['label']):<{width}}  {r['score']:.4f}  {t}" for t, r in zip(texts, rows)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        texts = read_texts(args.file, args.texts)
    except (OSError, UnicodeDecodeError) as error:
        parser.error(f"--file {args.file}: {error}")
    if not texts:
        parser.error("give texts to classify, or --file")
    empty = [i for i, text in enumerate(args.texts, 1) if not text.strip()]
    if empty:
        parser.error(f"text {empty[0]} is empty; give non-empty texts to classify")
    labels = [name.strip() for name in args.labels.split(",")] if args.labels else None
    try:
        pipeline = TextClassifierPipeline.from_adapter(
            args.adapter,
            base_model=args.model,
            labels=labels,
            num_labels=args.num_labels,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))  # a message, not a traceback, for a wrong path or option
    sys.stdout.write(format_rows(texts, pipeline.predict_texts(texts), args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
