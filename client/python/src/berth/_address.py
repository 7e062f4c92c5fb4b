"""Server addresses as the CLI takes them: ``HOST:PORT``, ``http://HOST:PORT``,
``https://HOST:PORT`` or ``unix:PATH``; a comma-separated list names scheduler replicas, tried in
turn.

With TLS material (``BERTH_TLS_*``) a ``HOST:PORT`` is reached over TLS; ``https://`` always is,
``http://`` and ``unix:`` never are."""

from __future__ import annotations

import os
from typing import List, NamedTuple

from ._errors import InvalidArgument

#: Where the client goes when neither an address nor ``BERTH_ADDR`` is given.
DEFAULT_ADDR = "127.0.0.1:7300"


class Target(NamedTuple):
    """One server: what it was called (for messages), the gRPC target, its scheme if one was
    written (``https``: TLS; ``http``: plaintext, TLS material or not), and whether it is a Unix
    socket (never TLS)."""

    addr: str
    target: str
    https: bool
    unix: bool
    http: bool = False


def default_addr() -> str:
    """``BERTH_ADDR``, else ``127.0.0.1:7300``."""
    return os.environ.get("BERTH_ADDR") or DEFAULT_ADDR


def parse_addrs(addr: str) -> List[Target]:
    """The servers named by ``addr``, in the order to try them.

    >>> [t.target for t in parse_addrs("unix:/run/berth/berthd.sock, http://a:7400,b:7400")]
    ['unix:/run/berth/berthd.sock', 'a:7400', 'b:7400']
    """
    targets = []
    for part in (p.strip() for p in addr.split(",")):
        if not part:
            continue
        if part.startswith("unix:"):
            path = part[len("unix:") :]
            # unix:///abs is unix:/abs (as the CLI reads it)
            if path.startswith("//"):
                path = path[2:]
            if not path:
                raise InvalidArgument(f"addr: {part!r} names no socket path")
            targets.append(Target(part, f"unix:{path}", https=False, unix=True))
            continue
        https = http = False
        rest = part
        if "://" in part:
            scheme, rest = part.split("://", 1)
            if scheme not in ("http", "https"):
                raise InvalidArgument(
                    f"addr: {part!r}: scheme {scheme!r} (want HOST:PORT, http://HOST:PORT, "
                    "https://HOST:PORT or unix:PATH)"
                )
            https, http = scheme == "https", scheme == "http"
            rest = rest.rstrip("/")
        if not rest or ":" not in rest:
            raise InvalidArgument(f"addr: {part!r} is not HOST:PORT, http://HOST:PORT or unix:PATH")
        targets.append(Target(part, rest, https=https, unix=False, http=http))
    if not targets:
        raise InvalidArgument(f"addr: {addr!r} names no server")
    return targets
