"""Workers' output in the launching process, and what await shows while it waits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import berth
from conftest import run_python, scaled

TWO_WORKERS_TALK = """
import berth
{setup}
code = '''
import os, sys
me = os.environ["BERTH_WORKER_ID"]
print("out of", me)
print("err of", me, file=sys.stderr)
sys.stdout.write("tail of " + me)
'''
ws = berth.launch_workers(n=2, cpu=0.1, memory=0.1, code=code)
berth.await_workers(ws, timeout_seconds=60)
print("ids", *[w["id"] for w in ws])
"""


def test_the_output_of_two_workers_appears_prefixed_by_their_ids(berth_addr: str) -> None:
    r = run_python(TWO_WORKERS_TALK.format(setup=""))
    assert r.returncode == 0, r.stderr
    ids = r.stdout.splitlines()[-1].split()[1:]
    assert len(ids) == 2
    out, err = r.stdout.splitlines(), r.stderr.splitlines()
    for i in ids:
        assert f"[{i}] out of {i}" in out
        assert f"[{i}] tail of {i}" in out  # the unfinished last line, ended for it
        assert f"[{i}] err of {i}" in err
        assert f"[{i}] err of {i}" not in out


def test_show_output_false_keeps_it_quiet(berth_addr: str) -> None:
    r = run_python(TWO_WORKERS_TALK.format(setup="berth.show_output(False)"))
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1 and r.stdout.startswith("ids ")
    assert "of " not in r.stderr


QUIET_BESIDE_SHOWN = """
import berth
with berth.default_client().session() as s:
    shown = s.launch_workers(n=1, cpu=0.1, memory=0.1, code="print('shown line')")
    quiet = s.launch_workers(n=1, cpu=0.1, memory=0.1, code="print('quiet line')", show_output=False)
    later = s.launch_workers(n=1, cpu=0.1, memory=0.1, code="import sys; sys.stdout.write('no newline')")
    s.await_workers(shown + quiet + later, timeout_seconds=60)
    print("ids", shown[0]["id"], quiet[0]["id"], later[0]["id"])
"""


def test_a_session_shows_its_launches_output_but_a_quiet_ones(berth_addr: str) -> None:
    # One follower of the session's output shows every launch's workers (those launched after
    # it began too) but for a launch made with show_output=False; a last line without newline
    # is printed, ended, by the time await_workers returns.
    r = run_python(QUIET_BESIDE_SHOWN)
    assert r.returncode == 0, r.stderr
    shown, quiet, later = r.stdout.splitlines()[-1].split()[1:]
    out = r.stdout.splitlines()
    assert f"[{shown}] shown line" in out
    assert f"[{later}] no newline" in out
    assert out.index(f"[{later}] no newline") < len(out) - 1  # printed before await returned
    assert "quiet line" not in r.stdout and "quiet line" not in r.stderr


def test_output_goes_to_sys_stdout_as_it_is_at_write_time(
    berth_addr: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # capsys replaced sys.stdout after berth was imported, as a notebook does.
    with berth.Client(berth_addr, show_output=True) as c:
        ws = c.launch_workers(n=1, cpu=0.1, memory=0.1, code="print('captured'); print('line 2')")
        c.await_workers(ws)
    out = capsys.readouterr().out
    assert f"[{ws[0]['id']}] captured\n[{ws[0]['id']}] line 2\n" in out


def test_stream_output_yields_chunks(client: berth.Client) -> None:
    ws = client.launch_workers(
        n=1, cpu=0.1, memory=0.1, code="import sys; print('a'); print('b', file=sys.stderr)"
    )
    chunks = list(client.stream_output(ws, follow=True))
    assert {c["worker_id"] for c in chunks} == {ws[0]["id"]}
    by_stream = {}
    for c in chunks:
        assert isinstance(c["data"], bytes) and isinstance(c["offset"], int)
        by_stream[c["stream"]] = by_stream.get(c["stream"], b"") + c["data"]
    assert by_stream == {"STREAM_STDOUT": b"a\n", "STREAM_STDERR": b"b\n"}


def test_await_shows_progress_on_a_terminal_only(berth_addr: str) -> None:
    code = (
        "import berth; berth.show_output(False); "
        "ws = berth.launch_workers(n=2, cpu=0.1, memory=0.1, code='import time; time.sleep(1.5)'); "
        "berth.await_workers(ws)"
    )
    leader, follower = os.openpty()
    try:
        p = subprocess.run(
            [sys.executable, "-c", code],
            stderr=follower,
            stdout=subprocess.DEVNULL,
            timeout=scaled(60),
        )
        os.close(follower)
        follower = -1
        shown = b""
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not data:
                break
            shown += data
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert p.returncode == 0
    text = shown.decode()
    assert "\rberth: 0/2 finished, 0 failed" in text
    assert "\rberth: 2/2 finished, 0 failed" in text
    assert text.endswith("\r\n")  # the line is ended (the terminal writes \n as \r\n)
    # Not a terminal: nothing.
    r = run_python(code)
    assert r.returncode == 0 and r.stderr == ""
