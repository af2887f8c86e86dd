"""Running a multi-process (DDP/FSDP2) script from a test without port clashes or hangs.

The test suite runs on 2 xdist workers and ``xdist_group`` is not honoured (pytest 9.2, xdist 3.8), so two
distributed scripts can start at once. Lightning picks each run's ``MASTER_PORT`` itself; two runs picking
in the same moment can get the same port, and the loser's rank 0 dies with EADDRINUSE while its rank 1 waits
on the other run's store. Here each run gets its own port, a clash is retried with a new one, and a timeout
kills the whole process group: rank 1 holds the output pipes, so killing rank 0 alone would leave the test
waiting forever.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

CLASH = "EADDRINUSE"
DISTRIBUTED_VARS = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_PORT", "MASTER_ADDR")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any distributed variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARS}
    env.update(extra)
    return env


def run_distributed(
    command: Sequence[str],
    env: Mapping[str, str],
    timeout: float,
    cwd: Path | str | None = None,
    attempts: int = 3,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (which starts its own other ranks) with a fresh ``MASTER_PORT``; on a port clash run it
    again with another port; on timeout kill every process it started and fail with its output."""
    for _ in range(attempts):
        run_env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        proc = subprocess.Popen(
            list(command),
            env=run_env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: the other ranks die with it
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(
                f"{command[1:3]} timed out after {timeout} s:\n{out[-3000:]}\n{err[-6000:]}"
            ) from None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # a rank left behind after rank 0 exited
            except ProcessLookupError:
                pass
        done = subprocess.CompletedProcess(list(command), proc.returncode, out, err)
        if done.returncode == 0 or CLASH not in err:
            return done
    return done
