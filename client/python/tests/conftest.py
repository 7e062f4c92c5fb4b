"""Tests of the Python client against a real berthd.

``BERTH_TEST_ADDR`` names a daemon to use (the Rust wrapper test, tests/clients, starts one and
sets it, with ``BERTH_CLI`` and ``BERTH_BIN_DIR``). Without it a berthd is started here from
``BERTH_BIN_DIR`` or ``<repo>/target/debug`` (as root: it makes cgroups and namespaces; the
tests that need it skip otherwise) and stopped at the end, with every worker it ran.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

import pytest

import berth

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "client" / "python" / "examples"

#: Timeouts of the tests, scaled like the Rust harness's (emulated kernels run slower).
SCALE = float(os.environ.get("BERTH_TEST_TIMEOUT_SCALE", "1"))


def scaled(seconds: float) -> float:
    return seconds * SCALE


def bin_dir() -> Path:
    return Path(os.environ.get("BERTH_BIN_DIR") or REPO / "target" / "debug")


def cli_path() -> Optional[str]:
    cli = os.environ.get("BERTH_CLI") or str(bin_dir() / "berth")
    return cli if os.access(cli, os.X_OK) else None


def _wait_ready(addr: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + scaled(30)
    last: Exception = RuntimeError("not started")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"berthd exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with berth.Client(addr) as c:
                c.list_workers(all_sessions=True)
            return
        except berth.BerthError as e:
            last = e
            time.sleep(0.1)
    raise RuntimeError(f"berthd not ready at {addr} in 30 s ({last}):\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def berth_addr() -> Iterator[str]:
    """The daemon's address; also set as BERTH_ADDR for this process and its children."""
    addr = os.environ.get("BERTH_TEST_ADDR")
    if addr:
        os.environ["BERTH_ADDR"] = addr
        yield addr
        berth._close_default()
        return
    if os.geteuid() != 0:
        pytest.skip(
            "skipped: needs root (berthd makes cgroups and network namespaces); "
            "or set BERTH_TEST_ADDR to a running daemon"
        )
    berthd = bin_dir() / "berthd"
    if not os.access(berthd, os.X_OK):
        pytest.skip(
            f"skipped: no {berthd} (cargo build -p berth-daemon --bins, or set BERTH_BIN_DIR)"
        )
    state = Path(tempfile.mkdtemp(prefix="berth-pytest-"))
    state.chmod(0o755)
    addr = f"unix:{state}/berthd.sock"
    log = state / "berthd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(berthd),
                "--state-dir",
                str(state / "state"),
                "--listen",
                addr,
                "--name",
                "pytest",
                "--bridge",
                "btpy",
                "--subnet",
                "10.250.0.0/20",
                "--metrics-listen",
                "",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_ready(addr, proc, log)
        os.environ["BERTH_ADDR"] = addr
        yield addr
    finally:
        # The module's default session is closed at exit: close it while the daemon runs.
        berth._close_default()
        # Workers outlive a daemon that stops (by design): stop them first.
        try:
            with berth.Client(addr) as c:
                c._conn.call(
                    "StopWorkers",
                    berth._client.workers_pb2.StopWorkersRequest(all=True, grace_seconds=0),
                )
                deadline = time.monotonic() + scaled(10)
                while time.monotonic() < deadline and any(
                    w["status"] not in berth._client.ENDED
                    for w in c.list_workers(all_sessions=True)
                ):
                    time.sleep(0.1)
        except berth.BerthError:
            pass
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=scaled(20))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def client(berth_addr: str) -> Iterator[berth.Client]:
    """A client of its own, quiet (its workers' output is not printed), closed after the test."""
    with berth.Client(berth_addr, show_output=False) as c:
        yield c


def _unended(addr: str) -> Dict[str, dict]:
    with berth.Client(addr) as c:
        return {
            w["id"]: w
            for w in c.list_workers(all_sessions=True)
            if w["status"] not in berth._client.ENDED
        }


@pytest.fixture(autouse=True)
def no_worker_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests that use the daemon leave no worker running: what a test started and did not end is
    stopped after it, and the test fails."""
    if "berth_addr" not in request.fixturenames:
        yield
        return
    addr = request.getfixturevalue("berth_addr")
    before: Set[str] = set(_unended(addr))
    yield
    # A worker being stopped (SIGTERM sent) may take a moment to be recorded as ended.
    deadline = time.monotonic() + scaled(5)
    while True:
        left = {i: w for i, w in _unended(addr).items() if i not in before}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if left:
        with berth.Client(addr) as c:
            c.stop_workers(*left, grace_seconds=0)
        pytest.fail(f"workers left running: {sorted(left)}")


def run_python(
    code: str,
    *,
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[Path] = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (this one's: the venv with berth), its output captured."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=scaled(timeout),
    )


def wait_for(what: str, cond, timeout: float, every: float = 0.1):
    """Polls ``cond`` until it returns something true; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(every)


def statuses(client: berth.Client, ids: List[str]) -> Dict[str, dict]:
    return {w["id"]: w for w in client.list_workers(all_sessions=True) if w["id"] in ids}
