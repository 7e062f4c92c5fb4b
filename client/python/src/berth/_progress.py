"""What ``await_workers`` shows while it waits: ``k/N finished, f failed`` (or ``running``), as a
line rewritten in place on a terminal's stderr, as an updating display in a Jupyter notebook,
and not at all otherwise (a log file or a pipe gets nothing)."""

from __future__ import annotations

import sys
from typing import Any, Optional

from ._output import show_status


def _in_notebook() -> bool:
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class Progress:
    """A progress line that ``update`` rewrites and ``close`` ends."""

    def __init__(self, enabled: Optional[bool] = None) -> None:
        self._handle: Any = None
        self._tty = False
        self._last = ""
        if enabled is False:
            return
        if _in_notebook():
            from IPython.display import Pretty, display  # type: ignore[import-not-found,unused-ignore]

            self._pretty = Pretty
            self._handle = display(Pretty(""), display_id=True)
            return
        err = sys.stderr
        self._tty = bool(err is not None and hasattr(err, "isatty") and err.isatty())
        if enabled and not self._tty:
            self._tty = err is not None  # asked for explicitly: write it anyway

    @staticmethod
    def text(done: int, total: int, failed: int, wait_for_completion: bool) -> str:
        """``"1/2 finished, 0 failed"``."""
        state = "finished" if wait_for_completion else "running"
        return f"{done}/{total} {state}, {failed} failed"

    def update(self, text: str) -> None:
        if text == self._last:
            return
        self._last = text
        if self._handle is not None:
            self._handle.update(self._pretty(f"berth: {text}"))
        elif self._tty:
            show_status(f"berth: {text}")

    def close(self) -> None:
        if self._tty:
            show_status(None)
        self._tty = False
        self._handle = None
