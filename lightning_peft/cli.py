"""The ``lightning-peft`` console script: LightningCLI with PEFT, plus adapter utilities.

``lightning-peft fit|validate|test|predict --config run.yaml`` is a plain
:class:`~lightning.pytorch.cli.LightningCLI` whose model and data module are chosen in the YAML by
``class_path``; PEFT comes from ``lightning_peft.PEFTCallback`` in ``trainer.callbacks``. On top of that:

* ``fit`` also writes the final adapter (``adapter_model.safetensors`` + ``adapter_config.json``) to
  ``<log_dir>/adapter``;
* ``predict`` writes one JSON line per example (``{"label": ..., "score": ...}``) to
  ``<log_dir>/predictions.jsonl``;
* ``lightning-peft classify --adapter PATH TEXT...`` classifies texts with a saved adapter
  (see :mod:`lightning_peft.predict`);
* ``lightning-peft export-adapter CKPT OUT`` turns an adapter-only ``.ckpt`` into an adapter folder.

LightningCLI owns ``argv[1]`` as its subcommand, so the two extra commands are dispatched before it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_peft.atomic import write_text
from lightning_peft.cli_llm import LLM_COMMANDS, LLM_HELP
from lightning_peft.io import ADAPTER_CONFIG, save_adapter
from lightning_peft.methods import PEFTMethod
from lightning_peft.predict import AUTO_CLASSES, load_adapted_model
from lightning_peft.quiet import silence_known_noise
from lightning_peft.record import attached_methods, is_attached
from lightning_peft.safe_load import refusing_pickles


def _configure_jsonargparse() -> None:
    import jsonargparse
    from jsonargparse import set_parsing_settings

    # field docstrings of the method dataclasses become --help text
    try:
        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except TypeError:  # pragma: no cover - older jsonargparse
        jsonargparse.set_docstring_parse_options(attribute_docstrings=True)
    # jsonargparse closes pure dataclasses to subclasses; a method is picked by class_path (LoRA, IA3, ...)
    # wherever a parameter is typed PEFTMethod. Older jsonargparse has no such setting (nor needs it).
    try:
        set_parsing_settings(subclasses_enabled=[PEFTMethod])
    except TypeError:  # pragma: no cover - jsonargparse < 4.46
        pass


class PEFTLightningCLI(LightningCLI):
    """LightningCLI that saves the adapter after ``fit`` and the predictions after ``predict``.

    Any LightningModule/LightningDataModule can be named in the YAML (subclass mode); PEFT is configured by
    ``lightning_peft.PEFTCallback`` in ``trainer.callbacks``, exactly as in a user's own LightningCLI.
    """

    def __init__(
        self,
        model_class: type[LightningModule] | Callable[..., LightningModule] | None = LightningModule,
        datamodule_class: type[LightningDataModule] | Callable[..., LightningDataModule] | None = None,
        **kwargs: Any,
    ) -> None:
        _configure_jsonargparse()
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            model_class, datamodule_class if datamodule_class is not None else LightningDataModule, **kwargs
        )

    def _log_dir(self) -> Path:
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # a checkpoint named by --ckpt_path is read with weights_only=True; a refused one gets our message
    def _parse_ckpt_path(self) -> None:
        ckpt_path = (self.config.get(self.config.get("subcommand") or "") or {}).get("ckpt_path")
        parse = getattr(super(), "_parse_ckpt_path", None)  # (a LightningCLI internal, absent before 2.5)
        if parse is not None:
            with refusing_pickles(ckpt_path):
                parse()  # reads the checkpoint's hyper_parameters

    def _read_checkpoint_safely(self, run: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        if kwargs.get("weights_only") is None and "weights_only" in kwargs:
            kwargs["weights_only"] = True  # whatever torch's default is
        with refusing_pickles(kwargs.get("ckpt_path")):
            return run(**kwargs)

    def fit(self, **kwargs: Any) -> None:
        self._read_checkpoint_safely(self.trainer.fit, kwargs)

    def validate(self, **kwargs: Any) -> None:
        self._read_checkpoint_safely(self.trainer.validate, kwargs)

    def test(self, **kwargs: Any) -> None:
        self._read_checkpoint_safely(self.trainer.test, kwargs)

    def after_fit(self) -> None:
        if not is_attached(self.model):
            return
        # every rank: under FSDP2 save_adapter gathers the sharded tensors (a collective); rank 0 writes
        folder = save_adapter(self.model, self._log_dir() / "adapter")
        if not self.trainer.is_global_zero:
            return
        hparams = getattr(self.model, "hparams", {})
        record_metadata(folder, hparams.get("model_name_or_path"), label_names(self.model))
        rank_zero_info(f"lightning-peft: adapter saved to {folder}")

    def predict(self, **kwargs: Any) -> None:
        # Trainer.predict's return value is dropped by LightningCLI; keep it to write it out
        predictions = self._read_checkpoint_safely(self.trainer.predict, kwargs)
        if not self.trainer.is_global_zero or predictions is None:
            return
        labels = label_names(self.model)
        rows = prediction_rows(predictions, labels)
        path = self._log_dir() / "predictions.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        rank_zero_info(f"lightning-peft: {len(rows)} predictions written to {path}")


def record_metadata(folder: Path, base_model: str | None, labels: Sequence[str] | None) -> None:
    """Add HF PEFT's ``base_model_name_or_path`` (if missing) and the class names (``label_names``) to an
    adapter folder's ``adapter_config.json``, so that ``classify`` needs neither ``--model`` nor ``--labels``.
    HF PEFT ignores the extra key."""
    config_file = folder / ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    if base_model is not None and not config.get("base_model_name_or_path"):
        config["base_model_name_or_path"] = base_model
    if labels:
        config["label_names"] = list(labels)
    write_text(config_file, json.dumps(config, indent=2, sort_keys=True))  # atomic: never a torn JSON


def label_names(module: torch.nn.Module) -> list[str] | None:
    """Class names from a transformers config's ``id2label`` inside ``module``, unless they are the generic
    ``LABEL_0``, ``LABEL_1``, ... placeholders."""
    for sub in module.modules():
        id2label = getattr(getattr(sub, "config", None), "id2label", None)
        if isinstance(id2label, dict) and id2label:
            names = [str(id2label[i]) for i in sorted(id2label)]
            if names != [f"LABEL_{i}" for i in range(len(names))]:
                return names
            return None
    return None


def prediction_rows(predictions: Sequence[Any], labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One ``{"label", "score"}`` dict per example from per-batch ``(batch, classes)`` score tensors.

    Rows that do not sum to one are treated as logits and go through a softmax first.
    """
    rows: list[dict[str, Any]] = []
    for batch in predictions:
        scores = batch.logits if hasattr(batch, "logits") else batch
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
            raise TypeError(
                "predict: the LightningModule's predict_step must return a (batch, classes) tensor of scores "
                f"to be written as labels, got {type(scores).__name__}"
                + (f" of shape {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else "")
            )
        scores = scores.detach().float().cpu()
        if not torch.allclose(scores.sum(-1), torch.ones(len(scores)), atol=1e-3) or (scores < 0).any():
            scores = scores.softmax(-1)
        best, index = scores.max(-1)
        for score, i in zip(best.tolist(), index.tolist()):
            label: str | int = labels[i] if labels is not None and i < len(labels) else i
            rows.append({"label": label, "score": round(score, 6)})
    return rows


# -- export-adapter ------------------------------------------------------------------------------------
def export_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-peft export-adapter",
        description="Write the adapter held in an adapter-only Lightning checkpoint (.ckpt) as an adapter "
        "folder (adapter_model.safetensors + adapter_config.json, HF PEFT's layout). The base model is rebuilt "
        "from what the checkpoint records (its name or path and its task: classifier, causal LM, ...).",
    )
    parser.add_argument("checkpoint", help="a .ckpt written while training with PEFTCallback/PEFTMixin")
    parser.add_argument("output", help="folder to write")
    parser.add_argument(
        "--model", default=None, help="base model (default: the checkpoint's model_name_or_path)"
    )
    parser.add_argument("--num-labels", type=int, default=None, help="default: from the checkpoint")
    parser.add_argument(
        "--task",
        default=None,
        choices=sorted(AUTO_CLASSES),
        help="HF PEFT task type of the base model (default: the one recorded in the checkpoint)",
    )
    args = parser.parse_args(list(argv))
    try:
        model, info = load_adapted_model(
            args.checkpoint, base_model=args.model, num_labels=args.num_labels, task_type=args.task
        )
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    folder = save_adapter(model, args.output)
    record_metadata(folder, info["base_model"], info["labels"])
    methods = " + ".join(type(m).__name__ for m in attached_methods(model) or [])
    print(f"{methods} adapter written to {folder}")
    return 0


def _compare_main(argv: Sequence[str]) -> int:
    from lightning_peft.compare import main as compare_main

    return compare_main(argv)


def _classify_main(argv: Sequence[str]) -> int:
    from lightning_peft.predict import main as classify_main

    return classify_main(argv)


EXTRA_HELP = """lightning-peft: LightningCLI with parameter-efficient fine-tuning.

Besides the LightningCLI subcommands below (fit, validate, test, predict; PEFT is a
lightning_peft.PEFTCallback entry in trainer.callbacks):
  classify        classify texts with a saved adapter (lightning-peft classify --help)
  export-adapter  write an adapter-only .ckpt as an adapter folder (lightning-peft export-adapter --help)
  compare         train several methods under one YAML recipe, side by side (lightning-peft compare --help)
"""
EXTRA_HELP += LLM_HELP  # issue 20: generate, chat, merge, export-check (lightning_peft/cli_llm.py)

EXTRA_COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "classify": _classify_main,
    "export-adapter": export_main,
    "compare": _compare_main,
}
EXTRA_COMMANDS.update(LLM_COMMANDS)  # issue 20


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


if __name__ == "__main__":
    sys.exit(main())
