"""The connection to a berth server (``Client``) and the sessions that own workers (``Session``).

A session is a lease on the server: its workers end with it. It is renewed by a daemon thread
every ttl/3 and closed by ``Session.close`` (or the ``with`` block, or interpreter exit for the
module's default session); a process that dies without closing it lets the lease lapse, and the
server then stops its workers (reason ``session ended``).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import uuid
from typing import (
    Any,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

import grpc

from ._address import Target, default_addr, parse_addrs
from ._convert import to_dict
from ._errors import (
    BerthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    from_rpc_error,
)
from ._output import STDERR, LinePrinter, _write, guard_streams
from ._progress import Progress
from .v1 import host_pb2, host_pb2_grpc, workers_pb2, workers_pb2_grpc

#: A worker as launch, list, await and stop return it: the ``berth.v1.Worker`` fields under
#: their proto names, as the CLI's ``--json`` prints them.
Worker = Dict[str, Any]
#: A worker id, or a worker dict (its ``"id"``).
WorkerRef = Union[str, Mapping[str, Any]]
#: One worker, or several (any iterable of ids and dicts).
WorkerRefs = Union[WorkerRef, Iterable[WorkerRef]]

#: Lease of a session when neither ``session_ttl=`` nor ``BERTH_SESSION_TTL`` says otherwise.
DEFAULT_SESSION_TTL = 10.0

#: Statuses after which a worker changes no more.
ENDED = frozenset(
    {
        "WORKER_STATUS_SUCCEEDED",
        "WORKER_STATUS_FAILED",
        "WORKER_STATUS_STOPPED",
        "WORKER_STATUS_LOST",
    }
)

#: How long await_workers and close give the output threads of ended workers to print their last
#: lines.
_OUTPUT_DRAIN_S = 2.0

#: How long await_workers waits for a server that cannot be reached before it gives up.
_UNAVAILABLE_S = 30.0

_show_output = True


def set_show_output(enabled: bool) -> None:
    global _show_output
    _show_output = bool(enabled)


def worker_ids(refs: Optional[Union[WorkerRefs, Iterable[WorkerRefs]]]) -> Optional[List[str]]:
    """The ids named by ``refs`` (an id, a worker dict, or any mix of them in an iterable), in
    order and once each; ``None`` stays ``None``."""
    if refs is None:
        return None
    out: List[str] = []

    def add(r: Any) -> None:
        if isinstance(r, str):
            out.append(r)
        elif isinstance(r, Mapping):
            if "id" not in r:
                raise InvalidArgument(f'ids: a dict without "id" is no worker: {dict(r)!r:.80}')
            out.append(str(r["id"]))
        elif isinstance(r, Iterable) and not isinstance(r, (bytes, bytearray)):
            for x in r:
                add(x)
        else:
            raise InvalidArgument(f"ids: {r!r} is neither a worker id nor a worker dict")

    add(refs)
    return list(dict.fromkeys(out))


def _env_ttl() -> float:
    raw = os.environ.get("BERTH_SESSION_TTL")
    if not raw:
        return DEFAULT_SESSION_TTL
    try:
        ttl = float(raw)
    except ValueError:
        raise InvalidArgument(f"BERTH_SESSION_TTL: {raw!r} is not a number of seconds") from None
    return ttl


def _check_ttl(ttl: float) -> int:
    if not (isinstance(ttl, (int, float)) and math.isfinite(ttl) and ttl >= 1):
        raise InvalidArgument(f"session_ttl: must be at least 1 second, got {ttl!r}")
    return int(math.ceil(ttl))


def _read_pem(path: str, what: str, label: str) -> bytes:
    """The PEM file ``path``, which must hold a ``-----BEGIN …<label>-----`` block: gRPC would
    otherwise fail only at the handshake, saying little."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InvalidArgument(f"{what}: cannot read {path}: {e.strerror}") from None
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line.startswith("-----BEGIN ") and line.endswith(label + "-----"):
            return data
    raise InvalidArgument(f"{what}: no PEM block -----BEGIN …{label}----- in {path}")


def _tls_files(
    ca: Optional[str], cert: Optional[str], key: Optional[str]
) -> Dict[str, Tuple[str, str]]:
    """The TLS files to present, each with what named it: the argument (``tls_ca=``), else the
    variable (``BERTH_TLS_CA``); an empty one is unset."""
    files: Dict[str, Tuple[str, str]] = {}
    for part, given in (("ca", ca), ("cert", cert), ("key", key)):
        var = f"BERTH_TLS_{part.upper()}"
        if given:
            files[part] = (os.fspath(given), f"tls_{part}")
        elif os.environ.get(var):
            files[part] = (os.environ[var], var)
    return files


