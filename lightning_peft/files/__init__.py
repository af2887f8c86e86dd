"""Adapters on disk: the one reader (:mod:`~lightning_peft.files.reader`), saving and loading
(:mod:`~lightning_peft.files.save`, :mod:`~lightning_peft.files.load`), atomic writes, the unpickling-free loader,
value and configuration checks, the base-model fingerprint, the Hub, and HF PEFT's key names. Imports only the
layers below it (``core``, ``methods``, ``ops``, ``distributed``).
"""
