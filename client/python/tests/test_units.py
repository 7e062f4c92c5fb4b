"""The pieces that need no daemon: addresses, worker references, output lines, dicts, errors."""

from __future__ import annotations

import os
import signal
import sys
import threading

import grpc
import pytest

import berth
from berth import _output
from berth import _client
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


def _write_on_a_thread(text: str) -> threading.Thread:
    t = threading.Thread(target=_output._write, args=(1, text))
    t.start()
    return t


def test_a_workers_line_waits_for_the_end_of_the_sessions_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # print("Master received:", data) is four writes; the output thread ran between two of
    # them in a CI run (PYTHONUNBUFFERED), splitting the session's line with a worker's.
    monkeypatch.setattr(_output, "LINE_WAIT", 60.0)
    _output.guard_streams()
    print("Master received:", end="", flush=True)
    t = _write_on_a_thread("[w] CDSW_MASTER_IP: 10.0.0.1\n")
    t.join(0.2)
    assert t.is_alive()  # holding its line
    print(" Hello From Worker!", flush=True)
    t.join(10)
    assert not t.is_alive()
    assert capsys.readouterr().out == (
        "Master received: Hello From Worker!\n[w] CDSW_MASTER_IP: 10.0.0.1\n"
    )


def test_a_line_left_open_holds_workers_lines_only_a_while(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_output, "LINE_WAIT", 0.05)
    _output.guard_streams()
    sys.stdout.write("answer? ")
    _write_on_a_thread("[w] one\n").join(10)
    _write_on_a_thread("[w] two\n").join(10)  # the line is ended: no wait, no blank line
    # Written by the thread that left the line open: no wait at all.
    sys.stdout.write("more")
    _output._write(1, "[w] three\n")
    sys.stderr.write("err ")
    _output._write(2, "[w] four\n")
    out, err = capsys.readouterr()
    assert out == "answer? \n[w] one\n[w] two\nmore\n[w] three\n"
    assert err == "err \n[w] four\n"


def test_a_child_forked_while_the_lock_is_held_can_print() -> None:
    r, w = os.pipe()
    held, release = threading.Event(), threading.Event()

    def output_thread() -> None:  # holds the lock, as the output thread does while it writes
        with _output._write_lock:
            held.set()
            release.wait(30)

    t = threading.Thread(target=output_thread)
    t.start()
    held.wait(30)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            signal.alarm(10)  # a hung child ends, and the test fails
            guard = _output.LineGuard(os.fdopen(w, "w"))
            guard.write("child printed\n")
            guard.flush()
        finally:
            os._exit(0)
    release.set()
    t.join()
    os.close(w)
    with os.fdopen(r) as f:
        got = f.read()  # EOF once the child exits (its alarm ends it if it hangs)
    os.waitpid(pid, 0)
    assert got == "child printed\n"


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
    # Who launched it, whom it runs as, and what the CLI's JSON says of them.
    assert (d["owner"], d["user"], d["pooled"], d["output_dropped_bytes"]) == ("", "", False, 0)
    w.owner, w.user, w.pooled, w.output_dropped_bytes = "alice", "nobody", True, 2**40
    d = to_dict(w)
    assert (d["owner"], d["user"], d["pooled"], d["output_dropped_bytes"]) == (
        "alice",
        "nobody",
        True,
        2**40,
    )
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


def test_root_workers_are_asked_for_by_keyword() -> None:
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
        workdir="",
        master_ip="",
        network=None,
        labels=None,
        constraints=None,
        placement=None,
        max_restarts=None,
    )
    assert _launch_request(**args).run_as_root is False
    assert _launch_request(**args, run_as_root=True).run_as_root is True


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


# TLS ------------------------------------------------------------------------------------------

