"""The ground floor: what an adapted model carries and how modules are found.

The adapter record (:mod:`~lightning_peft.core.record`), targeting (:mod:`~lightning_peft.core.targeting`), the
base-model finder and task types (:mod:`~lightning_peft.core.base_model`), the default targets per architecture
(:mod:`~lightning_peft.core.default_targets`) and the bitsandbytes helpers (:mod:`~lightning_peft.core.quantized`).
Imports nothing from the rest of the package.
"""
