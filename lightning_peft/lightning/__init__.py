"""The Lightning integration: one lifecycle (:mod:`~lightning_peft.lightning.lifecycle`) behind the callback and
the mixin, the optimizer fix, and adapter-only Lightning checkpoints. Imports nothing from ``combine`` or
``inference``, which sit beside it.
"""
