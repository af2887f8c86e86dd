"""Make the optimizers that train hold exactly the trainable parameters.

``configure_optimizers`` may have been written for full fine-tuning (``self.parameters()``), and
LightningCLI's ``--optimizer`` builds its optimizer over ``model.parameters()`` before ``setup``, so it holds
frozen parameters and lacks the adapter's. Lightning calls ``configure_optimizers`` after ``setup``, and
:func:`fix_optimizers` runs at ``on_fit_start``, after the optimizers exist and before their state is
restored from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn


def fix_optimizers(module: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> tuple[int, int]:
    """Drop frozen parameters from ``optimizers`` and add trainable ones that no optimizer holds.

    Param groups are kept (possibly empty) so that learning-rate schedulers, which index groups, still
    work; missing parameters join the first group of the first optimizer. Returns (removed, added).
    """
    removed = added = 0
    held: set[int] = set()
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            keep = []
            for param in group["params"]:
                if param.requires_grad:
                    keep.append(param)
                    held.add(id(param))
                else:
                    optimizer.state.pop(param, None)
                    removed += 1
            group["params"] = keep
    missing = []
    seen: set[int] = set()
    for param in module.parameters():
        if param.requires_grad and id(param) not in held and id(param) not in seen:
            missing.append(param)
            seen.add(id(param))
    if missing:
        if not optimizers:
            raise ValueError("configure_optimizers returned no optimizer, so the adapter cannot train")
        optimizers[0].param_groups[0]["params"].extend(missing)
        added = len(missing)
    if removed or added:
        rank_zero_info(
            f"lightning-peft: optimizer adjusted to the trainable parameters "
            f"({removed} frozen tensors removed, {added} adapter tensors added)"
        )
    return removed, added