def _tls_credentials(
    ca: Optional[str] = None, cert: Optional[str] = None, key: Optional[str] = None
) -> Optional[grpc.ChannelCredentials]:
    """TLS material from the arguments, else ``BERTH_TLS_CA``/``_CERT``/``_KEY``; None: plaintext.

    The CA checks the server's certificate (without it, gRPC's own roots do); the certificate
    and key, which go together, tell a server beyond loopback who calls."""
    files = _tls_files(ca, cert, key)
    if not files:
        return None
    if ("cert" in files) != ("key" in files):
        given, missing = ("cert", "key") if "cert" in files else ("key", "cert")
        raise InvalidArgument(
            f"{files[given][1]} is set without BERTH_TLS_{missing.upper()} (tls_{missing}=): "
            "a client certificate goes with its key"
        )

    def read(part: str, label: str) -> Optional[bytes]:
        if part not in files:
            return None
        path, what = files[part]
        return _read_pem(path, what, label)

    return grpc.ssl_channel_credentials(
        root_certificates=read("ca", "CERTIFICATE"),
        private_key=read("key", "PRIVATE KEY"),
        certificate_chain=read("cert", "CERTIFICATE"),
    )


def _never_sent(e: grpc.RpcError) -> bool:
    """An UNAVAILABLE that came from connecting: the request never reached a server."""
    details = (e.details() if isinstance(e, grpc.Call) else "") or ""
    return any(
        s in details
        for s in (
            "failed to connect",
            "Connection refused",
            "No such file",
            "connections to all backends failing",
        )
    )


def _enum(enum: Any, prefix: str, value: Union[str, int], field: str) -> int:
    """``"spread"``, ``"PLACEMENT_SPREAD"`` or the number."""
    if isinstance(value, int):
        return value
    name = str(value).upper()
    if not name.startswith(prefix):
        name = prefix + name
    try:
        return int(enum.Value(name))
    except ValueError:
        names = ", ".join(n[len(prefix) :].lower() for n in enum.keys())
        raise InvalidArgument(f"{field}: {value!r} is not one of {names}") from None