CA_PEM = b"-----BEGIN CERTIFICATE-----\nMIIBca\n-----END CERTIFICATE-----\n"
CERT_PEM = b"-----BEGIN CERTIFICATE-----\nMIIBalice\n-----END CERTIFICATE-----\n"
KEY_PEM = b"-----BEGIN PRIVATE KEY-----\nMIGHkey\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def tls(tmp_path, monkeypatch):
    """PEM files, no BERTH_TLS_* set, and the arguments ssl_channel_credentials is called with."""
    for name in ("BERTH_TLS_CA", "BERTH_TLS_CERT", "BERTH_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    files = {}
    for name, data in (("ca.pem", CA_PEM), ("alice.pem", CERT_PEM), ("alice.key", KEY_PEM)):
        (tmp_path / name).write_bytes(data)
        files[name] = str(tmp_path / name)
    built = []

    def credentials(**kw):
        built.append(kw)
        return ("creds", len(built))

    monkeypatch.setattr(grpc, "ssl_channel_credentials", credentials)
    return files, built


def test_tls_material_comes_from_the_variables(tls, monkeypatch) -> None:
    files, built = tls
    assert _client._tls_credentials() is None, "nothing set: plaintext"
    assert built == []

    monkeypatch.setenv("BERTH_TLS_CA", files["ca.pem"])
    assert _client._tls_credentials() is not None
    assert built[-1] == dict(root_certificates=CA_PEM, private_key=None, certificate_chain=None)

    monkeypatch.setenv("BERTH_TLS_CERT", files["alice.pem"])
    monkeypatch.setenv("BERTH_TLS_KEY", files["alice.key"])
    _client._tls_credentials()
    assert built[-1] == dict(
        root_certificates=CA_PEM, private_key=KEY_PEM, certificate_chain=CERT_PEM
    )

    # A certificate and key without a CA: gRPC's own roots check the server.
    monkeypatch.setenv("BERTH_TLS_CA", "")
    _client._tls_credentials()
    assert built[-1] == dict(
        root_certificates=None, private_key=KEY_PEM, certificate_chain=CERT_PEM
    )


def test_tls_arguments_win_over_the_variables(tls, monkeypatch) -> None:
    files, built = tls
    monkeypatch.setenv("BERTH_TLS_CA", "/nonexistent/ca.pem")
    _client._tls_credentials(ca=files["ca.pem"])
    assert built[-1]["root_certificates"] == CA_PEM
    c = berth.Client("10.0.0.1:7300", tls_ca=files["ca.pem"])
    assert built[-1]["root_certificates"] == CA_PEM
    c.close()


def test_empty_tls_variables_are_unset(tls, monkeypatch) -> None:
    _, built = tls
    for name in ("BERTH_TLS_CA", "BERTH_TLS_CERT", "BERTH_TLS_KEY"):
        monkeypatch.setenv(name, "")
    assert _client._tls_credentials() is None
    assert built == []


@pytest.mark.parametrize(
    "given, missing",
    [("BERTH_TLS_CERT", "BERTH_TLS_KEY"), ("BERTH_TLS_KEY", "BERTH_TLS_CERT")],
)
def test_a_certificate_without_its_key_is_refused(tls, monkeypatch, given, missing) -> None:
    files, built = tls
    monkeypatch.setenv("BERTH_TLS_CA", files["ca.pem"])
    monkeypatch.setenv(given, files["alice.pem" if given.endswith("CERT") else "alice.key"])
    with pytest.raises(berth.InvalidArgument) as e:
        _client._tls_credentials()
    assert e.value.message.startswith(f"{given} is set without {missing}"), e.value.message
    # Client() refuses it at once, before any connection.
    with pytest.raises(berth.InvalidArgument, match=given):
        berth.Client("10.0.0.1:7300")
    assert built == []


def test_a_cert_argument_without_a_key_is_named(tls) -> None:
    files, _ = tls
    with pytest.raises(berth.InvalidArgument, match="^.*tls_cert is set without BERTH_TLS_KEY"):
        _client._tls_credentials(cert=files["alice.pem"])


def test_unreadable_or_wrong_tls_files_are_named(tls, monkeypatch, tmp_path) -> None:
    files, _ = tls
    monkeypatch.setenv("BERTH_TLS_CA", str(tmp_path / "missing.pem"))
    with pytest.raises(berth.InvalidArgument) as e:
        _client._tls_credentials()
    assert e.value.message.startswith("BERTH_TLS_CA: cannot read ")
    assert "missing.pem" in e.value.message
    # A key given as the CA, a certificate as the key: no PEM block of the kind.
    monkeypatch.setenv("BERTH_TLS_CA", files["alice.key"])
    with pytest.raises(berth.InvalidArgument, match="BERTH_TLS_CA: no PEM block"):
        _client._tls_credentials()
    monkeypatch.setenv("BERTH_TLS_CA", files["ca.pem"])
    monkeypatch.setenv("BERTH_TLS_CERT", files["alice.pem"])
    monkeypatch.setenv("BERTH_TLS_KEY", files["alice.pem"])
    with pytest.raises(berth.InvalidArgument, match="BERTH_TLS_KEY: no PEM block"):
        _client._tls_credentials()


def test_which_addresses_use_tls(monkeypatch) -> None:
    opened = []
    monkeypatch.setattr(
        grpc, "secure_channel", lambda target, creds, options: opened.append(("tls", target))
    )
    monkeypatch.setattr(
        grpc, "insecure_channel", lambda target, options: opened.append(("plain", target))
    )
    monkeypatch.setattr(grpc, "ssl_channel_credentials", lambda **kw: "default-roots")
    creds = object()
    addrs = "node1:7300,http://node2:7300,https://node3:7300,unix:/run/berth/berthd.sock"
    for c in (creds, None):
        conn = _client._Connection(addrs, c)  # type: ignore[arg-type]
        for t in conn.targets:
            conn._open(t)
    assert opened == [
        # With TLS material: HOST:PORT and https:// over TLS, http:// and unix: not.
        ("tls", "node1:7300"),
        ("plain", "node2:7300"),
        ("tls", "node3:7300"),
        ("plain", "unix:/run/berth/berthd.sock"),
        # Without: only https://.
        ("plain", "node1:7300"),
        ("plain", "node2:7300"),
        ("tls", "node3:7300"),
        ("plain", "unix:/run/berth/berthd.sock"),
    ]


def _openssl(*args: str, cwd) -> None:
    import subprocess

    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path):
    """A CA, a server certificate for localhost and 127.0.0.1, and alice's client certificate, made
    with the openssl command (EC P-256 keys, PKCS#8)."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make certificates with")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=berth test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=tmp_path,
    )  # fmt: skip
    for name, cn, ext in (
        ("server", "berthd", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"),
        ("alice", "alice", "extendedKeyUsage=clientAuth\n"),
    ):
        (tmp_path / f"{name}.ext").write_text(ext)
        _openssl(
            "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
            cwd=tmp_path,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
            cwd=tmp_path,
        )  # fmt: skip
    return tmp_path


def test_mutual_tls_with_a_real_server(pki, monkeypatch) -> None:
    """A gRPC server that requires a client certificate signed by the CA: the client presents
    BERTH_TLS_CERT and the server knows it as alice; without the certificate it is refused."""
    from concurrent import futures

    from berth.v1 import workers_pb2_grpc

    class NamesCaller(workers_pb2_grpc.WorkersServicer):
        def ListWorkers(self, request, context):
            cn = context.auth_context().get("x509_common_name", [b""])[0].decode()
            return workers_pb2.ListWorkersResponse(workers=[workers_pb2.Worker(id="w", owner=cn)])

    def read(name: str) -> bytes:
        return bytes((pki / name).read_bytes())

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    workers_pb2_grpc.add_WorkersServicer_to_server(NamesCaller(), server)
    creds = grpc.ssl_server_credentials(
        [(read("server.key"), read("server.pem"))],
        root_certificates=read("ca.pem"),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        monkeypatch.setenv("BERTH_TLS_CA", str(pki / "ca.pem"))
        monkeypatch.setenv("BERTH_TLS_CERT", str(pki / "alice.pem"))
        monkeypatch.setenv("BERTH_TLS_KEY", str(pki / "alice.key"))
        with berth.Client(f"127.0.0.1:{port}") as c:
            ws = c.list_workers(all_sessions=True)
        assert [(w["id"], w["owner"]) for w in ws] == [("w", "alice")]

        monkeypatch.delenv("BERTH_TLS_CERT")
        monkeypatch.delenv("BERTH_TLS_KEY")
        with berth.Client(f"127.0.0.1:{port}") as c:
            with pytest.raises(berth.BerthError):
                c._conn.call("ListWorkers", workers_pb2.ListWorkersRequest(), timeout=5)
    finally:
        server.stop(None)
