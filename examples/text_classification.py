"""GLUE-style text classification: the task modules now live in :mod:`lightning_peft.tasks`.

This file keeps the old import path working (``from text_classification import SequenceClassifier`` with
``examples/`` on ``sys.path``, or ``examples.text_classification.SequenceClassifier`` in a YAML run from a
checkout). New code and configs name ``lightning_peft.tasks.SequenceClassifier`` and
``lightning_peft.tasks.TextClassificationDataModule``.
"""

from __future__ import annotations

from lightning_peft.packaged_models import MINILM_ALIASES, resolve_model_path
from lightning_peft.tasks.common import QUANTIZATIONS, quantization_kwargs
from lightning_peft.tasks.text_classification import SequenceClassifier
from lightning_peft.tasks.tsv_data import TextClassificationDataModule, TextDataset, read_table

#: kept for old imports: the names that mean the packaged all-MiniLM-L6-v2
PACKAGED_MODELS = MINILM_ALIASES

__all__ = [
    "PACKAGED_MODELS",
    "QUANTIZATIONS",
    "SequenceClassifier",
    "TextClassificationDataModule",
    "TextDataset",
    "quantization_kwargs",
    "read_table",
    "resolve_model_path",
]
