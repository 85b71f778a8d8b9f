"""Nothing of the daemon outlives it: its parser child and multiprocessing's resource
tracker end with it, `kill -9` included, as `ps` would show. A real `mailgate serve`."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.conftest import SubprocessDaemon


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live process (zombies are dead: their parent reaps them)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if fields[0] not in ("Z", "X"):
            found[int(entry.name)] = int(fields[1])
    return found


def descendants(pid: int) -> set[int]:
    parents = _parents()
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        children = [child for child, of in parents.items() if of == parent]
        found.update(children)
        todo += children
    return found


def alive(pids: set[int]) -> set[int]:
    return pids & set(_parents())


def command(pid: int) -> str:
    return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_no_process_of_the_daemon_outlives_it(tmp_path: Path, sig: signal.Signals) -> None:
    daemon = SubprocessDaemon(tmp_path / "daemon")
    daemon.start()
    try:
        assert daemon.proc is not None
        helpers = descendants(daemon.proc.pid)
        commands = [command(pid) for pid in helpers]
        assert any("spawn_main" in c for c in commands), commands  # the parser child
        assert any("resource_tracker" in c for c in commands), commands
    finally:
        daemon.kill(sig)
    deadline = time.monotonic() + 30  # liveness only: they go at once
    while alive(helpers):
        assert time.monotonic() < deadline, [command(p) for p in alive(helpers)]
        time.sleep(0.05)
