"""The pieces that need no daemon: addresses, worker references, output lines, dicts, errors."""

from __future__ import annotations

import sys

import grpc
import pytest

import berth
from berth import _output
from berth._address import parse_addrs
from berth._client import _launch_request
from berth._convert import to_dict
from berth._errors import error_for
from berth.v1 import workers_pb2


def test_addresses_as_the_cli_takes_them() -> None:
    ts = parse_addrs(
        "unix:/run/berth/berthd.sock, http://a:7400/,b:7400,https://c:443,unix:///x.sock"
    )
    assert [t.target for t in ts] == [
        "unix:/run/berth/berthd.sock",
        "a:7400",
        "b:7400",
        "c:443",
        "unix:/x.sock",
    ]
    assert [t.https for t in ts] == [False, False, False, True, False]
    assert [t.unix for t in ts] == [True, False, False, False, True]
    for bad in ["", " , ", "ftp://a:1", "justahost", "unix:"]:
        with pytest.raises(berth.InvalidArgument, match="addr"):
            parse_addrs(bad)


def test_worker_refs_are_ids_dicts_or_lists_of_them() -> None:
    assert berth.worker_ids(None) is None
    assert berth.worker_ids("a") == ["a"]
    assert berth.worker_ids({"id": "a", "status": "x"}) == ["a"]
    assert berth.worker_ids(["a", {"id": "b"}, ("c", "a")]) == ["a", "b", "c"]
    assert berth.worker_ids([]) == []
    with pytest.raises(berth.InvalidArgument, match="ids"):
        berth.worker_ids([{"workers": []}])
    with pytest.raises(berth.InvalidArgument, match="ids"):
        berth.worker_ids(3)


def test_lines_are_prefixed_whole_and_never_repeated(capsys: pytest.CaptureFixture[str]) -> None:
    p = _output.LinePrinter()
    p.push("w1", 1, b"hel", 0)
    p.push("w2", 1, b"other\n", 0)
    p.push("w1", 1, b"lo\nwor", 3)
    p.push("w1", 2, b"oops\n", 0)
    p.push("w1", 1, b"hello\nwor", 0)  # replayed after a reconnection: nothing new
    p.push("w1", 1, b"world\nx\r\ny", 6)  # overlaps what was printed
    p.finish()
    out, err = capsys.readouterr()
    assert out == "[w2] other\n[w1] hello\n[w1] world\n[w1] x\r\n[w1] y\n"
    assert err == "[w1] oops\n"


def test_a_long_unfinished_line_is_written_out(capsys: pytest.CaptureFixture[str]) -> None:
    p = _output.LinePrinter()
    p.push("w", 1, b"x" * (_output.MAX_PENDING + 1), 0)
    assert capsys.readouterr().out == "[w] " + "x" * (_output.MAX_PENDING + 1) + "\n"


def test_invalid_utf8_does_not_break_the_output() -> None:
    assert _output.prefix_lines("w", b"a\xffb\n") == "[w] a\ufffdb\n"


def test_worker_dicts_follow_the_cli_json() -> None:
    w = workers_pb2.Worker(
        id="abc",
        status=workers_pb2.WORKER_STATUS_FAILED,
        cpu=0.5,
        exit_code=1,
        command=["/bin/false"],
        memory_peak_bytes=2**64 - 1,
        labels={"b": "2", "a": "1"},
        network=workers_pb2.NETWORK_MODE_NONE,
    )
    w.created_at.FromJsonString("2023-11-14T22:13:20.500Z")
    d = to_dict(w)
    assert d["id"] == "abc"
    assert d["status"] == "WORKER_STATUS_FAILED"
    assert d["exit_code"] == 1 and d["signal"] is None
    assert d["command"] == ["/bin/false"]
    assert d["memory_peak_bytes"] == 2**64 - 1 and isinstance(d["memory_peak_bytes"], int)
    assert list(d["labels"].items()) == [("a", "1"), ("b", "2")]
    assert d["created_at"] == "2023-11-14T22:13:20.500Z"
    assert d["started_at"] is None and d["finished_at"] is None
    assert d["network"] == "NETWORK_MODE_NONE"
    # Every field of the message, by its proto name.
    assert set(d) == {f.name for f in workers_pb2.Worker.DESCRIPTOR.fields}


