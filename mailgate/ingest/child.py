"""The parser process ends when the daemon does, however the daemon ends.

ProcessPoolExecutor's worker waits on its call queue, whose pipe it holds both ends of, so a
daemon killed with SIGKILL (or by the OOM killer) left it waiting for ever, and with it
multiprocessing's resource tracker, which ends only when every holder of its pipe has: about
50 MB each, a pair per crash. So the pool's initializer, in the child, asks the kernel to
kill it when its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`), or, where there is no such
call, watches its parent from a thread. Once the child is gone the tracker reads the end of
its pipe and exits too.

PR_SET_PDEATHSIG fires when the *thread* that started the child ends; the pool is started
from the event loop's thread, which lives as long as the daemon.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_SECONDS = 1.0


def die_with_parent(parent: int) -> None:
    """Pool initializer: end this process when process `parent` (the daemon) ends."""
    if not _death_signal(signal.SIGKILL):
        threading.Thread(target=_watch, args=(parent,), name="parent-watch", daemon=True).start()
    if os.getppid() != parent:  # it died before the signal was armed: nobody will send it
        os._exit(1)


def _death_signal(sig: signal.Signals) -> bool:
    """Arm the parent-death signal; False where the system has none."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_SECONDS)
    os._exit(1)
