"""The ``lightning-peft`` console script: LightningCLI with PEFT, plus adapter utilities.

``lightning-peft fit|validate|test|predict --config run.yaml`` is a plain
:class:`~lightning.pytorch.cli.LightningCLI` whose model and data module are chosen in the YAML by
``class_path``; PEFT comes from ``lightning_peft.PEFTCallback`` in ``trainer.callbacks``. On top of that:

* ``fit`` also writes the final adapter (``adapter_model.safetensors`` + ``adapter_config.json``) to
  ``<log_dir>/adapter``;
* ``predict`` writes one JSON line per example (``{"label": ..., "score": ...}``) to
  ``<log_dir>/predictions.jsonl``;
* ``lightning-peft classify --adapter PATH TEXT...`` classifies texts with a saved adapter
  (see :mod:`lightning_peft.cli.classify`);
* ``lightning-peft export-adapter CKPT OUT`` turns an adapter-only ``.ckpt`` into an adapter folder.

LightningCLI owns ``argv[1]`` as its subcommand, so the two extra commands are dispatched before it runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lightning_peft.cli.export import export_main
from lightning_peft.cli.lightning_cli import PEFTLightningCLI
from lightning_peft.cli.llm import LLM_COMMANDS, LLM_HELP
from lightning_peft.library_noise import silence_known_noise


def _compare_main(argv: Sequence[str]) -> int:
    from lightning_peft.cli.compare import main as compare_main

    return compare_main(argv)


def _classify_main(argv: Sequence[str]) -> int:
    from lightning_peft.cli.classify import main as classify_main

    return classify_main(argv)


EXTRA_HELP = """lightning-peft: LightningCLI with parameter-efficient fine-tuning.

Besides the LightningCLI subcommands below (fit, validate, test, predict; PEFT is a
lightning_peft.PEFTCallback entry in trainer.callbacks):
  classify        classify texts with a saved adapter (lightning-peft classify --help)
  export-adapter  write an adapter-only .ckpt as an adapter folder (lightning-peft export-adapter --help)
  compare         train several methods under one YAML recipe, side by side (lightning-peft compare --help)
"""
EXTRA_HELP += LLM_HELP


EXTRA_COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "classify": _classify_main,
    "export-adapter": export_main,
    "compare": _compare_main,
    **LLM_COMMANDS,  # generate, chat, merge, export-check (lightning_peft/cli/llm.py)
}


def cli(args: Sequence[str] | None = None, **kwargs: Any) -> PEFTLightningCLI | int:
    """Run one ``lightning-peft`` command in-process; returns the LightningCLI object (or an exit code for
    ``classify``/``export-adapter``)."""
    argv = list(sys.argv[1:] if args is None else args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    silence_known_noise()
    if argv and argv[0] in EXTRA_COMMANDS:
        return EXTRA_COMMANDS[argv[0]](argv[1:])
    if argv in ([], ["-h"], ["--help"]):
        print(EXTRA_HELP)  # LightningCLI's own help lists only its subcommands
    # like ``python -m``: class_paths of the user's own modules (e.g. examples.text_classification.X)
    # resolve from the working directory
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    # args=None lets LightningCLI read sys.argv itself (it warns when given both)
    return PEFTLightningCLI(args=None if args is None else argv, **kwargs)


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-peft`` console script (``args`` defaults to ``sys.argv[1:]``)."""
    result = cli(args)
    return result if isinstance(result, int) else 0
