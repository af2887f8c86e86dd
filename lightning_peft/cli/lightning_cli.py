"""``lightning-peft fit|validate|test|predict``: LightningCLI with PEFT. ``fit`` also writes the final adapter
to ``<log_dir>/adapter``; ``predict`` writes one JSON line per example to ``<log_dir>/predictions.jsonl``."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_peft.core.record import is_attached
from lightning_peft.files.atomic import write_text
from lightning_peft.files.names import ADAPTER_CONFIG, LABEL_NAMES_KEY
from lightning_peft.files.safe_load import refusing_pickles
from lightning_peft.files.save import save_adapter
from lightning_peft.inference.labels import label_names, score_rows
from lightning_peft.methods import PEFTMethod


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
        write_base_and_labels(folder, hparams.get("model_name_or_path"), label_names(self.model))
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


def write_base_and_labels(folder: Path, base_model: str | None, labels: Sequence[str] | None) -> None:
    """Add HF PEFT's ``base_model_name_or_path`` (if missing) and the class names (``label_names``) to an
    adapter folder's ``adapter_config.json``, so that ``classify`` needs neither ``--model`` nor ``--labels``.
    HF PEFT ignores the extra key."""
    config_file = folder / ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    if base_model is not None and not config.get("base_model_name_or_path"):
        config["base_model_name_or_path"] = base_model
    if labels:
        config[LABEL_NAMES_KEY] = list(labels)
    write_text(config_file, json.dumps(config, indent=2, sort_keys=True))  # atomic: never a torn JSON


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
        rows += [{**row, "score": round(row["score"], 6)} for row in score_rows(scores, labels)]
    return rows
