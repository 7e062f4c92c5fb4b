"""Sessions: opened on first use, kept alive, closed at exit or by a ``with`` block; a killed
process's lease lapses and its workers end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import berth
from conftest import run_python, scaled, statuses, wait_for

SLEEPER = "import time; time.sleep(300)"

LAUNCH_AND_PRINT = f"""
import berth
ws = berth.launch_workers(n=2, cpu=0.1, memory=0.1, code={SLEEPER!r})
berth.await_workers(ws, wait_for_completion=False, timeout_seconds=30)
print(" ".join(w["id"] for w in ws), flush=True)
"""


def ended_by_session(client: berth.Client, ids):
    now = statuses(client, ids)
    if all(now[i]["status"] == "WORKER_STATUS_STOPPED" for i in ids):
        return now
    return None


def test_a_killed_process_lets_its_lease_lapse(client: berth.Client) -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", LAUNCH_AND_PRINT + "import time; time.sleep(300)\n"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "BERTH_SESSION_TTL": "3"},
    )
    try:
        ids = p.stdout.readline().split()
        assert len(ids) == 2, "the launching process printed no worker ids"
        assert all(w["status"] == "WORKER_STATUS_RUNNING" for w in statuses(client, ids).values())
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
    killed = time.monotonic()
    now = wait_for(
        "workers stopped after the lease lapsed", lambda: ended_by_session(client, ids), 3 + 5
    )
    took = time.monotonic() - killed
    assert took >= 1.0, f"stopped {took:.1f} s after the kill: not by the lease"
    for w in now.values():
        assert w["reason"] == "session ended"


@pytest.mark.parametrize("ending", ["", "raise RuntimeError('the script fails')"])
def test_interpreter_exit_closes_the_session(client: berth.Client, ending: str) -> None:
    t = time.monotonic()
    r = run_python(LAUNCH_AND_PRINT + ending, timeout=60)
    ids = r.stdout.split()
    assert len(ids) == 2, r.stderr
    # The session's lease is 10 s: workers stopped sooner were stopped by its close.
    now = wait_for("workers stopped at exit", lambda: ended_by_session(client, ids), 3)
    assert time.monotonic() - t < 10
    assert all(w["reason"] == "session ended" for w in now.values())
    assert ("the script fails" in r.stderr) == bool(ending)


def test_the_lease_is_kept_alive_past_its_ttl(berth_addr: str) -> None:
    with berth.Client(berth_addr, session_ttl=2, show_output=False) as c:
        ws = c.launch_workers(n=1, cpu=0.1, memory=0.1, code=SLEEPER)
        c.await_workers(ws, wait_for_completion=False)
        time.sleep(5)  # 2.5 leases
        assert statuses(c, [ws[0]["id"]])[ws[0]["id"]]["status"] == "WORKER_STATUS_RUNNING"
    with berth.Client(berth_addr) as c:
        w = statuses(c, [ws[0]["id"]])[ws[0]["id"]]
    assert w["status"] == "WORKER_STATUS_STOPPED" and w["reason"] == "session ended"


def test_a_client_as_context_manager_closes_its_sessions(berth_addr: str) -> None:
    with berth.Client(berth_addr, show_output=False) as c:
        ws = c.launch_workers(n=1, cpu=0.1, memory=0.1, code=SLEEPER)
        with c.session(ttl=5, labels={"purpose": "test"}) as s:
            inner = s.launch_workers(n=1, cpu=0.1, memory=0.1, code=SLEEPER)
            assert inner[0]["session_id"] == s.id != ws[0]["session_id"]
            s.await_workers(wait_for_completion=False)
        closed = statuses(c, [inner[0]["id"]])[inner[0]["id"]]
        assert closed["status"] == "WORKER_STATUS_STOPPED", closed
        assert statuses(c, [ws[0]["id"]])[ws[0]["id"]]["status"] in {
            "WORKER_STATUS_PENDING",
            "WORKER_STATUS_STARTING",
            "WORKER_STATUS_RUNNING",
        }
        with pytest.raises(berth.FailedPrecondition, match="ended"):
            s.launch_workers(n=1, cpu=0.1, memory=0.1, code="1")
        assert [w["id"] for w in s.list_workers()] == [inner[0]["id"]]  # an ended session is named
        stopped = s.close()  # idempotent
        assert stopped == []
    with berth.Client(berth_addr) as c:
        w = statuses(c, [ws[0]["id"]])[ws[0]["id"]]
    assert w["status"] == "WORKER_STATUS_STOPPED" and w["reason"] == "session ended"


def test_a_session_ended_elsewhere_is_replaced(berth_addr: str) -> None:
    with berth.Client(berth_addr, session_ttl=1, show_output=False) as c:
        first = c.launch_workers(n=1, cpu=0.1, memory=0.1, code=SLEEPER)
        sid = first[0]["session_id"]
        with berth.Client(berth_addr) as other:
            other._conn.call(
                "CloseSession", berth._client.workers_pb2.CloseSessionRequest(session_id=sid)
            )
        wait_for("the lease noticed the end", lambda: c.default_session.ended, 5)
        second = c.launch_workers(n=1, cpu=0.1, memory=0.1, code="print(1)")
        assert second[0]["session_id"] != sid
        c.await_workers(second)


def test_replicas_are_tried_in_turn(berth_addr: str) -> None:
    addrs = f"unix:/nonexistent/replica.sock,{berth_addr}"
    with berth.Client(addrs, session_ttl=2, show_output=False) as c:
        ws = c.launch_workers(n=1, cpu=0.1, memory=0.1, code="print('via the second')")
        assert c.await_workers(ws)["failures"] == []
        time.sleep(1)  # a renewal or two through the second replica
        assert c.default_session.ended is None
    with pytest.raises(berth.Unavailable, match="nonexistent"):
        with berth.Client("unix:/nonexistent/a.sock,unix:/nonexistent/b.sock") as c:
            c.launch_workers(n=1, cpu=0.1, memory=0.1, code="1")
