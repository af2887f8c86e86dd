"""Task modules for ``lightning-peft fit`` and your own scripts, usable from any directory.

* Sentence classification: :class:`SequenceClassifier` (alias :data:`TextClassification`) with
  :class:`TextClassificationDataModule` (TSV/CSV files such as SST-2 or BBC News).
* Chat/instruction SFT of a causal LM: :class:`CausalLMSFT` with :class:`ChatDataModule` (JSONL conversations,
  or SST-2/BBC News as chat tasks; chat template, answer-only loss, length grouping, packing).
"""

from lightning_peft.tasks.causal_lm import CausalLMSFT
from lightning_peft.tasks.chat_data import ChatDataModule
from lightning_peft.tasks.text_classification import SequenceClassifier
from lightning_peft.tasks.tsv_data import TextClassificationDataModule

#: the sentence-classification LightningModule under its task name
TextClassification = SequenceClassifier

__all__ = [
    "CausalLMSFT",
    "ChatDataModule",
    "SequenceClassifier",
    "TextClassification",
    "TextClassificationDataModule",
]
