"""Adapter folders on the Hugging Face Hub: ``load_adapter(model, "org/name")``.

A path that is not a local folder and looks like a Hub repository id (``"org/name"``, optionally followed by a
subfolder: ``"org/name/sub"``) is fetched with ``huggingface_hub.snapshot_download`` (a transformers dependency),
restricted to the adapter files. With ``HF_HUB_OFFLINE=1`` (or when the Hub cannot be reached) the local Hub cache
answers instead (``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lightning_peft.files.names import ADAPTER_FILES, ADAPTERHUB_FILES

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: file names that are never Hub repository ids
LOCAL_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".json")


def _offline() -> bool:
    return any(
        os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_repo(text: str) -> tuple[str, str | None] | None:
    """``("org/name", subfolder or None)`` when ``text`` reads as a Hub repository id, else ``None``."""
    parts = text.split("/")
    if len(parts) < 2 or not all(_REPO_PART.match(p) for p in parts) or any(p in (".", "..") for p in parts):
        return None
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def resolve_adapter_path(path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local path as it is; a Hub repository id as the folder of its (downloaded or cached) snapshot."""
    local = Path(path)
    repo = None if local.exists() or local.suffix in LOCAL_SUFFIXES else hub_repo(str(path))
    if repo is None:
        return local  # a local path (the reader says what is wrong with it, if anything)
    repo_id, subfolder = repo
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:  # pragma: no cover - a transformers dependency
        raise FileNotFoundError(
            f"path={str(path)!r} is not a folder, and huggingface_hub is not installed"
        ) from error
    patterns = [f"{subfolder}/{name}" if subfolder else name for name in ADAPTER_FILES + ADAPTERHUB_FILES]
    try:
        snapshot = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, local_files_only=_offline()
        )
    except Exception as error:  # noqa: BLE001 - every failure means "not available here"
        where = (
            "in the local Hub cache (HF_HUB_OFFLINE is set)" if _offline() else "on the Hub or in its cache"
        )
        raise FileNotFoundError(
            f"path={str(path)!r} is not a local folder, and the adapter repository {repo_id!r} was not found "
            f"{where}: {type(error).__name__}: {error}"
        ) from error
    folder = Path(snapshot) / subfolder if subfolder else Path(snapshot)
    return folder
