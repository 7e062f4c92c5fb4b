"""The workbench's four calls, with its arguments, against the daemon (module-level API: the
default client and session of this process)."""

from __future__ import annotations

import json
import subprocess
import time

import grpc
import pytest

import berth as cdsw
from conftest import cli_path, scaled, statuses, wait_for

SLEEPER = "import time; time.sleep(300)"


def test_the_workbench_example(berth_addr: str) -> None:
    workers = cdsw.launch_workers(
        n=2, cpu=0.2, memory=0.5, code="print('Hello from a CDSW Worker')"
    )
    assert len(workers) == 2 and len({w["id"] for w in workers}) == 2
    for w in workers:
        assert w["status"] in {
            "WORKER_STATUS_PENDING",
            "WORKER_STATUS_STARTING",
            "WORKER_STATUS_RUNNING",
            "WORKER_STATUS_SUCCEEDED",
        }
        assert w["cpu"] == pytest.approx(0.2) and w["memory_gb"] == pytest.approx(0.5)
        assert w["kernel"] == "python3" and w["session_id"]
    result = cdsw.await_workers(workers, wait_for_completion=True, timeout_seconds=60)
    assert [w["id"] for w in result["workers"]] == [w["id"] for w in workers]
    assert result["failures"] == []
    for w in result["workers"]:
        assert w["status"] == "WORKER_STATUS_SUCCEEDED" and w["exit_code"] == 0
        assert w["finished_at"] is not None
    listed = {w["id"]: w for w in cdsw.list_workers()}
    assert {w["id"] for w in workers} <= set(listed)
    assert {w["session_id"] for w in listed.values()} == {workers[0]["session_id"]}
    stopped = cdsw.stop_workers(*[w["id"] for w in workers])  # ended already: no error
    assert sorted(w["id"] for w in stopped) == sorted(w["id"] for w in workers)
    assert all(w["status"] == "WORKER_STATUS_SUCCEEDED" for w in stopped)


def test_positional_arguments_and_env(berth_addr: str) -> None:
    code = "import os; raise SystemExit(0 if os.environ['GREETING'] == 'hi' and os.environ['N'] == '3' else 7)"
    workers = cdsw.launch_workers(1, 0.1, 0.1, 0, "python3", "", code, {"GREETING": "hi", "N": 3})
    result = cdsw.await_workers(workers)
    assert result["failures"] == [], result
    assert result["workers"][0]["exit_code"] == 0


