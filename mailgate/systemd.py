"""The daemon's side of systemd's notify protocol (sd_notify(3)), without libsystemd.

Type=notify: READY=1 once mail can be taken, STATUS= lines for `systemctl status`,
WATCHDOG=1 pings, RELOADING=1 and STOPPING=1. Every function is a no-op outside systemd
(no NOTIFY_SOCKET). Imports nothing of mailgate.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*fields: str) -> None:
    """Send `fields` ("READY=1", "STATUS=...") as one datagram; a no-op outside systemd.

    A socket systemd no longer listens on is not our failure: the message is dropped.
    """
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]  # abstract socket namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(target)
            sock.sendall("\n".join(fields).encode())
        except OSError:
            pass


def under_systemd() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


def reloading() -> str:
    """The RELOADING=1 message with MONOTONIC_USEC, which Type=notify-reload asks for."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC, as sd_watchdog_enabled(3)
    advises), or None when systemd does not watch this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or not int(usec) or not under_systemd():
        return None
    if pid and pid != str(os.getpid()):  # meant for another process of the service
        return None
    return int(usec) / 2e6
