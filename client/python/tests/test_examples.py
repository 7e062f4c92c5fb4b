"""The examples in client/python/examples and the README's "From Python" code, run as users run
them, against the daemon."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import EXAMPLES, REPO, scaled

WORKER_LINE = re.compile(r"^\[([a-z0-9]+)\] (.*)$")


def run_example(script: str) -> subprocess.CompletedProcess:
    # MASTER_PORT=0: any free port (the workers are told which), so that nothing else on the
    # host's port 6000 is in the way.
    return subprocess.run(
        [sys.executable, script],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        env={**os.environ, "MASTER_PORT": "0"},
        timeout=scaled(120),
    )


def worker_lines(out: str):
    return [m.groups() for m in map(WORKER_LINE.match, out.splitlines()) if m]


def test_master_and_workers_greet_each_other(berth_addr: str) -> None:
    r = run_example("master.py")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines.count("Master received: Hello From Worker!") == 2, r.stdout
    received = [
        (i, text)
        for i, text in worker_lines(r.stdout)
        if text == "Worker received: Hello From Server!"
    ]
    assert len({i for i, _ in received}) == 2, r.stdout
    master_ips = {
        text.split()[-1] for _, text in worker_lines(r.stdout) if text.startswith("CDSW_MASTER_IP:")
    }
    assert len(master_ips) == 1 and master_ips.pop().count(".") == 3


def test_hyperparameter_search_runs_every_set(berth_addr: str) -> None:
    r = run_example("hyperparameter_master.py")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "12/12 parameter sets tried by" in r.stdout
    assert "best: {'learning_rate': 0.1, 'steps': 200}" in r.stdout
    tried = [
        int(text.split()[1]) for _, text in worker_lines(r.stdout) if text.startswith("tried ")
    ]
    assert len(tried) == 2 and sum(tried) == 12, r.stdout


def readme_python_blocks() -> list:
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## From Python\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no section '## From Python'"
    return re.findall(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)


def test_the_readme_code_runs_as_written(berth_addr: str) -> None:
    blocks = readme_python_blocks()
    assert blocks, "no python code in README's 'From Python'"
    assert "launch_workers(n=2, cpu=0.2, memory=0.5" in blocks[0]
    for code in blocks:
        r = subprocess.run(
            [sys.executable, "-c", code],
            cwd=EXAMPLES,
            capture_output=True,
            text=True,
            timeout=scaled(120),
        )
        assert r.returncode == 0, f"{code}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    r = subprocess.run(
        [sys.executable, "-c", blocks[0]],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    hello = [i for i, text in worker_lines(r.stdout) if text == "Hello from a CDSW Worker"]
    assert len(set(hello)) == 2, r.stdout + r.stderr
