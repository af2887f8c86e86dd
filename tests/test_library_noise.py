"""silence_known_noise drops only the known library messages, from their own loggers."""

from __future__ import annotations

import logging

import pytest

from lightning_peft.library_noise import silence_known_noise


@pytest.mark.parametrize(
    ("logger", "noise"),
    [
        ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: x"),
        (
            "kernels._internals.hf_hub",
            "Skipping publisher trust check for 'k' because Hugging Face Hub is offline",
        ),
        ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging ... litlogger"),
    ],
)
def test_known_noise_is_dropped_and_other_messages_kept(
    logger: str, noise: str, caplog: pytest.LogCaptureFixture
) -> None:
    silence_known_noise()
    silence_known_noise()  # idempotent: one filter per logger
    log = logging.getLogger(logger)
    assert len(log.filters) == len({id(f) for f in log.filters})
    with caplog.at_level(logging.INFO, logger=logger):
        log.warning(noise)
        log.warning("something the user must see")
    messages = [r.getMessage() for r in caplog.records if r.name == logger]
    assert messages == ["something the user must see"]
