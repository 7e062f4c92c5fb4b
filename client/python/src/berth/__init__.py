"""berth from Python: the workers API of a data-science workbench, on a berth daemon or cluster.

Scripts written for the workbench run with only the import changed::

    import berth as cdsw

    workers = cdsw.launch_workers(n=2, cpu=0.2, memory=0.5, code="print('Hello from a CDSW Worker')")
    cdsw.await_workers(workers, wait_for_completion=True, timeout_seconds=60)
    cdsw.list_workers()
    cdsw.stop_workers(*[w["id"] for w in workers])

The module-level calls share one :class:`Client` (address from ``BERTH_ADDR``, default
``127.0.0.1:7300``) and one :class:`Session`, opened on first use, renewed by a daemon thread
every ttl/3 (``BERTH_SESSION_TTL``, default 10 s) and closed at interpreter exit, which stops the
session's workers. If the process dies without closing it, the lease lapses and the server stops
them. The output of the session's workers is printed as it comes, each line as ``[<id>] <line>``
(stdout to ``sys.stdout``, stderr to ``sys.stderr``); :func:`show_output` turns that off.

Workers are dicts of the ``berth.v1.Worker`` fields under their proto names, as ``berth --json``
prints them: ``{"id": "k3x…", "status": "WORKER_STATUS_RUNNING", "ip_address": "10.213.0.7",
"exit_code": None, "created_at": "2026-01-01T12:00:00.123Z", "owner": "alice", "user": "alice",
…}``.

TLS: a server beyond loopback knows its caller by a client certificate: ``BERTH_TLS_CA`` (the
CA that signs the server's certificate), ``BERTH_TLS_CERT`` and ``BERTH_TLS_KEY`` (this caller's
certificate and key), or ``Client(tls_ca=, tls_cert=, tls_key=)``. On the Unix socket and on
loopback the server knows the caller from the kernel and none is needed (a server that serves
TLS on loopback too needs the CA alone).

Failed calls raise :class:`BerthError` subclasses per gRPC status (:class:`InvalidArgument`,
:class:`NotFound`, :class:`ResourceExhausted`, …), with ``.code`` and the server's message.
"""

from __future__ import annotations

import atexit
import threading
from typing import Any, Dict, List, Mapping, Optional

