"""Run a benchmark's child process while sampling the machine's load average."""

from __future__ import annotations

import os
import subprocess
import threading
import time


def run_sampling_load(
    cmd: list[str], *, env: dict[str, str] | None = None, every: float = 5.0
) -> tuple[int, str, str, list[float]]:
    """Run ``cmd`` to its end; return its exit code, stdout, stderr and the 1-minute load
    averages sampled every ``every`` seconds while it ran (stderr drained by a thread so
    that a chatty child never blocks on a full pipe)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    drain.start()
    loads: list[float] = []
    while proc.poll() is None:
        loads.append(os.getloadavg()[0])
        time.sleep(every)
    out = proc.stdout.read()
    drain.join()
    return proc.returncode, out, "".join(err), loads
