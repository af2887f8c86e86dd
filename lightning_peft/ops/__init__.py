"""Operations on an adapted model, for any method: attach and remove (:mod:`~lightning_peft.ops.attach`), which
parameters train and how many there are (:mod:`~lightning_peft.ops.parameters`), the adapter's state dict
(:mod:`~lightning_peft.ops.state_dict`), per-sample routing (:mod:`~lightning_peft.ops.routing`), merging
(:mod:`~lightning_peft.ops.merging`), named adapters (:mod:`~lightning_peft.ops.named_adapters`) and the guard
that every method takes part (:mod:`~lightning_peft.ops.participation`). Imports only ``core`` and ``methods``.
"""
