"""TLS contexts: the SMTP listener's certificate (swappable by a reload) and the relay client's.

A context is built from files once and checked then: an unreadable or invalid certificate,
key or CA file is a `ConfigError` naming its key, at start and in `check-config`, never a
failure at the first handshake. The server side is `ServerTls`: one context object that the
listeners hold for good, whose handshakes each take the certificate loaded last, so a reload
swaps the certificate for new connections and STARTTLS commands without touching a listener.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from mailgate.errors import ConfigError


def _hardened(context: ssl.SSLContext) -> ssl.SSLContext:
    """TLS 1.2 and later, no compression (CRIME), no renegotiation by the client."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context holding `cert` (the chain, leaf first) and its `key`, both PEM.

    Raises:
        ConfigError: a file is unreadable, not PEM, or the key does not match the certificate.
    """
    context = _hardened(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"smtp.tls_cert: cannot load {cert} with key {key}: {_why(exc)}"
        ) from None
    return context


def certificate_warnings(cert: Path, key: Path) -> list[str]:
    """What is wrong with a certificate that loads all the same: OpenSSL checks no dates on
    the server's side, so an expired one is served and every client that verifies refuses
    it; and a key that others may read is no secret. For `check-config`."""
    warnings: list[str] = []
    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())  # the first PEM: the leaf
    except (OSError, ValueError):
        leaf = None  # server_context has said why already
    now = datetime.now(UTC)
    if leaf is not None and leaf.not_valid_after_utc < now:
        warnings.append(f"the certificate {cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    elif leaf is not None and leaf.not_valid_before_utc > now:
        warnings.append(
            f"the certificate {cert} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d}"
        )
    try:
        mode = key.stat().st_mode & 0o777
    except OSError:
        mode = 0
    if mode & 0o007:  # a group (Debian's ssl-cert) may be meant to read it; everyone not
        warnings.append(
            f"the key {key} can be read by every user (mode {mode:04o}): chmod o-rwx it"
        )
    return warnings


def client_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client context that verifies the relay's certificate and name: against the system's
    trust store, or only against `ca_file` (a private CA) when it is given.

    Raises:
        ConfigError: `ca_file` is unreadable or holds no certificate.
    """
    try:
        # With a cafile, only it is trusted; without, the system's store.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"outbound.tls_ca_file: cannot load {ca_file}: {_why(exc)}") from None
    return _hardened(context)


def _why(exc: OSError) -> str:
    """OpenSSL's reason (`KEY_VALUES_MISMATCH`, `NO_CERTIFICATE_OR_CRL_FOUND`) or the OS's."""
    reason = getattr(exc, "reason", None)
    return str(reason or exc.strerror or exc)


class ServerTls:
    """The SMTP listener's TLS: `context` for every listener and session, the certificate
    swapped by `load`.

    `context` never changes: aiosmtpd's STARTTLS and the implicit-TLS server socket keep it.
    Its `sni_callback` runs at every ClientHello (with or without SNI) and hands the handshake
    the context loaded last, so a new certificate applies to the next handshake and the
    sessions under way keep theirs.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self._current = server_context(cert, key)
        self.context = server_context(cert, key)  # same settings: they are the SSL object's
        self.context.sni_callback = self._choose

    def load(self, cert: Path, key: Path) -> None:
        """Use `cert` and `key` from the next handshake on.

        Raises:
            ConfigError: they cannot be loaded; the certificate in use stays.
        """
        self._current = server_context(cert, key)

    def _choose(self, ssl_object: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        ssl_object.context = self._current
