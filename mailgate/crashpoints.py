"""Named points where a test may have the process die as `kill -9` would.

`MAILGATE_CRASH_AT=NAME` makes `crash_point(NAME)` send the process SIGKILL: no cleanup, no
`finally`, no flush, as a power loss or the OOM killer leaves it. Unset (always, outside the
crash tests) it does nothing. Points: `erase.marked` (the person marked 'erasing', nothing
destroyed yet), `erase.key_destroyed` (their key gone, their rows not yet deleted).
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "MAILGATE_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV_VAR) == name:
        os.kill(os.getpid(), signal.SIGKILL)