def test_errors_are_typed_by_status_code() -> None:
    e = error_for(grpc.StatusCode.NOT_FOUND, "worker x not found")
    assert isinstance(e, berth.NotFound) and isinstance(e, berth.BerthError)
    assert e.code == grpc.StatusCode.NOT_FOUND and e.message == "worker x not found"
    assert str(e) == "NOT_FOUND: worker x not found"
    for code, cls in [
        (grpc.StatusCode.INVALID_ARGUMENT, berth.InvalidArgument),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, berth.ResourceExhausted),
        (grpc.StatusCode.FAILED_PRECONDITION, berth.FailedPrecondition),
        (grpc.StatusCode.PERMISSION_DENIED, berth.PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, berth.Unauthenticated),
        (grpc.StatusCode.UNAVAILABLE, berth.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, berth.DeadlineExceeded),
    ]:
        assert type(error_for(code, "m")) is cls
    other = error_for(grpc.StatusCode.INTERNAL, "boom")
    assert type(other) is berth.BerthError and other.code == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n=-1), "n"),
        (dict(n=1.5), "n"),
        (dict(n="2"), "n"),
        (dict(cpu="half"), "cpu"),
        (dict(memory=None), "memory"),
        (dict(nvidia_gpu=-1), "nvidia_gpu"),
        (dict(env=["A=1"]), "env"),
        (dict(network="wifi"), "network"),
        (dict(command="ls -l"), "command"),
    ],
)
def test_what_a_request_cannot_carry_is_refused_here(kwargs: dict, field: str) -> None:
    args = dict(
        n=1,
        cpu=0.1,
        memory=0.1,
        nvidia_gpu=0,
        kernel="python3",
        script="",
        code="1",
        env=None,
        command=None,
        workdir=None,
        master_ip="",
        network=None,
        labels=None,
        constraints=None,
        placement=None,
        max_restarts=None,
    )
    args.update(kwargs)
    with pytest.raises(berth.InvalidArgument, match=field):
        _launch_request(**args)


def test_a_command_replaces_the_default_kernel(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = dict(
        n=2,
        cpu=0.1,
        memory=0.25,
        nvidia_gpu=0,
        script="",
        code="",
        env={"A": 1},
        workdir=None,
        master_ip="",
        network="host",
        labels={"k": "v"},
        constraints=None,
        placement="spread",
        max_restarts=3,
    )
    r = _launch_request(kernel="python3", command=["/bin/echo", "hi"], **base)
    assert r.kernel == "" and list(r.command) == ["/bin/echo", "hi"]
    assert r.workdir == str(tmp_path) and dict(r.env) == {"A": "1"}
    assert (
        r.network == workers_pb2.NETWORK_MODE_HOST and r.placement == workers_pb2.PLACEMENT_SPREAD
    )
    assert (
        r.restart.mode == workers_pb2.RestartPolicy.MODE_ON_FAILURE and r.restart.max_restarts == 3
    )
    r = _launch_request(kernel="r", command=None, **{**base, "code": "1", "workdir": "sub"})
    assert r.kernel == "r" and r.workdir == str(tmp_path / "sub")


def test_bad_session_ttl_is_refused(monkeypatch) -> None:
    with pytest.raises(berth.InvalidArgument, match="session_ttl"):
        berth.Client("127.0.0.1:1", session_ttl=0)
    monkeypatch.setenv("BERTH_SESSION_TTL", "soon")
    with pytest.raises(berth.InvalidArgument, match="BERTH_SESSION_TTL"):
        berth.Client("127.0.0.1:1")


def test_an_unreachable_server_is_unavailable() -> None:
    with berth.Client("unix:/nonexistent/berthd.sock,unix:/nonexistent/other.sock") as c:
        with pytest.raises(berth.Unavailable) as e:
            c.list_workers(all_sessions=True)
    assert "/nonexistent/" in str(e.value)


def test_progress_in_a_notebook_updates_one_display(monkeypatch) -> None:
    """With ipykernel running, await's progress is one display that is updated in place."""
    import types

    from berth._progress import Progress

    shown = []

    class Handle:
        def update(self, obj):
            shown.append(obj.text)

    class Pretty:
        def __init__(self, text):
            self.text = text

    def display(obj, display_id=False):
        assert display_id is True
        shown.append(obj.text)
        return Handle()

    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: types.SimpleNamespace(kernel=object())
    ipython_display = types.ModuleType("IPython.display")
    ipython_display.Pretty, ipython_display.display = Pretty, display
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", ipython_display)
    p = Progress()
    p.update(Progress.text(0, 2, 0, True))
    p.update(Progress.text(1, 2, 1, True))
    p.close()
    assert shown == ["", "berth: 0/2 finished, 0 failed", "berth: 1/2 finished, 1 failed"]


def test_no_progress_when_stderr_is_no_terminal(capsys) -> None:
    from berth._progress import Progress

    p = Progress()
    p.update(Progress.text(1, 1, 0, False))
    p.close()
    assert capsys.readouterr().err == ""
