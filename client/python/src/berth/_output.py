"""Workers' output in the launching process: every line prefixed with its worker's id,
``[<id>] <line>``, workers' stdout to ``sys.stdout`` and stderr to ``sys.stderr`` (looked up at
every write, so a notebook or a redirected stdout captures it)."""

from __future__ import annotations

import sys
import threading
from typing import Dict, Iterable, Optional, TextIO, Tuple

#: A partial line longer than this is written out (and ended) rather than held back for ever.
MAX_PENDING = 64 << 10

STDERR = 2  # berth.v1.Stream.STREAM_STDERR

_write_lock = threading.Lock()

#: The progress line that await_workers keeps at the bottom of a terminal's stderr, if any.
_status: Optional[str] = None


def _put(out: TextIO, text: str) -> None:
    try:
        out.write(text)
        out.flush()
    except (ValueError, OSError):  # closed at interpreter exit, or a reader that went away
        pass


def _write(stream: int, text: str) -> None:
    # Looked up now, not at import: IPython and pytest replace sys.stdout after we are imported.
    out = sys.stderr if stream == STDERR else sys.stdout
    if out is None:
        return
    with _write_lock:
        err = sys.stderr
        if _status is not None and err is not None:
            _put(err, "\r\x1b[K")  # the lines go above the progress line, not into it
        _put(out, text)
        if _status is not None and err is not None:
            _put(err, _status)


def show_status(text: Optional[str]) -> None:
    """Shows ``text`` as the progress line on stderr (a terminal), rewritten in place; None ends
    it (the cursor goes to the next line)."""
    global _status
    err = sys.stderr
    with _write_lock:
        if err is not None:
            _put(
                err,
                f"\r{text}\x1b[K" if text is not None else ("\n" if _status is not None else ""),
            )
        _status = f"\r{text}\x1b[K" if text is not None else None


def prefix_lines(worker_id: str, data: bytes) -> str:
    """``[id] `` before every line of ``data``; a last line without newline gets one."""
    parts = data.split(b"\n")
    last = parts.pop()
    lines = [p + b"\n" for p in parts] + ([last + b"\n"] if last else [])
    tag = f"[{worker_id}] "
    return "".join(tag + line.decode("utf-8", errors="replace") for line in lines)


class LinePrinter:
    """Cuts the chunks of several workers into whole lines so that lines of different workers never
    interleave mid-line; holds each (worker, stream)'s unfinished line until its newline comes, and
    skips bytes it has already printed (a stream resumed from the start after a reconnection)."""

    def __init__(self) -> None:
        self._pending: Dict[Tuple[str, int], bytearray] = {}
        self._next: Dict[Tuple[str, int], int] = {}

    def push(self, worker_id: str, stream: int, data: bytes, offset: int) -> None:
        key = (worker_id, stream)
        seen = self._next.get(key, 0)
        end = offset + len(data)
        if end <= seen:
            return
        if offset < seen:
            data = data[seen - offset :]
        self._next[key] = end
        pending = self._pending.setdefault(key, bytearray())
        pending += data
        cut = pending.rfind(b"\n") + 1
        if cut == 0 and len(pending) > MAX_PENDING:
            cut = len(pending)
        if cut:
            lines = bytes(pending[:cut])
            del pending[:cut]
            _write(stream, prefix_lines(worker_id, lines))

    def end(self, worker_id: str, stream: int) -> None:
        """The stream is whole: its unfinished last line is written out, ended."""
        pending = self._pending.get((worker_id, stream))
        if pending:
            _write(stream, prefix_lines(worker_id, bytes(pending)))
            pending.clear()

    def finish(self, worker_ids: Optional[Iterable[str]] = None) -> None:
        """Writes out the unfinished last lines (of ``worker_ids``, or of all), each ended."""
        wanted = None if worker_ids is None else set(worker_ids)
        for wid, stream in sorted(self._pending):
            if wanted is None or wid in wanted:
                self.end(wid, stream)