from ._address import DEFAULT_ADDR
from ._client import (
    DEFAULT_SESSION_TTL,
    Client,
    Session,
    Worker,
    WorkerRef,
    WorkerRefs,
    set_show_output,
    worker_ids,
)
from ._errors import (
    BerthError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__version__ = "0.1.0"

__all__ = [
    "launch_workers",
    "list_workers",
    "await_workers",
    "stop_workers",
    "show_output",
    "default_client",
    "Client",
    "Session",
    "Worker",
    "WorkerRef",
    "WorkerRefs",
    "worker_ids",
    "BerthError",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "FailedPrecondition",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
    "DeadlineExceeded",
    "DEFAULT_ADDR",
    "DEFAULT_SESSION_TTL",
]

_default: Optional[Client] = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The :class:`Client` behind the module-level calls, made on first use from ``BERTH_ADDR``,
    ``BERTH_SESSION_TTL`` and ``BERTH_TLS_*``, and closed at interpreter exit (which closes its
    session, stopping the session's workers)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
            atexit.register(_close_default)
        return _default


def _close_default() -> None:
    global _default
    with _default_lock:
        client, _default = _default, None
    if client is not None:
        client.close()


def show_output(enabled: bool = True) -> None:
    """Print the output of launched workers in this process (the default), or not::

        berth.show_output(False)   # launches from now on stay quiet; running output stops

    Applies to every :class:`Client` not made with its own ``show_output=``.
    """
    set_show_output(enabled)


def launch_workers(
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
    """Starts ``n`` workers in this session, all or none, and returns them as dicts (status at
    least ``WORKER_STATUS_PENDING``)::

        workers = cdsw.launch_workers(n=2, cpu=0.2, memory=0.5, code="print('Hello from a CDSW Worker')")
        workers = cdsw.launch_workers(2, 0.2, 0.5, script="worker.py")
        workers = cdsw.launch_workers(1, cpu=1, memory=2, kernel="r", code="print(1:3)")

    ``cpu``: cores per worker (a hard cap); ``memory``: GiB per worker (a hard limit, OOM kill
    beyond); ``nvidia_gpu``: whole GPUs per worker. ``kernel``: ``"python3"`` or ``"r"``;
    ``script``: a file to run, relative to ``workdir`` (wins over ``code``); ``code``: source to
    run; ``env``: extra environment variables. Every worker sees ``CDSW_MASTER_IP`` (this
    process's address as the workers reach it), ``BERTH_WORKER_ID`` and ``BERTH_WORKER_IP``.

    More of the request, by keyword: ``command=[argv…]`` (any program instead of a kernel),
    ``workdir=`` (default: the current directory), ``master_ip=``, ``network=`` (``"bridge"``,
    ``"host"``, ``"none"``), ``labels=``, ``constraints=``, ``placement=`` (``"binpack"``,
    ``"spread"``), ``max_restarts=`` (restart on failure), ``run_as_root=True`` (workers that run
    as root instead of as you: only root or an admin may, where the host allows it, else
    :class:`PermissionDenied`), ``request_id=`` (a retry with the same id, within 10 minutes,
    returns the first launch's workers; default: a fresh id per call), ``show_output=`` (this
    launch's output printed here, default :func:`show_output`).

    Raises :class:`InvalidArgument` (the message names the field: ``n``, ``cpu``, ``kernel``, …),
    :class:`ResourceExhausted` (does not fit; says what is short), :class:`FailedPrecondition`
    (the script, workdir or interpreter is missing on the host).
    """
    return default_client().launch_workers(
        n, cpu, memory, nvidia_gpu, kernel, script, code, env, **request
    )


def list_workers(all_sessions: bool = False, **kw: Any) -> List[Worker]:
    """This session's workers, as dicts, ended ones included::

        for w in cdsw.list_workers():
            print(w["id"], w["status"], w["ip_address"])

    ``all_sessions=True``: every worker of yours the server knows, from any session (and none).
    ``statuses=["running", …]`` filters by status.
    """
    return default_client().list_workers(all_sessions, **kw)


def await_workers(
    ids: Optional[WorkerRefs] = None,
    wait_for_completion: bool = True,
    timeout_seconds: Optional[float] = 60,
    **kw: Any,
) -> Dict[str, List[Worker]]:
    """Waits until the workers have all finished successfully (``wait_for_completion=True``) or
    are all running (``False``), at most ``timeout_seconds`` (``0``: no timeout)::

        result = cdsw.await_workers(workers, wait_for_completion=False)
        ips = [w["ip_address"] for w in result["workers"]]
        cdsw.await_workers(workers[0]["id"])              # one id
        cdsw.await_workers([w["id"] for w in workers])    # ids
        cdsw.await_workers()                              # every worker of this session

    ``ids``: one id, a list of ids, the dicts launch/list returned, or None (this session's
    workers). Returns ``{"workers": [...], "failures": [...]}``: those that reached the wanted
    state, and those that did not (failed, stopped, lost, or still short of it at the timeout);
    every worker named is in exactly one list. While it waits it shows ``k/N finished, f failed``
    on a terminal (stderr) or in a notebook; ``progress=False`` hides it.
    """
    return default_client().await_workers(ids, wait_for_completion, timeout_seconds, **kw)


def stop_workers(*worker_id: WorkerRefs, grace_seconds: Optional[int] = None) -> List[Worker]:
    """Stops the named workers (SIGTERM to all their processes, SIGKILL after ``grace_seconds``,
    default 10), or with no ids every worker of this session; returns them::

        cdsw.stop_workers(*[w["id"] for w in workers])
        cdsw.stop_workers()                                # all of this session's

    Stopping a worker that has already ended is no error.
    """
    return default_client().stop_workers(*worker_id, grace_seconds=grace_seconds)
