"""Workers' output in the launching process: every line prefixed with its worker's id,
``[<id>] <line>``, workers' stdout to ``sys.stdout`` and stderr to ``sys.stderr`` (looked up at
every write, so a notebook or a redirected stdout captures it).

A worker's line never lands inside a line that the session's own code is writing: ``print("a",
b)`` is several writes (``a``, the separator, ``b``, the newline), and with an unbuffered stdout
(``python -u``, ``PYTHONUNBUFFERED``) or a notebook's, the thread that prints workers' output can
run between them. So the session's first launch puts a :class:`LineGuard` around ``sys.stdout``
and ``sys.stderr``: it notes whether their last write left a line open, and a worker's lines wait
for that line's end, :data:`LINE_WAIT` seconds at most (a prompt or a ``print(..., end="")`` that
stays open), after which they go on a line of their own."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Dict, Iterable, Optional, TextIO, Tuple

#: A partial line longer than this is written out (and ended) rather than held back for ever.
MAX_PENDING = 64 << 10

STDERR = 2  # berth.v1.Stream.STREAM_STDERR

#: How long workers' lines wait for a line that the session's own code left open (seconds).
LINE_WAIT = 0.2

# Held while a guarded stream is written (by the session's code or by the output thread) and
# while workers' lines and the progress line go out; reentrant, as the progress line is written to
# a guarded stderr with it held.
_write_lock = threading.Condition(threading.RLock())


def _reinit_after_fork() -> None:
    # A child forked while the output thread held the lock would hang at its first print (every
    # write to a guarded stream takes it), as the thread that would release it is not forked.
    global _write_lock
    _write_lock = threading.Condition(threading.RLock())


os.register_at_fork(after_in_child=_reinit_after_fork)

#: The progress line that await_workers keeps at the bottom of a terminal's stderr, if any.
_status: Optional[str] = None


def _put(out: TextIO, text: str) -> None:
    try:
        out.write(text)
        out.flush()
    except (ValueError, OSError):  # closed at interpreter exit, or a reader that went away
        pass


class LineGuard:
    """A stream (``sys.stdout`` or ``sys.stderr``) as the session's code writes to it, with a note
    of whether its last write left a line open; everything but ``write`` is the stream's own."""

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner
        self.open_line = False
        self.opened_by = 0  # the thread that left the line open

    def write(self, text: str) -> int:
        with _write_lock:
            n = self.inner.write(text)
            if text:
                self.open_line = not text.endswith("\n")
                self.opened_by = threading.get_ident()
                if not self.open_line:
                    _write_lock.notify_all()
            return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _unguarded(out: TextIO) -> TextIO:
    """The stream itself, for the progress line, which is no line of anybody's."""
    return out.inner if isinstance(out, LineGuard) else out


def guard_streams() -> None:
    """Puts a :class:`LineGuard` around ``sys.stdout`` and ``sys.stderr`` as they are now (a
    notebook's or a test's replacements included). Called on the session's own thread, at a
    launch: replacing them from the output thread could undo a ``redirect_stdout`` in between."""
    for name in ("stdout", "stderr"):
        out = getattr(sys, name)
        if out is not None and not isinstance(out, LineGuard):
            setattr(sys, name, LineGuard(out))


def _write(stream: int, text: str) -> None:
    # Looked up now, not at import: IPython and pytest replace sys.stdout after we are imported.
    out = sys.stderr if stream == STDERR else sys.stdout
    if out is None:
        return
    with _write_lock:
        if isinstance(out, LineGuard) and out.open_line:
            # The thread that left it open cannot end it while it writes ours.
            if out.opened_by == threading.get_ident() or not _write_lock.wait_for(
                lambda: not out.open_line, timeout=LINE_WAIT
            ):
                text = "\n" + text  # the open line stays open: ours go below it
        err = sys.stderr
        if _status is not None and err is not None:
            _put(_unguarded(err), "\r\x1b[K")  # the lines go above the progress line, not into it
        _put(out, text)
        if _status is not None and err is not None:
            _put(_unguarded(err), _status)


def show_status(text: Optional[str]) -> None:
    """Shows ``text`` as the progress line on stderr (a terminal), rewritten in place; None ends
    it (the cursor goes to the next line)."""
    global _status
    err = sys.stderr
    with _write_lock:
        if err is not None:
            _put(
                _unguarded(err),
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
