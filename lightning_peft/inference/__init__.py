"""Using a saved adapter: rebuilding the model it was trained on from what it records
(:mod:`~lightning_peft.inference.rebuild`) and the text-classification pipeline
(:mod:`~lightning_peft.inference.pipeline`). Imports nothing from ``lightning`` or ``combine``, which sit beside it.
"""