class _Connection:
    """One channel at a time to one of the addresses, moving to the next on UNAVAILABLE."""

    def __init__(self, addr: str, creds: Optional[grpc.ChannelCredentials]) -> None:
        self.targets: List[Target] = parse_addrs(addr)
        self._creds = creds
        self._index = 0
        self._generation = 0
        self._channel: Optional[grpc.Channel] = None
        self._workers: Optional[workers_pb2_grpc.WorkersStub] = None
        self._lock = threading.Lock()
        self._closed = False

    def _open(self, t: Target) -> grpc.Channel:
        options: List[Tuple[str, Any]] = [
            ("grpc.max_receive_message_length", 64 << 20),
            # A restarted daemon is found again within a second, not after gRPC's default
            # back-off (up to 2 min), which a session's lease would not survive.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if t.unix:
            # gRPC would send the socket path as :authority, which the server's HTTP/2 refuses.
            # Never TLS: the kernel tells the server who calls.
            options.append(("grpc.default_authority", "localhost"))
        elif t.https or (self._creds is not None and not t.http):
            return grpc.secure_channel(
                t.target, self._creds or grpc.ssl_channel_credentials(), options
            )
        return grpc.insecure_channel(t.target, options)

    def current(self) -> Tuple[workers_pb2_grpc.WorkersStub, int, Target]:
        """The Workers stub of the current channel, its generation and its address."""
        with self._lock:
            if self._closed:
                raise FailedPrecondition("the berth client is closed")
            t = self.targets[self._index]
            if self._channel is None:
                self._channel = self._open(t)
                stub = workers_pb2_grpc.WorkersStub  # generated untyped
                self._workers = stub(self._channel)  # type: ignore[no-untyped-call,unused-ignore]
            assert self._workers is not None
            return self._workers, self._generation, t

    def channel(self) -> grpc.Channel:
        self.current()
        assert self._channel is not None
        return self._channel

    @property
    def generation(self) -> int:
        return self._generation

    def fail_over(self, generation: int) -> None:
        """Moves to the next address, unless another thread already moved on from ``generation``."""
        with self._lock:
            if generation != self._generation or len(self.targets) < 2:
                return
            if self._channel is not None:
                self._channel.close()
            self._channel = None
            self._workers = None
            self._index = (self._index + 1) % len(self.targets)
            self._generation += 1

    def call(
        self,
        method: str,
        request: Any,
        *,
        timeout: Optional[float] = None,
        retry_safe: bool = True,
        wait_for_ready: Optional[bool] = None,
    ) -> Any:
        """A unary call of ``berth.v1.Workers``; on UNAVAILABLE the next replica is tried (a call
        that may have reached the server only when ``retry_safe``)."""
        tried = 0
        while True:
            stub, gen, t = self.current()
            try:
                return getattr(stub, method)(
                    request, timeout=timeout, wait_for_ready=wait_for_ready
                )
            except grpc.RpcError as e:
                err = from_rpc_error(e, t.addr)
                if (
                    err.code == grpc.StatusCode.UNAVAILABLE
                    and tried + 1 < len(self.targets)
                    and (retry_safe or _never_sent(e))
                ):
                    self.fail_over(gen)
                    tried += 1
                    continue
                raise err from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._channel is not None:
                self._channel.close()
            self._channel = None


class _Lease(threading.Thread):
    """Renews a session every ttl/3 until stopped; tells the session when the server no longer
    knows it (closed elsewhere, or the lease lapsed while this process was stopped)."""

    def __init__(self, session: "Session", session_id: str, ttl: int) -> None:
        super().__init__(name=f"berth-lease-{session_id}", daemon=True)
        self._session = session
        self._id = session_id
        self._ttl = ttl
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        conn = self._session.client._conn
        every = max(self._ttl / 3.0, 0.1)
        wait = every
        renewed_on = conn.generation
        while not self._halt.wait(wait):
            wait = min(every, 0.25)  # a failed renewal is tried again soon
            try:
                # Waits for a server that is coming back rather than failing at once.
                conn.call(
                    "KeepAlive",
                    workers_pb2.KeepAliveRequest(session_id=self._id),
                    timeout=every,
                    wait_for_ready=len(conn.targets) == 1,
                )
                wait, renewed_on = every, conn.generation
            except NotFound as e:
                if self._halt.is_set():
                    return
                if conn.generation != renewed_on and self._reopen():
                    wait, renewed_on = every, conn.generation
                    continue
                self._session._lapsed(self._id, e.message)
                return
            except BerthError:
                continue  # the server restarting, a network hiccup: retried

    def _reopen(self) -> bool:
        """After a fail-over, the replica now answering may not hold the session yet: open it
        there under the same id."""
        try:
            self._session.client._conn.call(
                "OpenSession", workers_pb2.OpenSessionRequest(id=self._id, ttl_seconds=self._ttl)
            )
            return True
        except BerthError:
            return False


class _SessionOutput(threading.Thread):
    """Prints the output of a session's workers as it comes: one ``StreamOutput`` of the session
    with follow and ``new_workers``, opened before its first launch, so that a worker's first
    line shows as soon as it is written, before its launch has even answered. Resumes after a
    lost connection without repeating a byte (the printer skips offsets it has printed). Knows
    when each worker's output is whole (the server marks each stream's end) and ends when the
    session has ended.

    A launch made with ``show_output=False`` hides its workers: while such a launch is on its
    way, lines of workers not yet known are held back until it answers."""

    def __init__(self, client: "Client", session_id: str) -> None:
        super().__init__(name=f"berth-output-{session_id}", daemon=True)
        self.session_id = session_id
        self._client = client
        self._halt = threading.Event()
        self._call: Optional[Any] = None
        self._printer = LinePrinter()
        self._cond = threading.Condition()
        self._shown: Set[str] = set()
        self._hidden: Set[str] = set()
        self._hiding = 0  # launches with show_output=False not answered yet
        self._held: List[Any] = []
        self._whole: Dict[str, Set[int]] = {}

    def stop(self) -> None:
        self._halt.set()
        call = self._call
        if call is not None:
            call.cancel()

    # What the session's launches say ---------------------------------------------------------

    def launching(self, show: bool) -> None:
        """A launch is on its way; ``show``: whether its output is to be printed."""
        if not show:
            with self._cond:
                self._hiding += 1

    def launched(self, show: bool, ids: List[str]) -> None:
        """The launch answered with workers ``ids`` (none if it failed)."""
        with self._cond:
            (self._shown if show else self._hidden).update(ids)
            if not show:
                self._hiding -= 1
            held, self._held = self._held, []
            for chunk in held:
                self._take(chunk)

    def wait_whole(self, ids: Set[str], deadline: float) -> None:
        """Waits until the output of every worker of ``ids`` this follower prints is whole, or
        until ``deadline`` (``time.monotonic()``), or the follower's end."""
        with self._cond:
            while self.is_alive():
                left = [i for i in ids if i in self._shown and len(self._whole.get(i, ())) < 2]
                remaining = deadline - time.monotonic()
                if not left or remaining <= 0:
                    return
                self._cond.wait(min(remaining, 0.1))

    # The stream ------------------------------------------------------------------------------

    def _take(self, chunk: Any) -> None:
        """Prints ``chunk``, holds it back or drops it (under the lock: held chunks are printed
        from the launching thread, in order)."""
        wid = chunk.worker_id
        with self._cond:
            if wid in self._hidden or not self._client._showing_output():
                return
            if wid not in self._shown and self._hiding:
                self._held.append(chunk)
                return
            if chunk.data:
                self._printer.push(wid, chunk.stream, chunk.data, chunk.offset)
                return
            # A stream's end: its unfinished last line is written out.
            self._printer.end(wid, chunk.stream)
            self._whole.setdefault(wid, set()).add(chunk.stream)
            self._cond.notify_all()

    def run(self) -> None:
        conn = self._client._conn
        failures = 0
        try:
            while not self._halt.is_set():
                try:
                    stub, gen, t = conn.current()
                except BerthError:
                    return
                request = workers_pb2.StreamOutputRequest(
                    session_id=self.session_id, follow=True, from_start=True, new_workers=True
                )
                try:
                    self._call = stub.StreamOutput(request)
                    if self._halt.is_set():
                        self._call.cancel()
                    for chunk in self._call:
                        self._take(chunk)
                        failures = 0
                    if self._session_ended():
                        return
                    # The stream ended early (a daemon shutting down ends it cleanly): resume.
                    failures += 1
                    self._halt.wait(min(0.1 * 2**failures, 1.0))
                    continue
                except grpc.RpcError as e:
                    code = e.code() if isinstance(e, grpc.Call) else None
                    if self._halt.is_set() or code in (
                        grpc.StatusCode.CANCELLED,
                        grpc.StatusCode.NOT_FOUND,
                    ):
                        return
                    if (
                        code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
                        and failures < 20
                    ):
                        failures += 1
                        if failures > 1:
                            conn.fail_over(gen)
                        self._halt.wait(min(0.1 * 2**failures, 2.0))
                        continue
                    err = from_rpc_error(e, t.addr)
                    _write(STDERR, f"berth: output of session {self.session_id}: {err}\n")
                    return
        finally:
            with self._cond:
                self._printer.finish()
                self._cond.notify_all()

    def _session_ended(self) -> bool:
        """Whether the session has ended, as the server says (a failed question: yes, unless
        the server is coming back)."""
        try:
            self._client._conn.call(
                "KeepAlive", workers_pb2.KeepAliveRequest(session_id=self.session_id), timeout=10
            )
        except Unavailable:
            return False
        except BerthError:
            return True
        return False


class Session:
    """A session: the workers it launches end with it. Use it as a context manager, or call
    ``close()``::

        with client.session() as s:
            workers = s.launch_workers(n=2, cpu=0.2, memory=0.5, code="print('hi')")
            s.await_workers(workers)
        # the session is closed: any of its workers still running was stopped

    A session is opened on the server when first used; a daemon thread renews its lease every
    ttl/3. ``id`` is its server-side id (the workers' ``session_id``).
    """

    def __init__(
        self,
        client: "Client",
        ttl: Optional[float] = None,
        labels: Optional[Mapping[str, str]] = None,
        *,
        reopen: bool = False,
    ) -> None:
        self.client = client
        self.ttl = _check_ttl(client.session_ttl if ttl is None else ttl)
        self.labels = {str(k): str(v) for k, v in (labels or {}).items()}
        self._reopen = reopen
        self._id: Optional[str] = None
        self._lease: Optional[_Lease] = None
        self._ended: Optional[str] = None
        self._output: Optional[_SessionOutput] = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        state = (
            "not open" if self._id is None else (f"ended: {self._ended}" if self._ended else "open")
        )
        return f"<berth.Session {self._id or ''} ttl={self.ttl}s {state}>"

    def __enter__(self) -> "Session":
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def id(self) -> str:
        """The session's id; opens the session if it is not open yet."""
        return self._known_id()

    @property
    def ended(self) -> Optional[str]:
        """Why the session ended (``"closed"``, or the server's word when its lease lapsed), or
        None while it is open."""
        return self._ended

    def open(self) -> "Session":
        """Opens the session on the server now (otherwise its first use does)."""
        self._open_id()
        return self

    def _known_id(self) -> str:
        """The id to name this session by: an ended session is still named (its workers are
        kept and listed); one never opened is opened."""
        with self._lock:
            if self._id is not None:
                return self._id
        return self._open_id()

    def _open_id(self) -> str:
        """The id of an open session to launch in; an ended default session is replaced."""
        with self._lock:
            if self._id is not None and self._ended is None:
                return self._id
            if self._id is not None and not self._reopen:
                raise FailedPrecondition(f"session {self._id} has ended ({self._ended})")
            if self._id is not None:
                _write(
                    STDERR,
                    f"berth: session {self._id} has ended ({self._ended}); opening a new one\n",
                )
            s = self.client._conn.call(
                "OpenSession",
                workers_pb2.OpenSessionRequest(ttl_seconds=self.ttl, labels=self.labels),
            )
            self._id, self._ended = str(s.id), None
            self._lease = _Lease(self, s.id, self.ttl)
            self._lease.start()
            return self._id

    def _lapsed(self, session_id: str, why: str) -> None:
        with self._lock:
            if self._id != session_id or self._ended is not None:
                return
            self._ended = f"lease lapsed: {why}"
            self._lease = None
        _write(
            STDERR,
            f"berth: session {session_id} has ended on the server ({why}); its workers were stopped\n",
        )

    def close(self, grace_seconds: Optional[int] = None) -> List[Worker]:
        """Closes the session: the server stops its workers still running (SIGTERM, SIGKILL after
        ``grace_seconds``, default 10) and they are returned. Idempotent."""
        with self._lock:
            sid, lease, ended = self._id, self._lease, self._ended
            self._lease = None
            self._reopen = False
            if sid is None:
                self._ended = "closed"
                return []
            self._ended = "closed"
        if lease is not None:
            lease.stop()
        stopped: List[Worker] = []
        if ended is None:
            req = workers_pb2.CloseSessionRequest(session_id=sid)
            if grace_seconds is not None:
                req.grace_seconds = int(grace_seconds)
            try:
                # A daemon restarting gets a moment to come back: else the workers run on
                # until the lease lapses.
                conn = self.client._conn
                resp = conn.call(
                    "CloseSession", req, timeout=3, wait_for_ready=len(conn.targets) == 1
                )
                stopped = [to_dict(w) for w in resp.stopped]
            except NotFound:
                pass  # already ended: its lease lapsed
        self._drain_output(None)
        return stopped

    # The workbench's calls -------------------------------------------------------------------

    def launch_workers(
        self,
        n: int,
        cpu: float,
        memory: float,
        nvidia_gpu: int = 0,
        kernel: str = "python3",
        script: str = "",
        code: str = "",
        env: Optional[Mapping[str, Any]] = None,
        *,
        command: Optional[Sequence[str]] = None,
        workdir: Optional[str] = None,
        master_ip: str = "",
        network: Optional[Union[str, int]] = None,
        labels: Optional[Mapping[str, str]] = None,
        constraints: Optional[Mapping[str, str]] = None,
        placement: Optional[Union[str, int]] = None,
        max_restarts: Optional[int] = None,
        run_as_root: bool = False,
        request_id: Optional[str] = None,
        show_output: Optional[bool] = None,
    ) -> List[Worker]:
        """Starts ``n`` workers in this session, all or none; see :func:`berth.launch_workers`."""
        req = _launch_request(
            n,
            cpu,
            memory,
            nvidia_gpu,
            kernel,
            script,
            code,
            env,
            command,
            workdir,
            master_ip,
            network,
            labels,
            constraints,
            placement,
            max_restarts,
            run_as_root=run_as_root,
        )
        req.session_id = self._open_id()
        # A retried launch (on the next replica) with the same id launches once.
        req.request_id = str(request_id) if request_id else uuid.uuid4().hex
        show = self.client._showing_output() if show_output is None else show_output
        output = self._output_of(req.session_id) if show else self._output
        if output is not None:
            output.launching(show)
        workers: List[Worker] = []
        try:
            resp = self.client._conn.call("LaunchWorkers", req, retry_safe=True)
            workers = [to_dict(w) for w in resp.workers]
        finally:
            if output is not None:
                output.launched(show, [w["id"] for w in workers])
        return workers

    def _output_of(self, session_id: str) -> "_SessionOutput":
        """The follower of this session's output, started (before the first launch it shows, so
        that it follows that launch's workers from their first byte) if none runs."""
        guard_streams()
        with self._lock:
            out = self._output
            if out is None or out.session_id != session_id or not out.is_alive():
                if out is not None:
                    out.stop()
                out = _SessionOutput(self.client, session_id)
                self._output = out
                out.start()
            return out

    def list_workers(
        self, all_sessions: bool = False, *, statuses: Optional[Iterable[Union[str, int]]] = None
    ) -> List[Worker]:
        """This session's workers (``all_sessions=True``: every worker the caller may see)."""
        req = workers_pb2.ListWorkersRequest()
        if not all_sessions:
            req.session_id = self._known_id()
        for s in statuses or ():
            req.statuses.append(_enum(workers_pb2.WorkerStatus, "WORKER_STATUS_", s, "statuses"))
        return [to_dict(w) for w in self.client._conn.call("ListWorkers", req).workers]

    def await_workers(
        self,
        ids: Optional[WorkerRefs] = None,
        wait_for_completion: bool = True,
        timeout_seconds: Optional[float] = 60,
        *,
        progress: Optional[bool] = None,
    ) -> Dict[str, List[Worker]]:
        """Waits for workers; see :func:`berth.await_workers`."""
        wanted = worker_ids(ids)
        if wanted is not None and not wanted:
            return {"workers": [], "failures": []}
        if timeout_seconds is not None and not (
            isinstance(timeout_seconds, (int, float)) and timeout_seconds >= 0
        ):
            raise InvalidArgument(
                f"timeout_seconds: must be >= 0 (0: no timeout), got {timeout_seconds!r}"
            )
        deadline = time.monotonic() + timeout_seconds if timeout_seconds else None
        wfc = bool(wait_for_completion)
        order: List[str] = list(wanted or [])
        decided: Dict[str, Tuple[bool, Worker]] = {}
        latest: Dict[str, Worker] = {}
        shown = Progress(progress)
        first = True
        down_since = 0.0
        try:
            while first or latest:
                if not first and deadline is not None and time.monotonic() >= deadline:
                    break
                req = workers_pb2.AwaitWorkersRequest(wait_for_completion=wfc, timeout_seconds=1)
                if first and wanted is None:
                    req.session_id = self._known_id()
                else:
                    req.ids.extend(latest if not first else order)
                try:
                    resp = self.client._conn.call("AwaitWorkers", req, timeout=30)
                except Unavailable:
                    # A daemon restarting (its workers keep running): wait for it, within the
                    # timeout and for _UNAVAILABLE_S at most.
                    now = time.monotonic()
                    down_since = down_since or now
                    if now - down_since > _UNAVAILABLE_S or (deadline and now >= deadline):
                        raise
                    time.sleep(0.5)
                    continue
                down_since = 0.0
                for w in resp.workers:
                    d = to_dict(w)
                    decided[d["id"]] = (True, d)
                    latest.pop(d["id"], None)
                for w in resp.failures:
                    d = to_dict(w)
                    if d["status"] in ENDED:  # failed, stopped, lost: no waiting changes that
                        decided[d["id"]] = (False, d)
                        latest.pop(d["id"], None)
                    else:
                        latest[d["id"]] = d
                if first and wanted is None:
                    order = [w.id for w in resp.workers] + [w.id for w in resp.failures]
                first = False
                ok = sum(1 for good, _ in decided.values() if good)
                shown.update(Progress.text(ok, len(order), len(decided) - ok, wfc))
            # The last lines of the workers that ended, before the caller goes on.
            self._drain_output({wid for wid, (_, d) in decided.items() if d["status"] in ENDED})
        finally:
            shown.close()
        for wid, d in latest.items():  # short of the wanted state at the timeout
            decided[wid] = (False, d)
        return {
            "workers": [decided[i][1] for i in order if i in decided and decided[i][0]],
            "failures": [decided[i][1] for i in order if i in decided and not decided[i][0]],
        }

    def stop_workers(
        self, *worker_id: WorkerRefs, grace_seconds: Optional[int] = None
    ) -> List[Worker]:
        """Stops the named workers, or with none named all of this session's; returns them."""
        ids = worker_ids(worker_id) or []
        req = workers_pb2.StopWorkersRequest(ids=ids)
        if not ids:
            req.session_id = self._known_id()
        if grace_seconds is not None:
            req.grace_seconds = int(grace_seconds)
        return [to_dict(w) for w in self.client._conn.call("StopWorkers", req).workers]

    def stream_output(
        self, ids: Optional[WorkerRefs] = None, follow: bool = True, from_start: bool = True
    ) -> Iterator[Dict[str, Any]]:
        """The output of ``ids`` (default: this session's workers) as ``OutputChunk`` dicts:
        ``{"worker_id", "stream": "STREAM_STDOUT"|"STREAM_STDERR", "data": bytes, "offset"}``.
        ``follow``: until every selected worker has ended; ``from_start``: what was written before
        too. Closing the iterator cancels the stream."""
        wanted = worker_ids(ids)
        req = workers_pb2.StreamOutputRequest(follow=follow, from_start=from_start)
        if wanted is None:
            req.session_id = self._known_id()
        else:
            req.ids.extend(wanted)
        stub, _, t = self.client._conn.current()
        call = stub.StreamOutput(req)
        try:
            for chunk in call:
                yield to_dict(chunk)
        except grpc.RpcError as e:
            raise from_rpc_error(e, t.addr) from None
        finally:
            call.cancel()

    def _drain_output(self, ended: Optional[Set[str]]) -> None:
        """Gives the output follower a moment to print the last lines of the workers ``ended``
        (None: the session ended; its follower ends once all is printed)."""
        deadline = time.monotonic() + _OUTPUT_DRAIN_S
        with self._lock:
            out = self._output
        if out is None:
            return
        if ended is None:
            out.join(max(0.0, deadline - time.monotonic()))
        else:
            out.wait_whole(ended, deadline)

    def _stop_output(self) -> None:
        with self._lock:
            out, self._output = self._output, None
        if out is not None:
            out.stop()


def _launch_request(
    n: Any,
    cpu: Any,
    memory: Any,
    nvidia_gpu: Any,
    kernel: Optional[str],
    script: Optional[str],
    code: Optional[str],
    env: Optional[Mapping[str, Any]],
    command: Optional[Sequence[str]],
    workdir: Optional[str],
    master_ip: str,
    network: Optional[Union[str, int]],
    labels: Optional[Mapping[str, str]],
    constraints: Optional[Mapping[str, str]],
    placement: Optional[Union[str, int]],
    max_restarts: Optional[int],
    *,
    run_as_root: bool = False,
) -> Any:
    """The LaunchWorkersRequest; what the request cannot carry (a negative or fractional ``n``, a
    ``cpu`` that is no number) is refused here with the server's error (the field named); the
    rest the server checks."""

    def count(name: str, v: Any, least: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < least or v >= 2**32:
            if isinstance(v, float) and v.is_integer() and least <= v < 2**32:
                return int(v)
            raise InvalidArgument(f"{name}: must be a whole number of at least {least}, got {v!r}")
        return v

    def number(name: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidArgument(f"{name}: must be a number, got {v!r}")
        return float(v)

    if isinstance(n, int) and not isinstance(n, bool) and n < 1:
        raise InvalidArgument(f"n: must be at least 1, got {n}")
    req = workers_pb2.LaunchWorkersRequest(
        n=count("n", n, 1),
        cpu=number("cpu", cpu),
        memory_gb=number("memory", memory),
        nvidia_gpu=count("nvidia_gpu", nvidia_gpu or 0, 0),
        script=script or "",
        code=code or "",
        master_ip=master_ip or "",
        run_as_root=bool(run_as_root),
    )
    if command:
        if isinstance(command, str):
            raise InvalidArgument("command: an argv list, not a string")
        req.command.extend(str(a) for a in command)
        # The kernel's default gives way to a command; a kernel named with it is the server's
        # INVALID_ARGUMENT.
        req.kernel = "" if kernel in (None, "", "python3") else kernel
    else:
        req.kernel = kernel or ""
    if env:  # {} and None (and R's "") mean none
        if not isinstance(env, Mapping):
            raise InvalidArgument(
                f"env: must be a dict of names to values, got {type(env).__name__}"
            )
        for k, v in env.items():
            req.env[str(k)] = str(v)
    for k, v in (labels or {}).items():
        req.labels[str(k)] = str(v)
    for k, v in (constraints or {}).items():
        req.constraints[str(k)] = str(v)
    # Scripts are resolved against the workdir: the caller's directory, as the CLI does.
    req.workdir = os.getcwd() if workdir is None else (os.path.abspath(workdir) if workdir else "")
    if network is not None:
        setattr(req, "network", _enum(workers_pb2.NetworkMode, "NETWORK_MODE_", network, "network"))
    if placement is not None:
        setattr(
            req, "placement", _enum(workers_pb2.Placement, "PLACEMENT_", placement, "placement")
        )
    if max_restarts is not None:
        req.restart.mode = workers_pb2.RestartPolicy.MODE_ON_FAILURE
        req.restart.max_restarts = count("max_restarts", max_restarts, 0)
    return req


class Client:
    """A connection to a berth server (a host's ``berthd`` or a ``berth-scheduler``), with a
    default session that its workbench calls use::

        with berth.Client("unix:/run/berth/berthd.sock") as c:
            workers = c.launch_workers(n=2, cpu=0.2, memory=0.5, code="print('hi')")
            c.await_workers(workers)
        # the session is closed (its workers stopped), the connection too

    ``addr``: ``HOST:PORT``, ``http://HOST:PORT``, ``https://HOST:PORT`` or ``unix:PATH``, or a
    comma-separated list of scheduler replicas tried in turn; default ``BERTH_ADDR``, else
    ``127.0.0.1:7300``. ``session_ttl``: the lease of its sessions in seconds (default
    ``BERTH_SESSION_TTL``, else 10). ``tls_ca``/``tls_cert``/``tls_key``: PEM files (default
    ``BERTH_TLS_CA``/``_CERT``/``_KEY``). ``show_output``: print the output of launched workers
    (default: as :func:`berth.show_output` says).
    """

    def __init__(
        self,
        addr: Optional[str] = None,
        *,
        session_ttl: Optional[float] = None,
        tls_ca: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
        show_output: Optional[bool] = None,
    ) -> None:
        self.addr = addr or default_addr()
        self.session_ttl = float(_env_ttl() if session_ttl is None else session_ttl)
        _check_ttl(self.session_ttl)
        self.show_output = show_output
        self._conn = _Connection(self.addr, _tls_credentials(tls_ca, tls_cert, tls_key))
        self._lock = threading.Lock()
        self._default: Optional[Session] = None
        self._sessions: List[Session] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"<berth.Client {self.addr}>"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _showing_output(self) -> bool:
        return _show_output if self.show_output is None else self.show_output

    @property
    def default_session(self) -> Session:
        """The session that this client's own workbench calls use, opened on first use (and
        opened afresh should it end on the server, its lease lapsed)."""
        with self._lock:
            if self._closed:
                raise FailedPrecondition("the berth client is closed")
            if self._default is None:
                self._default = Session(self, reopen=True)
            return self._default

    def session(
        self, ttl: Optional[float] = None, labels: Optional[Mapping[str, str]] = None
    ) -> Session:
        """A new session, opened now; close it (or use it in a ``with`` block) to stop its workers."""
        s = Session(self, ttl, labels)
        with self._lock:
            if self._closed:
                raise FailedPrecondition("the berth client is closed")
            self._sessions.append(s)
        return s.open()

    def close(self) -> None:
        """Closes the sessions this client opened (their workers are stopped) and the connection.
        Idempotent. A session that cannot be closed (the server is gone) is reported on stderr:
        its workers end when its lease lapses."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions = ([self._default] if self._default else []) + self._sessions
        for s in sessions:
            try:
                s.close()
            except BerthError as e:
                _write(
                    STDERR,
                    f"berth: could not close session {s._id} ({e}); its workers end when its "
                    f"lease lapses (within {s.ttl} s)\n",
                )
            s._stop_output()
        self._conn.close()

    # The workbench's calls on the default session ----------------------------------------

    def launch_workers(
        self,
        n: int,
        cpu: float,
        memory: float,
        nvidia_gpu: int = 0,
        kernel: str = "python3",
        script: str = "",
        code: str = "",
        env: Optional[Mapping[str, Any]] = None,
        **request: Any,
    ) -> List[Worker]:
        """:func:`berth.launch_workers` in this client's default session."""
        return self.default_session.launch_workers(
            n, cpu, memory, nvidia_gpu, kernel, script, code, env, **request
        )

    def list_workers(self, all_sessions: bool = False, **kw: Any) -> List[Worker]:
        """:func:`berth.list_workers` of this client's default session."""
        return self.default_session.list_workers(all_sessions, **kw)

    def await_workers(
        self,
        ids: Optional[WorkerRefs] = None,
        wait_for_completion: bool = True,
        timeout_seconds: Optional[float] = 60,
        **kw: Any,
    ) -> Dict[str, List[Worker]]:
        """:func:`berth.await_workers` (``ids`` None: the default session's workers)."""
        return self.default_session.await_workers(ids, wait_for_completion, timeout_seconds, **kw)

    def stop_workers(
        self, *worker_id: WorkerRefs, grace_seconds: Optional[int] = None
    ) -> List[Worker]:
        """:func:`berth.stop_workers` (no ids: the default session's workers)."""
        return self.default_session.stop_workers(*worker_id, grace_seconds=grace_seconds)

    def stream_output(
        self, ids: Optional[WorkerRefs] = None, follow: bool = True, from_start: bool = True
    ) -> Iterator[Dict[str, Any]]:
        """:meth:`Session.stream_output` (``ids`` None: the default session's workers)."""
        return self.default_session.stream_output(ids, follow, from_start)

    def host_info(self) -> Dict[str, Any]:
        """``berth.v1.Host/GetHostInfo`` of a host daemon, as a dict (``berth info --json``)."""
        stub = host_pb2_grpc.HostStub(self._conn.channel())  # type: ignore[no-untyped-call,unused-ignore]
        try:
            info: Dict[str, Any] = to_dict(stub.GetHostInfo(host_pb2.GetHostInfoRequest()))
            return info
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.addr) from None
