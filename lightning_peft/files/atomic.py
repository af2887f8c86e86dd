"""Replacing an adapter folder as a unit: a reader finds the old save or the new one, never a mix or a torn file.

``replace_folder(dest, write)`` lets ``write`` fill a temporary sibling folder (``.NAME.tmp-XXXX``), flushes
every file and the folder to disk, and then swaps it in with renames, which are atomic on POSIX file systems:

1. no ``dest`` yet: ``rename(tmp, dest)``;
2. ``dest`` exists: ``rename(dest, .NAME.old-XXXX)``, ``rename(tmp, dest)``, then the old folder is deleted.

A process killed between the two renames of case 2 leaves no ``dest``, a complete ``.NAME.old-XXXX`` and the
complete ``.NAME.tmp-XXXX``; :func:`recover` (called by every save and every load) renames the old folder
back. Other leftovers (a ``.tmp-`` folder of a killed write, an ``.old-`` folder of a killed clean-up) are
ignored by readers and deleted by the next save. Files in ``dest`` that the save does not write (a README, a
tokenizer) are carried over to the new folder (hard links where possible).

One writer per folder at a time (several processes saving to the same folder concurrently are not supported).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

TMP_TAG = ".tmp-"
OLD_TAG = ".old-"


def _siblings(dest: Path, tag: str) -> list[Path]:
    parent = dest.parent
    if not parent.is_dir():
        return []
    prefix = f".{dest.name}{tag}"
    found = []
    for path in parent.iterdir():
        if path.name.startswith(prefix):
            try:
                found.append((path.stat().st_mtime, path))
            except FileNotFoundError:  # removed meanwhile by a finishing save
                continue
    return [path for _, path in sorted(found)]


def recover(dest: str | os.PathLike) -> None:
    """Finish a replacement interrupted between its two renames: put the last complete folder back."""
    dest = Path(dest)
    if dest.exists():
        return
    # mid-swap, the save's temporary folder still exists next to the old one (every save first deletes older
    # leftovers); an old folder alone is a leftover of a completed swap whose destination was deleted since
    old = [p for p in _siblings(dest, OLD_TAG) if p.is_dir() and any(p.iterdir())]
    if old and _siblings(dest, TMP_TAG):
        try:
            os.rename(old[-1], dest)
        except OSError:  # another process recovered it first, or dest appeared meanwhile
            pass


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - e.g. directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems do not support fsync on directories
        pass
    finally:
        os.close(fd)


def _carry_over(source: Path, target: Path, written: Iterable[str]) -> None:
    skip = set(written)
    for entry in source.iterdir():
        if entry.name in skip or (target / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target / entry.name, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(str(entry), str(target / entry.name))


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def replace_folder(dest: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a fresh temporary folder, then make it ``dest`` in one step (see module doc).

    If ``write`` raises, ``dest`` is left exactly as it was and the temporary folder is removed.
    """
    dest = Path(os.path.abspath(dest))
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"path={str(dest)!r} exists and is not a folder")
    cwd = Path.cwd().resolve()
    if dest.exists() and (cwd == dest.resolve() or dest.resolve() in cwd.parents):
        raise ValueError(
            f"path={str(dest)!r} is (or holds) the working directory, which a save replaces as a whole; "
            "name a folder for the adapter, e.g. 'adapter/'"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest)
    for stale in _siblings(dest, TMP_TAG) + _siblings(dest, OLD_TAG):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{TMP_TAG}", dir=dest.parent))
    try:
        write(tmp)
        written = [p.name for p in tmp.iterdir()]
        if dest.is_dir():
            _carry_over(dest, tmp, written)
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                _fsync(path)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.is_dir():
        old = dest.with_name(f".{dest.name}{OLD_TAG}{uuid.uuid4().hex}")
        os.rename(dest, old)  # from here until the next rename, recover() would put ``old`` back
        os.rename(tmp, dest)
        _fsync(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)
        _fsync(dest.parent)
    return dest


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace one file atomically: write a temporary sibling, flush it, rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent)
