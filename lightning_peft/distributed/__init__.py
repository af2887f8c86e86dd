"""Multi-process training (DDP, FSDP2 through ``ModelParallelStrategy``, FSDP1 through ``FSDPStrategy``) and
training modes (gradient checkpointing) for adapter-only fine-tuning.

:class:`~lightning_peft.PEFTCallback` and :class:`~lightning_peft.PEFTMixin` call the hooks below; users only
need :func:`peft_auto_wrap_policy` (FSDP1). What happens, and when:

* ``setup`` (before any wrapper exists): :func:`configure_strategy` makes ``FSDPStrategy`` keep the original
  parameters (``use_orig_params=True``), which FSDP1 needs when frozen and trainable parameters share a unit.
* attaching: :func:`check_not_sharded` refuses to attach to a model that ``fully_shard``/FSDP already sharded,
  because adapter parameters created after sharding would be plain per-rank tensors whose gradients no one
  averages (every rank would train its own adapter).
* ``on_fit_start``: :func:`prepare_training` lets gradients reach checkpointed blocks whose inputs come from a
  frozen embedding, and checks that DDP registered exactly the trainable parameters.
* the first ``on_after_backward``: :func:`check_gradients` names adapter parameters that received no gradient.
  Under DDP (``find_unused_parameters=False``, Lightning's default) the reducer would wait for them and crash
  at the next step ("Expected to have finished reduction in the prior iteration"), after averaging only
  part of this step's gradients; we stop before the optimizer step with an error that says which module and
  what to do. (The error must not repeat DDP's wording: Lightning replaces such messages with its own.)
"""

from lightning_peft.distributed.activation_checkpointing import enable_input_grads
from lightning_peft.distributed.fsdp_policy import peft_auto_wrap_policy, peft_wrap_targets
from lightning_peft.distributed.gradients import check_gradients
from lightning_peft.distributed.strategies import (
    check_not_sharded,
    check_quantized_sharding,
    check_saveable,
    configure_strategy,
    is_global_zero,
)
from lightning_peft.distributed.training import prepare_training

__all__ = [
    "check_gradients",
    "check_not_sharded",
    "check_quantized_sharding",
    "check_saveable",
    "configure_strategy",
    "enable_input_grads",
    "is_global_zero",
    "peft_auto_wrap_policy",
    "peft_wrap_targets",
    "prepare_training",
]