def test_worker_dicts_are_what_the_cli_prints(berth_addr: str) -> None:
    cli = cli_path()
    if cli is None:
        pytest.skip("no berth CLI (BERTH_CLI)")
    workers = cdsw.launch_workers(
        n=1, cpu=0.1, memory=0.1, code="print(1)", labels={"b": "2", "a": "1"}
    )
    cdsw.await_workers(workers)
    mine = cdsw.list_workers()
    out = subprocess.run(
        [cli, "--addr", berth_addr, "--json", "list", workers[0]["id"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    theirs = json.loads(out)["workers"]
    assert [w for w in mine if w["id"] == workers[0]["id"]] == theirs
    assert theirs[0]["labels"] == {"a": "1", "b": "2"}


def test_await_takes_an_id_ids_dicts_or_none(berth_addr: str) -> None:
    workers = cdsw.launch_workers(n=2, cpu=0.1, memory=0.1, code="import time; time.sleep(1)")
    ids = [w["id"] for w in workers]
    one = cdsw.await_workers(ids[0], wait_for_completion=False, timeout_seconds=30)
    assert [w["id"] for w in one["workers"]] == [ids[0]] and one["failures"] == []
    some = cdsw.await_workers(ids, wait_for_completion=False, timeout_seconds=30)
    assert [w["id"] for w in some["workers"]] == ids
    for w in some["workers"]:
        assert w["status"] in {"WORKER_STATUS_RUNNING", "WORKER_STATUS_SUCCEEDED"}
        assert w["ip_address"].count(".") == 3
    done = cdsw.await_workers(workers, wait_for_completion=True, timeout_seconds=30)
    assert [w["id"] for w in done["workers"]] == ids
    # None: every worker of this session, the earlier tests' too, each in exactly one list.
    everything = cdsw.await_workers(None, timeout_seconds=30)
    seen = [w["id"] for w in everything["workers"] + everything["failures"]]
    assert sorted(seen) == sorted({w["id"] for w in cdsw.list_workers()})
    assert set(ids) <= {w["id"] for w in everything["workers"]}
    assert cdsw.await_workers([]) == {"workers": [], "failures": []}


def test_running_workers_carry_their_ip_address(berth_addr: str) -> None:
    workers = cdsw.launch_workers(n=2, cpu=0.1, memory=0.1, code=SLEEPER)
    try:
        result = cdsw.await_workers(workers, wait_for_completion=False, timeout_seconds=30)
        assert result["failures"] == []
        ips = [w["ip_address"] for w in result["workers"]]
        assert all(w["status"] == "WORKER_STATUS_RUNNING" for w in result["workers"])
        assert len(set(ips)) == 2 and all(ip.count(".") == 3 for ip in ips)
    finally:
        cdsw.stop_workers(*workers)


def test_a_timeout_leaves_the_unfinished_in_failures(berth_addr: str) -> None:
    workers = cdsw.launch_workers(n=2, cpu=0.1, memory=0.1, code=SLEEPER)
    try:
        t = time.monotonic()
        result = cdsw.await_workers(workers, wait_for_completion=True, timeout_seconds=2)
        took = time.monotonic() - t
        assert 1.9 <= took <= scaled(5), took
        assert result["workers"] == []
        assert [w["id"] for w in result["failures"]] == [w["id"] for w in workers]
        assert all(w["status"] == "WORKER_STATUS_RUNNING" for w in result["failures"])
    finally:
        stopped = cdsw.stop_workers(*[w["id"] for w in workers], grace_seconds=0)
    assert len(stopped) == 2
    result = cdsw.await_workers(workers, timeout_seconds=10)
    assert [w["status"] for w in result["failures"]] == ["WORKER_STATUS_STOPPED"] * 2


def test_no_timeout_waits_to_the_end(berth_addr: str) -> None:
    workers = cdsw.launch_workers(n=1, cpu=0.1, memory=0.1, code="import time; time.sleep(2.5)")
    t = time.monotonic()
    result = cdsw.await_workers(workers, timeout_seconds=0)
    assert time.monotonic() - t >= 2.0
    assert [w["status"] for w in result["workers"]] == ["WORKER_STATUS_SUCCEEDED"]


def test_each_worker_in_exactly_one_list(berth_addr: str) -> None:
    good = cdsw.launch_workers(n=1, cpu=0.1, memory=0.1, code="print('ok')")
    bad = cdsw.launch_workers(n=1, cpu=0.1, memory=0.1, code="raise SystemExit(3)")
    result = cdsw.await_workers(good + bad, timeout_seconds=30)
    assert [w["id"] for w in result["workers"]] == [good[0]["id"]]
    assert [w["id"] for w in result["failures"]] == [bad[0]["id"]]
    f = result["failures"][0]
    assert f["status"] == "WORKER_STATUS_FAILED" and f["exit_code"] == 3


@pytest.mark.parametrize(
    "kwargs, error, field",
    [
        (dict(n=0), cdsw.InvalidArgument, "n"),
        (dict(n=-2), cdsw.InvalidArgument, "n"),
        (dict(cpu=0), cdsw.InvalidArgument, "cpu"),
        (dict(memory=-1), cdsw.InvalidArgument, "memory"),
        (dict(cpu=10_000), cdsw.ResourceExhausted, "cpu"),
        (dict(kernel="cobol"), cdsw.InvalidArgument, "kernel"),
        (dict(script="no-such-script.py"), cdsw.FailedPrecondition, "no-such-script.py"),
    ],
)
def test_bad_launches_raise_typed_errors(
    berth_addr: str, kwargs: dict, error: type, field: str
) -> None:
    args = dict(n=1, cpu=0.1, memory=0.1, code="print(1)")
    args.update(kwargs)
    before = len(cdsw.list_workers(all_sessions=True))
    with pytest.raises(error) as e:
        cdsw.launch_workers(**args)
    assert field in e.value.message
    assert e.value.code == error.grpc_code
    assert isinstance(e.value, cdsw.BerthError)
    assert len(cdsw.list_workers(all_sessions=True)) == before  # nothing launched


def test_unknown_workers_are_not_found(berth_addr: str) -> None:
    for call in (
        lambda: cdsw.stop_workers("nosuchworker"),
        lambda: cdsw.await_workers("nosuchworker"),
        lambda: cdsw.await_workers(["nosuchworker"], wait_for_completion=False),
    ):
        with pytest.raises(cdsw.NotFound) as e:
            call()
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert "nosuchworker" in e.value.message


def test_list_all_sessions_sees_other_sessions(client: cdsw.Client) -> None:
    mine = cdsw.launch_workers(n=1, cpu=0.1, memory=0.1, code="print(1)")
    with client.session() as other:
        theirs = other.launch_workers(n=1, cpu=0.1, memory=0.1, code="print(2)")
        other.await_workers()
        assert [w["id"] for w in other.list_workers()] == [theirs[0]["id"]]
    cdsw.await_workers(mine)
    here = {w["id"] for w in cdsw.list_workers()}
    everywhere = {w["id"] for w in cdsw.list_workers(all_sessions=True)}
    assert mine[0]["id"] in here and theirs[0]["id"] not in here
    assert {mine[0]["id"], theirs[0]["id"]} <= everywhere
    running = cdsw.list_workers(all_sessions=True, statuses=["succeeded"])
    assert {mine[0]["id"], theirs[0]["id"]} <= {w["id"] for w in running}


def test_stop_workers_without_ids_stops_this_sessions_only(client: cdsw.Client) -> None:
    mine = cdsw.launch_workers(n=2, cpu=0.1, memory=0.1, code=SLEEPER)
    with client.session() as other:
        theirs = other.launch_workers(n=1, cpu=0.1, memory=0.1, code=SLEEPER)
        other.await_workers(theirs, wait_for_completion=False)
        stopped = cdsw.stop_workers()
        assert {w["id"] for w in mine} <= {w["id"] for w in stopped}
        assert theirs[0]["id"] not in {w["id"] for w in stopped}
        ids = [w["id"] for w in mine + theirs]
        now = wait_for(
            "mine stopped",
            lambda: (
                lambda s: (
                    s
                    if all(s[w["id"]]["status"] == "WORKER_STATUS_STOPPED" for w in mine)
                    else None
                )
            )(statuses(client, ids)),
            10,
        )
        assert now[theirs[0]["id"]]["status"] == "WORKER_STATUS_RUNNING"
    # Closing the other session stopped its worker.
    assert statuses(client, [theirs[0]["id"]])[theirs[0]["id"]]["status"] in {
        "WORKER_STATUS_STOPPED",
        "WORKER_STATUS_RUNNING",
    }
    wait_for(
        "theirs stopped",
        lambda: statuses(client, [theirs[0]["id"]])[theirs[0]["id"]]["status"]
        == "WORKER_STATUS_STOPPED",
        10,
    )


def test_workers_reach_the_master_through_cdsw_master_ip(client: cdsw.Client) -> None:
    subnet = client.host_info()["subnet"]  # e.g. 10.250.0.0/20: the gateway is .1
    gateway = subnet.split("/")[0].rsplit(".", 1)[0] + ".1"
    code = "import os; print(os.environ['CDSW_MASTER_IP'], os.environ['BERTH_MASTER_IP'])"
    workers = client.launch_workers(n=1, cpu=0.1, memory=0.1, code=code)
    client.await_workers(workers)
    out = b"".join(c["data"] for c in client.stream_output(workers, follow=False))
    assert out.decode().split() == [gateway, gateway]
