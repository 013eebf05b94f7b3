"""SIGTERM (``kill``, a batch scheduler's time limit) ends a command and every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from oarbench.cli._common import TERMINATED_EXIT, descendants

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux)")

# A command's shape: the main thread waits on a worker thread whose child process has a child
# of its own (as the demo's training threads wait on nnU-Net processes, which start their own).
SCRIPT = textwrap.dedent("""
    import multiprocessing, subprocess, sys, threading, time
    from oarbench.cli._common import stop_children_on_sigterm

    CHILD = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(120)'])"

    def train():  # a child process with a child of its own
        subprocess.run([sys.executable, "-c", CHILD])

    if __name__ == "__main__":
        with stop_children_on_sigterm():
            # a forked pool worker (inherits the handler), and a thread waiting on a process tree
            pool = multiprocessing.get_context("fork").Pool(1)
            pool.apply_async(time.sleep, (120,))
            worker = threading.Thread(target=train)
            worker.start()
            print("started", flush=True)
            worker.join()
        print("not reached", flush=True)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return state[state.rfind(b")") + 2 :].split()[0] != b"Z"  # a zombie has ended


def _kill_tree(proc: subprocess.Popen, also: list[int] = ()) -> None:
    """Leave nothing running when a test fails half-way."""
    for pid in [*descendants(proc.pid), *also]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_sigterm_stops_the_children_and_their_children(tmp_path):
    script = tmp_path / "command.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        assert _wait_for(lambda: len(descendants(proc.pid)) >= 3), "the children did not start"
        below = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        _kill_tree(proc)
    assert proc.returncode == TERMINATED_EXIT == 143
    assert "not reached" not in out
    assert "terminated (SIGTERM); stopped 3 child process(es)" in err
    assert len(err.strip().splitlines()) == 1, err  # the forked worker ends without a line of its own
    assert _wait_for(lambda: not any(_alive(pid) for pid in below)), [p for p in below if _alive(p)]


def test_without_the_handler_the_children_outlive_the_command(tmp_path):
    """What the handler is for: Python's default SIGTERM ends the parent alone."""
    script = tmp_path / "command.py"
    script.write_text(SCRIPT.replace("stop_children_on_sigterm()", "contextlib.nullcontext()")
                      .replace("import multiprocessing", "import contextlib, multiprocessing"))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    below: list[int] = []
    try:
        assert proc.stdout.readline().strip() == "started"
        assert _wait_for(lambda: len(descendants(proc.pid)) >= 3)
        below = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGTERM
        time.sleep(0.5)
        assert all(_alive(pid) for pid in below)
    finally:
        _kill_tree(proc, below)


def test_every_command_runs_under_the_handler(monkeypatch):
    import types

    import click
    from click.testing import CliRunner

    import oarbench.cli as cli

    seen = {}

    @click.command("probe")
    def probe() -> None:
        seen["handler"] = signal.getsignal(signal.SIGTERM)

    monkeypatch.setitem(sys.modules, "oarbench.cli._probe", types.SimpleNamespace(probe=probe))
    monkeypatch.setitem(cli._COMMANDS, "probe", "_probe:probe")
    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(cli.main, ["probe"])
    assert result.exit_code == 0, result.output
    assert seen["handler"] is not before
    assert getattr(seen["handler"], "__qualname__", "").startswith("stop_children_on_sigterm")
    assert signal.getsignal(signal.SIGTERM) is before  # restored when the command ends


STUBBORN = textwrap.dedent("""
    import subprocess, sys, threading
    import oarbench.cli._common as common

    common.SIGTERM_GRACE_S = 1.0

    def rounds():  # starts the next round's process whenever one ends, and each one ignores SIGTERM
        while True:
            subprocess.run([sys.executable, "-c",
                            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])

    with common.stop_children_on_sigterm():
        threading.Thread(target=rounds).start()  # not a daemon: the interpreter would wait for it
        print("started", flush=True)
        threading.Event().wait()
""")


def test_a_command_whose_threads_go_on_still_ends_and_leaves_nothing(tmp_path):
    script = tmp_path / "command.py"
    script.write_text(STUBBORN)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[int] = set()
    try:
        assert proc.stdout.readline().strip() == "started"
        assert _wait_for(lambda: len(descendants(proc.pid)) >= 1)
        seen.update(descendants(proc.pid))
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None and time.monotonic() - start < 30:
            seen.update(descendants(proc.pid))
            time.sleep(0.05)
        elapsed = time.monotonic() - start
    finally:
        _kill_tree(proc, list(seen))
    assert proc.returncode == TERMINATED_EXIT
    assert elapsed < 10, elapsed  # the 1 s grace, not the child's 120 s
    assert _wait_for(lambda: not any(_alive(pid) for pid in seen)), [p for p in seen if _alive(p)]
