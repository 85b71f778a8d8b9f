"""What `mailgate check-config` checks of the machine: the listen ports and the folders.

A config can be valid and still not start: a port another process holds, a state folder the
service user cannot write. Each problem names the key, so ops know what to change, before
systemd finds out at the next start. Nothing is left behind: a port is bound and let go, a
folder is probed with a temporary file that is removed again.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mailgate.config import Config
from mailgate.model import HostPort

_IN_USE = "in use (is mailgate already running?)"
_BIND_HINTS = {
    errno.EADDRINUSE: _IN_USE,
    errno.EACCES: "not allowed (ports below 1024 need CAP_NET_BIND_SERVICE)",
    errno.EADDRNOTAVAIL: "not an address of this machine",
}


def problems(config: Config) -> list[str]:
    """Every listen address that cannot be bound and every folder mailgate cannot write,
    as "key: what is wrong".

    Ports held while this config's own daemon runs are no problem: `check-config` before
    `systemctl reload` must pass. The daemon is known by its SMTP greeting, which names the
    config's hostname and mailgate; then its other ports are taken to be its own too.
    """
    taken = [(key, address, p) for key, address in _listeners(config) if (p := _bind(address))]
    if taken and _our_daemon_answers(config):
        taken = [(key, address, p) for key, address, p in taken if not p.endswith(_IN_USE)]
    found = [f"{key}: {p}" for key, _, p in taken]
    keys: dict[Path, list[str]] = {}  # one line per folder, naming every key that uses it
    for key, folder in _folders(config):
        keys.setdefault(folder, []).append(key)
    found += [f"{', '.join(k)}: {p}" for folder, k in keys.items() if (p := _writable(folder))]
    return found


def _listeners(config: Config) -> Iterator[tuple[str, HostPort]]:
    yield "smtp.listen", config.smtp.listen
    yield "http.listen", config.http.listen
    tls_listen = getattr(config.smtp, "tls_listen", None)  # the implicit-TLS listener, if set
    if tls_listen is not None:
        yield "smtp.tls_listen", tls_listen


def _folders(config: Config) -> Iterator[tuple[str, Path]]:
    """The folders mailgate writes in: SQLite writes its -wal and -shm files beside each
    database, and every secret is written aside and renamed into place."""
    yield "storage.database", config.storage.database.parent
    yield "storage.attachments", config.storage.attachments
    if config.outbound.transport == "file":
        yield "outbound.directory", config.outbound.directory
    yield "outbound.secret_file", config.outbound.secret_file.parent
    yield "security.key_file", config.security.key_file.parent
    yield "security.keystore", config.security.keystore.parent
    yield "retention.archive", config.retention.archive.parent


def _bind(address: HostPort) -> str | None:
    """Bind every address the host names, as the daemon will, and let go at once."""
    if address.port == 0:  # the system picks a free one
        return None
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return f"{address.host}: {exc.strerror}"
    for family, kind, proto, _, where in infos:
        with socket.socket(family, kind, proto) as sock:
            # As asyncio's create_server: a port held only by TIME_WAIT connections is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(where)
            except OSError as exc:
                reason = _BIND_HINTS.get(exc.errno or 0, exc.strerror or str(exc))
                return f"{address.host}:{address.port}: {reason}"
    return None


def _our_daemon_answers(config: Config) -> bool:
    """Whether `smtp.listen` greets as mailgate with this config's hostname (a daemon run
    from this config), read within a second; anything else, or nothing, is not ours."""
    listen = config.smtp.listen
    host = "127.0.0.1" if listen.host in ("", "0.0.0.0") else listen.host  # noqa: S104
    host = "::1" if host == "::" else host
    try:
        with socket.create_connection((host, listen.port), timeout=1) as sock:
            greeting = sock.recv(512)
            sock.sendall(b"QUIT\r\n")
    except OSError:
        return False
    return greeting.startswith(f"220 {config.smtp.hostname} ESMTP mailgate".encode())


def _writable(folder: Path) -> str | None:
    """Probe `folder` with a temporary file; a missing folder is fine if it can be made (the
    nearest existing parent is probed instead)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".mailgate-check-", dir=existing)
    except OSError as exc:
        what = "" if existing == folder else f" (to make {folder} in it)"
        return f"cannot write in {existing}{what}: {exc.strerror or exc}"
    os.close(fd)
    os.unlink(probe)
    return None
