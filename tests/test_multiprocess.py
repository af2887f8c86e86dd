"""The runner of the multi-process test scripts: a port per run, a retry on a port clash, no hang."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from multiprocess import clean_env, run_distributed


def test_a_port_clash_is_retried_with_a_new_port(tmp_path: Path) -> None:
    log = tmp_path / "ports"
    script = (
        "import os, sys\n"
        f"log = open({str(log)!r}, 'a'); log.write(os.environ['MASTER_PORT'] + '\\n'); log.close()\n"
        f"if len(open({str(log)!r}).read().split()) < 3:\n"
        "    sys.exit('DistNetworkError: EADDRINUSE, address already in use')\n"
    )
    done = run_distributed([sys.executable, "-c", script], clean_env(), timeout=60)
    assert done.returncode == 0
    ports = log.read_text().split()
    assert len(ports) == 3 and all(p.isdigit() for p in ports)


def test_other_failures_are_not_retried(tmp_path: Path) -> None:
    log = tmp_path / "runs"
    script = f"open({str(log)!r}, 'a').write('x'); raise SystemExit('boom')"
    done = run_distributed([sys.executable, "-c", script], clean_env(), timeout=60)
    assert done.returncode == 1 and "boom" in done.stderr and log.read_text() == "x"


def test_a_rank_left_behind_is_killed_instead_of_hanging_the_test() -> None:
    # rank 0 exits at once; its child (a "rank 1" waiting forever) keeps the output pipes open
    script = (
        "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    )
    start = time.monotonic()
    with pytest.raises(AssertionError, match="timed out"):
        run_distributed([sys.executable, "-c", script], clean_env(), timeout=5)
    assert time.monotonic() - start < 60


def test_the_environment_loses_inherited_distributed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("RANK", "1")
    env = clean_env(EXTRA="yes")
    assert "MASTER_PORT" not in env and "RANK" not in env and env["EXTRA"] == "yes"
