"""What the benchmark's sections share: the simulated Hub in its own process, process CPU and memory, waiting."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_cpu_split(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK  # utime, stime


def proc_cpu_s(pid: int) -> float:
    return sum(proc_cpu_split(pid))


def proc_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"bench: timed out waiting for {what}")


class Hub:
    """The simulated Hub in its own process."""

    def __init__(self, *, fine_tunes: int, checkpoints: int, samples: int = 0) -> None:
        self.proc = subprocess.Popen(
            [
                PY,
                "-m",
                "watcher.simhub",
                "--fine-tunes",
                str(fine_tunes),
                "--checkpoints",
                str(checkpoints),
                "--samples",
                str(samples),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/_sim/stats", timeout=60).json()

    def add(self, key: str, step: int) -> None:
        httpx.post(f"{self.url}/_sim/checkpoint", json={"key": key, "step": step, "loss": 0.1}, timeout=10)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
