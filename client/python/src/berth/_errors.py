"""Errors of berth calls: one exception class per gRPC status code that a caller handles,
each carrying the code and the server's message (as google-api-core maps ``grpc.RpcError``)."""

from __future__ import annotations

from typing import Dict, Optional, Type

import grpc


class BerthError(Exception):
    """A berth call failed. ``code`` is the ``grpc.StatusCode``, ``message`` what the server said
    (for a refused launch, the field at fault or what was short)."""

    #: The status code of this class; a plain ``BerthError`` carries the code it was made with.
    grpc_code: Optional[grpc.StatusCode] = None

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None) -> None:
        super().__init__(message)
        self.message = message
        self.code: grpc.StatusCode = code or self.grpc_code or grpc.StatusCode.UNKNOWN

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(BerthError):
    """A malformed request (``n`` < 1, ``cpu`` <= 0, an unknown kernel, …); the message names the
    field."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(BerthError):
    """An unknown worker or session id."""

    grpc_code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(BerthError):
    """A well-formed launch that does not fit (CPU, memory, GPUs, addresses, worker slots); the
    message says what is short. Nothing was launched."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(BerthError):
    """The host cannot run it: the kernel's interpreter is missing, ``script`` or ``workdir`` does
    not exist; or the session has ended."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(BerthError):
    """The worker or session belongs to someone else, or the caller's role does not allow it."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(BerthError):
    """The server cannot tell who the caller is (no peer credentials, no client certificate)."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(BerthError):
    """No server could be reached (every address tried), or a host behind the scheduler could not."""

    grpc_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(BerthError):
    """The call did not finish in time."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: Dict[grpc.StatusCode, Type[BerthError]] = {
    cls.grpc_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        Unavailable,
        DeadlineExceeded,
    )
    if cls.grpc_code is not None
}


def error_for(code: grpc.StatusCode, message: str) -> BerthError:
    """The exception for ``code``: its own class, else a plain ``BerthError`` that keeps it."""
    return _BY_CODE.get(code, BerthError)(message, code)


def from_rpc_error(e: grpc.RpcError, where: str = "") -> BerthError:
    """The exception for a failed gRPC call; ``where`` (the address) prefixes a connect failure."""
    code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = (e.details() if isinstance(e, grpc.Call) else None) or str(e)
    if code == grpc.StatusCode.UNAVAILABLE and where:
        message = f"{where}: {message}"
    return error_for(code, message)
