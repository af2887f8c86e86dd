"""Supervised fine-tuning (SFT) of a causal language model on chat data: :class:`CausalLMSFT`.

The loss is the token cross-entropy of the answer tokens (labels ``!= -100``: the assistant turns and their
end-of-turn token, see :mod:`lightning_peft.tasks.chat_format`), **summed** over a gradient-accumulation window
and divided by the number of answer tokens in the whole window::

    L_window = (1 / N_window) * sum_{micro-batches b in window} sum_{answer tokens t in b} -log p(y_t | y_<t)

so an accumulated window has exactly the gradient of one big batch made of its micro-batches (averaging each
micro-batch's mean instead would weight tokens of short-answer batches more). Lightning divides the value a
``training_step`` returns by ``accumulate_grad_batches`` before ``backward``; the step multiplies by it to
compensate. ``N_window`` comes with the batch (``num_answer_tokens``, set by
:class:`~lightning_peft.tasks.chat_data.ChatDataModule`); a batch without it is normalised by its own count.

Under data parallelism (DDP) with ``R`` processes a window is every process's micro-batches together and
``N_window`` counts the answer tokens on all of them. DDP *averages* the processes' gradients, so each process
multiplies its summed loss by ``R``: ``L_r = R * sum_{its tokens} -log p / N_window``, whose average over the
processes is ``L_window`` of the union batch. The logged ``train_loss`` is the answer-token mean of the
micro-step on all processes (their summed losses and counts are added up).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from lightning_peft.core.base_model import set_activation_checkpointing
from lightning_peft.packaged_models import resolve_model_path
from lightning_peft.tasks.batching import data_parallel
from lightning_peft.tasks.chat_eval import first_token_choice
from lightning_peft.tasks.chat_format import IGNORE_INDEX
from lightning_peft.tasks.common import linear_warmup_decay, quantization_kwargs

#: batch keys that are not model inputs
_NOT_INPUTS = ("labels", "num_answer_tokens", "choice_token_ids", "choice_index")


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4-D boolean mask (True = may attend) as the additive float mask every attention kernel accepts:
    0 where allowed, the dtype's lowest value elsewhere (transformers passes a 4-D mask through unchanged)."""
    zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return zeros.masked_fill(~mask, torch.finfo(dtype).min)


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies over labelled positions (in float32) and their count.

    Args:
        logits: (B, L, V); position i predicts token i + 1.
        labels: (B, L) token ids, -100 where no loss is taken.
    """
    shift_logits = logits[:, :-1].float()  # (B, L-1, V)
    shift_labels = labels[:, 1:]  # (B, L-1)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, (shift_labels != IGNORE_INDEX).sum()


class CausalLMSFT(pl.LightningModule):
    """Chat/instruction SFT of any ``AutoModelForCausalLM`` (or a given module), loss on the answer tokens.

    Args:
        model_name_or_path: a local folder or Hub id (``"smollm2"`` = the packaged SmolLM2-135M-Instruct).
        model: a ready causal LM (an ``nn.Module`` whose output has ``.logits``), used instead of loading one.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: linear warm-up over this fraction of the optimizer steps, then linear decay
            (0 = constant learning rate).
        quantization: load the base's linear layers with bitsandbytes (``lightning-peft[qlora]``): ``"nf4"``,
            ``"nf4-dq"`` (QLoRA: NF4 with double quantization), ``"fp4"``, ``"fp4-dq"`` or ``"int8"``;
            ``lm_head`` stays in full precision. ``None``: full precision.
        activation_checkpointing: recompute each layer's activations in the backward pass (less memory, about
            one more forward pass of compute).
        dtype: the dtype the weights are loaded in (``"float32"``, ``"bfloat16"``, ...).
    """

    def __init__(
        self,
        model_name_or_path: str | None = "smollm2",
        model: nn.Module | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        quantization: str | None = None,
        activation_checkpointing: bool = False,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        if model is None:
            from transformers import AutoModelForCausalLM

            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"dtype must name a torch dtype such as 'float32', got {dtype!r}")
            model = AutoModelForCausalLM.from_pretrained(
                resolve_model_path(model_name_or_path),
                dtype=getattr(torch, dtype),
                **quantization_kwargs(quantization, skip_modules=("lm_head",)),
            )
        elif quantization is not None:
            raise ValueError(f"quantization={quantization!r} applies when loading: pass model=None to use it")
        self.model = model
        # from_pretrained returns eval mode; Lightning keeps modules' modes, so switch dropout on for training
        self.model.train()
        if activation_checkpointing:
            set_activation_checkpointing(self.model, use_reentrant=False)
        self.val_acc = MeanMetric()
        self.test_acc = MeanMetric()

    def forward(self, **batch: Any) -> Any:
        """The wrapped model's output; a 4-D boolean ``attention_mask`` (packing) becomes an additive mask."""
        inputs = {k: v for k, v in batch.items() if k not in _NOT_INPUTS}
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.dtype == torch.bool:
            inputs["attention_mask"] = additive_mask(mask, self._compute_dtype())
        return self.model(**inputs)

    def _compute_dtype(self) -> torch.dtype:
        get = getattr(self.model, "get_input_embeddings", None)
        weight = getattr(get(), "weight", None) if callable(get) else None
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            return weight.dtype
        return torch.float32

    def _accumulation(self) -> int:
        trainer = self._trainer
        return int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if trainer is not None else 1

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Summed answer-token loss over the accumulation window's answer-token count (see the module doc)."""
        total, count = summed_token_loss(self(**batch).logits, batch["labels"])
        replicas = data_parallel(self._trainer)[0]
        window = batch.get("num_answer_tokens")
        if window is None:  # no window count: this micro-batch's own mean
            loss = total / count.clamp(min=1)
        else:  # Lightning divides by accumulate_grad_batches and DDP averages the replicas: multiply both back
            scale = self._accumulation() * replicas
            loss = total * scale / torch.as_tensor(window).clamp(min=1).to(total.device)
        stats = torch.stack([total.detach(), count.to(total.dtype)])  # (2,): summed loss, answer tokens
        if replicas > 1:  # the micro-step's tokens on every process (a token mean, not a mean of means)
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        n = max(int(stats[1]), 1)
        # already the same value on every process: no sync_dist needed
        self.log("train_loss", stats[0] / n, prog_bar=True, batch_size=n)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], prefix: str) -> None:
        """``<prefix>_loss`` per answer token; ``<prefix>_acc`` for classification tasks (first answer token's
        log-probabilities among the choices' first tokens)."""
        logits = self(**batch).logits
        total, count = summed_token_loss(logits, batch["labels"])
        n = max(int(count), 1)
        self.log(f"{prefix}_loss", total / n, prog_bar=True, batch_size=n)
        if "choice_token_ids" in batch:
            known = batch["choice_index"] >= 0
            preds = first_token_choice(logits, batch["labels"], batch["choice_token_ids"])
            if bool(known.any()):
                accuracy = self.val_acc if prefix == "val" else self.test_acc
                accuracy.update((preds[known] == batch["choice_index"][known]).float())
                self.log(f"{prefix}_acc", accuracy, prog_bar=True, batch_size=int(known.sum()))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """``val_loss`` per answer token; ``val_acc`` for classification tasks."""
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """``test_loss`` and ``test_acc``, exactly as validation computes ``val_loss`` and ``val_acc``."""
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        """AdamW (with the optional linear warm-up/decay schedule, stepped per optimizer step)."""
        # over all parameters on purpose (full fine-tuning): PEFTCallback keeps only the trainable ones
        optimizer = torch.optim.AdamW(
            [p for p in self.parameters() if p.is_floating_point()],
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
        )
        if not self.hparams.warmup_ratio:
            return optimizer
        scheduler = linear_warmup_decay(
            optimizer, self.trainer.estimated_stepping_batches, self.hparams.warmup_ratio
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
