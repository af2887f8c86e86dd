"""Combining LoRA/DoRA adapters: the math on delta weights (:mod:`~lightning_peft.combine.deltas`, no package
imports) and combining adapter folders (:mod:`~lightning_peft.combine.folders`). Imports nothing from
``lightning`` or ``inference``, which sit beside it.
"""
