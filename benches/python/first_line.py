#!/usr/bin/env python3
"""Time from a launch to the worker's first output line, in a Python process and through the CLI.

Python: from ``launch_workers(n=1, cpu=0.1, memory=0.1, code="print(1)")`` to the line ``[id] 1``
being written to this process's ``sys.stdout`` (wrapped to timestamp the write), the client
and its session already open (as in a notebook). CLI: from spawning
``berth launch --attach --cpu 0.1 --memory 0.1 --code 'print(1)'`` to its first stdout line
that holds ``1``; that figure includes starting the CLI process and its connection (measured on
its own as ``berth --version``) and opening its session.

    benches/python/first_line.py --addr unix:/run/berth/berthd.sock --runs 50 --cli target/release/berth

Run by hand with the berth client installed in the interpreter (pip install ./client/python), as
root against a running berthd; prints p50 and p90 of each and their ratio.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import berth

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^\[([a-z0-9]+)\] 1$")


class Stamping(io.TextIOBase):
    """A stdout that notes when each worker's ``[id] 1`` line is written (and prints nothing)."""

    def __init__(self) -> None:
        self.seen: Dict[str, float] = {}
        self.cond = threading.Condition()
        self._buf = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        now = time.perf_counter()
        self._buf += s
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            m = LINE.match(line)
            if m:
                with self.cond:
                    self.seen[m.group(1)] = now
                    self.cond.notify_all()
        return len(s)

    def wait(self, worker_id: str, timeout: float) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: worker_id in self.seen, timeout):
                raise TimeoutError(f"no line from worker {worker_id} in {timeout} s")
            return self.seen[worker_id]


def quantile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def python_runs(addr: str, runs: int, warmup: int, cpu: float) -> List[float]:
    out = Stamping()
    times = []
    with berth.Client(addr, show_output=True) as c:
        c.default_session.open()
        real, sys.stdout = sys.stdout, out
        try:
            for i in range(warmup + runs):
                t0 = time.perf_counter()
                w = c.launch_workers(n=1, cpu=cpu, memory=0.1, code="print(1)")[0]
                t1 = out.wait(w["id"], 30)
                c.await_workers(w, progress=False)
                if i >= warmup:
                    times.append(t1 - t0)
        finally:
            sys.stdout = real
    return times


def cli_runs(cli: str, addr: str, runs: int, warmup: int, cpu: float) -> List[float]:
    times = []
    for i in range(warmup + runs):
        argv = [
            cli,
            "--addr",
            addr,
            "launch",
            "--attach",
            "--cpu",
            str(cpu),
            "--memory",
            "0.1",
            "--code",
            "print(1)",
        ]
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert p.stdout is not None
        t1 = None
        for line in p.stdout:
            if b"1" in line:
                t1 = time.perf_counter()
                break
        p.stdout.read()
        if p.wait() != 0 or t1 is None:
            raise RuntimeError(f"{' '.join(argv)} failed (exit {p.returncode})")
        if i >= warmup:
            times.append(t1 - t0)
    return times


def process_start(cli: str, runs: int) -> List[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([cli, "--version"], stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    default_cli = next(
        (
            str(p)
            for p in (REPO / "target/release/berth", REPO / "target/debug/berth")
            if p.exists()
        ),
        "berth",
    )
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--addr", default=os.environ.get("BERTH_ADDR", berth.DEFAULT_ADDR))
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cli", default=default_cli, help=f"berth CLI (default {default_cli})")
    ap.add_argument(
        "--cpu",
        type=float,
        default=0.1,
        help="cores per worker (0.1: the interpreter's start-up is throttled by the "
        "CFS quota now and then, which shows in p90)",
    )
    a = ap.parse_args()

    py = python_runs(a.addr, a.runs, a.warmup, a.cpu)
    cli = cli_runs(a.cli, a.addr, a.runs, a.warmup, a.cpu)
    start = process_start(a.cli, a.runs)

    def ms(xs: List[float]) -> str:
        return f"p50 {statistics.median(xs) * 1e3:7.2f} ms   p90 {quantile(xs, 0.9) * 1e3:7.2f} ms"

    print(f"launch → first line, cpu {a.cpu}, {a.runs} runs each ({a.addr}; CLI {a.cli})")
    print(f"  python launch_workers → [id] 1    {ms(py)}")
    print(f"  berth launch --attach → 1         {ms(cli)}")
    print(f"    of which CLI process start      {ms(start)}   (berth --version)")
    ratio = statistics.median(py) / statistics.median(cli)
    print(f"  ratio python / CLI (p50)          {ratio:.2f}")


if __name__ == "__main__":
    main()
