"""Parse config.toml once into a frozen Config; the only reader of MAILGATE_CONFIG.

Every key is declared in `_SCHEMA` with its parser and default. Unknown keys and bad values
raise ConfigError naming the key (`smtp.listen: ...`), so ops see exactly what to fix.
Relative paths are resolved against the config file's folder, not the working directory.
"""

from __future__ import annotations

import calendar
import email.utils
import ipaddress
import os
import re
import tomllib
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from mailgate.addresses import EmailNotValidError, address_key, validate_address
from mailgate.domains import a_label
from mailgate.errors import ConfigError
from mailgate.model import HostPort

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ENV_VAR = "MAILGATE_CONFIG"
DEFAULT_PATH = Path("config.toml")


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    listen: HostPort
    hostname: str
    accept: tuple[str, ...]  # address keys (addresses.address_key) and "@a-label" domains
    max_message_size: int
    drain_timeout: float
    max_connections: int
    max_connections_per_ip: int
    max_recipients: int
    max_errors: int
    timeout: float
    min_data_rate: int
    max_received_headers: int
    trusted_proxies: tuple[Network, ...] = ()
    tls_cert: Path | None = None  # with tls_key: STARTTLS offered (tls.py)
    tls_key: Path | None = None
    require_tls: bool = False  # no MAIL before STARTTLS (530 5.7.0)
    tls_listen: HostPort | None = None  # a second listener, TLS from the first byte

    def accepts(self, address: str) -> bool:
        """Tell whether `address` is one of ours: an exact entry or an `@domain` entry."""
        return _listed(address, self.accept)

    def trusts(self, ip: str) -> bool:
        """Tell whether the peer at `ip` is a proxy whose XFORWARD is believed."""
        return in_networks(ip, self.trusted_proxies)


def in_networks(ip: str, networks: tuple[Network, ...]) -> bool:
    """Tell whether `ip` is in one of `networks`; an IPv4 peer on a dual-stack socket shows
    as ::ffff:a.b.c.d and is judged as a.b.c.d."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _listed(address: str, entries: tuple[str, ...]) -> bool:
    """Tell whether `address` is in `entries` (keys and `@domain`s), compared by key: full
    Unicode case folding, domains as A-labels."""
    key = address_key(address)
    local, _, domain = key.rpartition("@")
    if not local:
        return False
    return key in entries or f"@{domain}" in entries


@dataclass(frozen=True, slots=True)
class StorageConfig:
    database: Path
    attachments: Path


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    key_file: Path  # the master key (32 bytes); made at first start if missing
    keystore: Path  # people's data keys, wrapped: keep it outside the data directory
    key_file_given: bool = True  # false: the default, beside the data (check-config warns)


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    transport: str
    directory: Path
    relay: HostPort
    tls: str  # "required" | "opportunistic" | "implicit" | "none" (transports.py)
    username: str | None
    password: str | None
    timeout: float
    sender: str
    sender_name: str | None
    templates: Path | None  # an override folder; the shipped set fills in the rest
    secret_file: Path
    acknowledge: bool
    retry_initial: float
    retry_max: float
    max_lifetime: float
    auto_reply_limit: int
    auto_reply_window: float
    auto_reply_global_limit: int
    tls_ca_file: Path | None = None  # verify the relay against this CA only


@dataclass(frozen=True, slots=True)
class AuthConfig:
    enabled: bool
    dns_timeout: float
    nameservers: tuple[HostPort, ...]
    trusted_authserv_id: str | None
    retry_for: float = 900.0


@dataclass(frozen=True, slots=True)
class VerificationConfig:
    ttl: float


@dataclass(frozen=True, slots=True)
class AgentsConfig:
    addresses: tuple[str, ...]  # address keys and "@a-label" domains, as SmtpConfig.accept
    expose_address: bool

    def includes(self, address: str) -> bool:
        """Tell whether `address` is an agent: an exact entry or an `@domain` entry."""
        return _listed(address, self.addresses)


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: HostPort
    base_url: str
    max_connections: int
    keepalive_timeout: float
    header_timeout: float
    api_tokens: frozenset[str] = frozenset()  # SHA-256 hex digests of the intake API's tokens
    api_rate_limit: int = 60  # intake API requests per minute, per token
    # /healthz fails while a message due for ingest has waited longer than this (seconds).
    health_max_backlog_age: float = 300.0
    # The client networks /metrics answers; everyone else gets 403 (web.py says why).
    metrics_from: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )

    def metrics_allowed(self, ip: str) -> bool:
        return in_networks(ip, self.metrics_from)


@dataclass(frozen=True, slots=True)
class TicketsConfig:
    tag_prefix: str


@dataclass(frozen=True, slots=True)
class PrivacyConfig:
    """Privacy requests by mail (`privacy/requests.py`): off without an `address`."""

    address: str | None = None  # its address key; accepted by SMTP whatever `smtp.accept` says
    ttl: float = 7 * 24 * 3600.0  # a request's confirmation link, as a verification link's
    max_export_size: int = 10 * 1024 * 1024  # an export's zip above this is not mailed

    def is_address(self, address: str) -> bool:
        return self.address is not None and address_key(address) == self.address


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str
    format: str


# -- retention (issue 10) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Duration:
    """A retention period as written: a count of hours, days, weeks, months or years.

    Months and years are calendar months (a month before 31 March is 28 or 29 February), so
    "3y" ends on the same date three years later, as the law counts it.
    """

    count: int
    unit: str  # "hours", "days", "weeks", "months"; years are kept as 12 months
    text: str = ""

    def before(self, moment: datetime) -> datetime:
        """The moment this long before `moment`: what is older than it is due."""
        if self.unit != "months":
            return moment - timedelta(**{self.unit: self.count})
        months = moment.year * 12 + moment.month - 1 - self.count
        year, month = divmod(months, 12)
        day = min(moment.day, calendar.monthrange(year, month + 1)[1])
        return moment.replace(year=year, month=month + 1, day=day)

    def __str__(self) -> str:
        return self.text or f"{self.count} {self.unit}"


_UNITS = {
    "h": ("hours", 1), "hour": ("hours", 1), "hours": ("hours", 1),
    "d": ("days", 1), "day": ("days", 1), "days": ("days", 1),
    "w": ("weeks", 1), "week": ("weeks", 1), "weeks": ("weeks", 1),
    "mo": ("months", 1), "month": ("months", 1), "months": ("months", 1),
    "y": ("months", 12), "year": ("months", 12), "years": ("months", 12),
}  # fmt: skip
_DURATION = re.compile(r"\s*(\d{1,6})\s*([a-z]+)\s*")


def _duration(value: Any, _base: Path) -> Duration:
    """`"30d"`, `"12h"`, `"2w"`, `"6 months"`, `"3y"` (`m` alone is refused: minutes or months?)."""
    found = _DURATION.fullmatch(value.lower()) if isinstance(value, str) else None
    if found is None or found.group(2) not in _UNITS:
        raise ValueError(f'expected a duration like "30d" or "6 months", got {value!r}')
    unit, factor = _UNITS[found.group(2)]
    return Duration(int(found.group(1)) * factor, unit, value.strip())


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """How long each kind of record is kept (`privacy/retention.py` applies them)."""

    raw_messages: Duration  # raw bytes after ingest; quarantined messages in all
    closed_tickets: Duration  # a closed inquiry's record, then destroyed (archive included)
    unverified_requesters: Duration  # never verified, no open ticket: erased
    delivery_log: Duration  # outbox rows once sent or failed; inbound envelopes (service use)
    identification: Duration  # verification tokens and their use
    audit: Duration
    active_after_close: Duration  # then a closed ticket moves to the archive
    archive: Path  # the archive database: its own file, its records under their own keys


def _retention(values: Mapping[str, Any], database: Path) -> RetentionConfig:
    """The archive defaults to a file of its own beside the database."""
    archive = values["archive"] or database.parent / "archive.sqlite"
    if archive == database:
        raise ConfigError("retention.archive: must not be the database itself")
    probe = datetime(2000, 1, 1)
    if values["active_after_close"].before(probe) < values["closed_tickets"].before(probe):
        raise ConfigError(
            "retention.active_after_close: must not be longer than retention.closed_tickets"
        )
    return RetentionConfig(**{**values, "archive": archive})


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    smtp: SmtpConfig
    storage: StorageConfig
    outbound: OutboundConfig
    http: HttpConfig
    tickets: TicketsConfig
    verification: VerificationConfig
    agents: AgentsConfig
    auth: AuthConfig
    log: LogConfig
    security: SecurityConfig
    retention: RetentionConfig
    privacy: PrivacyConfig = PrivacyConfig()
    # What still works but should change: check-config prints these, serve logs them.
    warnings: tuple[str, ...] = ()


# -- value parsers: each takes (value, base folder) and raises ValueError with a short reason --

Parser = Callable[[Any, Path], Any]


def _host_port(value: Any, _base: Path) -> HostPort:
    if not isinstance(value, str):
        raise ValueError('expected "host:port"')
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'expected "host:port" with a port 0-65535, got {value!r}')
    return HostPort(host, int(port))


def _text(value: Any, _base: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("control characters are not allowed")
    return value


def _positive_int(value: Any, _base: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def _seconds(value: Any, _base: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"expected a number of seconds >= 0, got {value!r}")
    return float(value)


def _positive_seconds(value: Any, base: Path) -> float:
    seconds = _seconds(value, base)
    if not seconds:
        raise ValueError(f"expected a number of seconds > 0, got {value!r}")
    return seconds


def _path(value: Any, base: Path) -> Path:
    path = Path(_text(value, base)).expanduser()
    return path if path.is_absolute() else base / path


def _mailbox(value: Any, base: Path) -> str:
    """An address as mail takes it: dotless and special-use domains too (`helpdesk@corp.local`);
    see `addresses.validate_address`."""
    try:
        return validate_address(_text(value, base))
    except EmailNotValidError as exc:
        raise ValueError(f"not a valid address: {exc}") from None


def _sender(value: Any, base: Path) -> tuple[str, str | None]:
    """`"support@example.com"` or `"Example Support <support@example.com>"` (RFC 5322
    name-addr, read by email.utils): the address and the name, if any."""
    text = _text(value, base)  # no CR, LF or other control characters anywhere
    if "<" not in text:
        return _mailbox(text, base), None
    pairs = email.utils.getaddresses([text])
    if len(pairs) != 1 or not pairs[0][1] or not text.rstrip().endswith(">"):
        raise ValueError(f'expected "address" or "Name <address>", got {text!r}')
    name, address = pairs[0]
    # Cc: C0 and C1 controls (NEL too); Cf: bidi overrides, zero-width; Zl, Zp: line breaks.
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        raise ValueError("the name holds control, bidi or zero-width characters")
    return _mailbox(address, base), " ".join(name.split()) or None


def _accept_list(value: Any, base: Path) -> tuple[str, ...]:
    if not value:
        raise ValueError(
            'expected a non-empty list such as ["support@example.com", "@example.org"]'
        )
    return _address_list(value, base)


def _address_list(value: Any, base: Path) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError('expected a list such as ["agent@example.com", "@example.org"]')
    entries = []
    for entry in value:
        if isinstance(entry, str) and entry.startswith("@"):
            domain = _mailbox(f"postmaster{entry}", base).partition("@")[2]
            entries.append(f"@{a_label(domain)}")
        else:
            entries.append(address_key(_mailbox(entry, base)))
    return tuple(entries)


def _base_url(value: Any, base: Path) -> str:
    url = _text(value, base)
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


def _host_port_list(value: Any, base: Path) -> tuple[HostPort, ...]:
    if not isinstance(value, list):
        raise ValueError('expected a list such as ["127.0.0.1:53"]')
    return tuple(_host_port(entry, base) for entry in value)


def _network_list(value: Any, _base: Path) -> tuple[Network, ...]:
    """Addresses and networks, e.g. ["127.0.0.1", "10.0.0.0/8", "::1"]; host bits must be 0."""
    if not isinstance(value, list):
        raise ValueError('expected a list such as ["127.0.0.1", "10.0.0.0/8", "::1"]')
    networks = []
    for entry in value:
        if not isinstance(entry, str):
            raise ValueError(f"expected addresses or networks as strings, got {entry!r}")
        try:
            networks.append(ipaddress.ip_network(entry))
        except ValueError as exc:
            raise ValueError(f"not an IP address or network: {exc}") from None
    return tuple(networks)


_DIGEST = re.compile(r"[0-9a-f]{64}")


def _digest_list(value: Any, _base: Path) -> frozenset[str]:
    """SHA-256 digests as `mailgate api-token new` prints them. An entry is never echoed in
    the error: a token pasted in place of its digest would land in the logs."""
    if not isinstance(value, list):
        raise ValueError('expected a list of digests such as ["3a7bd3e2..."]')
    for number, entry in enumerate(value, 1):
        if not isinstance(entry, str) or not _DIGEST.fullmatch(entry):
            raise ValueError(
                f"entry {number} is not a SHA-256 digest (64 lowercase hex characters);"
                " `mailgate api-token new` prints the line to add"
            )
    return frozenset(value)


def _bool(value: Any, _base: Path) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _optional(parse: Parser) -> Parser:
    """Accept a missing key (None) besides what `parse` accepts."""

    def parse_optional(value: Any, base: Path) -> Any:
        return None if value is None else parse(value, base)

    return parse_optional


def _one_of(*choices: str) -> Parser:
    def parse(value: Any, _base: Path) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return parse


_REQUIRED = object()

# section -> key -> (parser, default). A default of _REQUIRED makes the key mandatory.
_SCHEMA: Mapping[str, Mapping[str, tuple[Parser, Any]]] = {
    "smtp": {
        "listen": (_host_port, "127.0.0.1:8025"),
        "hostname": (_text, "mailgate.localhost"),
        "accept": (_accept_list, _REQUIRED),
        "max_message_size": (_positive_int, 25 * 1024 * 1024),
        "drain_timeout": (_seconds, 30),
        "max_connections": (_positive_int, 100),
        "max_connections_per_ip": (_positive_int, 20),
        "max_recipients": (_positive_int, 100),
        "max_errors": (_positive_int, 20),
        "timeout": (_positive_seconds, 300),  # 0 would close every session at once
        "min_data_rate": (_positive_int, 500),
        "max_received_headers": (_positive_int, 100),
        "trusted_proxies": (_network_list, []),
        "tls_cert": (_optional(_path), None),
        "tls_key": (_optional(_path), None),
        "require_tls": (_bool, False),
        "tls_listen": (_optional(_host_port), None),
    },
    "storage": {
        "database": (_path, "var/mailgate.db"),
        "attachments": (_path, "var/attachments"),
    },
    "outbound": {
        "transport": (_one_of("file", "smtp"), "file"),
        "directory": (_path, "var/outbox"),
        "relay": (_host_port, "127.0.0.1:25"),
        # "starttls" is the old name of "opportunistic" (see _outbound_tls).
        "tls": (
            _one_of("required", "opportunistic", "implicit", "none", "starttls"),
            "opportunistic",
        ),
        "tls_ca_file": (_optional(_path), None),
        "username": (_optional(_text), None),
        "password": (_optional(_text), None),
        "timeout": (_seconds, 60),
        "sender": (_sender, _REQUIRED),
        "sender_name": (_optional(_text), None),
        "templates": (_optional(_path), None),
        "secret_file": (_path, "var/secret.key"),
        "acknowledge": (_bool, True),
        "retry_initial": (_seconds, 60),
        "retry_max": (_seconds, 3600),
        "max_lifetime": (_seconds, 5 * 24 * 3600),
        "auto_reply_limit": (_positive_int, 5),
        "auto_reply_window": (_seconds, 3600),
        "auto_reply_global_limit": (_positive_int, 500),
    },
    "http": {
        "listen": (_host_port, "127.0.0.1:8080"),
        "base_url": (_base_url, "http://127.0.0.1:8080"),
        "max_connections": (_positive_int, 100),
        "keepalive_timeout": (_positive_seconds, 15),  # 0 would mean aiohttp's "never"
        "header_timeout": (_positive_seconds, 10),
        "api_tokens": (_digest_list, []),
        "api_rate_limit": (_positive_int, 60),
        "health_max_backlog_age": (_seconds, 300),
        "metrics_from": (_network_list, ["127.0.0.0/8", "::1"]),
    },
    "tickets": {
        "tag_prefix": (_text, "#"),
    },
    "verification": {
        "ttl": (_seconds, 7 * 24 * 3600),
    },
    "agents": {
        "addresses": (_address_list, []),
        "expose_address": (_bool, False),
    },
    "auth": {
        "enabled": (_bool, True),
        "dns_timeout": (_positive_seconds, 5),
        "nameservers": (_host_port_list, []),
        "trusted_authserv_id": (_optional(_text), None),
        "retry_for": (_seconds, 15 * 60),
    },
    "security": {
        "key_file": (_optional(_path), None),
        "keystore": (_optional(_path), None),
    },
    "privacy": {
        "address": (_optional(_mailbox), None),
        "ttl": (_seconds, 7 * 24 * 3600),
        "max_export_size": (_positive_int, 10 * 1024 * 1024),
    },
    "log": {
        "level": (_one_of("debug", "info", "warning", "error"), "info"),
        "format": (_one_of("auto", "json", "console"), "auto"),
    },
    "retention": {
        "raw_messages": (_duration, "30d"),
        "closed_tickets": (_duration, "3y"),
        "unverified_requesters": (_duration, "30d"),
        "delivery_log": (_duration, "3 months"),
        "identification": (_duration, "6 months"),
        "audit": (_duration, "5y"),
        "active_after_close": (_duration, "30d"),
        "archive": (_optional(_path), None),
    },
}


def config_path(cli_value: str | None) -> Path:
    """Choose the config file: --config, then MAILGATE_CONFIG, then ./config.toml."""
    chosen = cli_value or os.environ.get(ENV_VAR) or str(DEFAULT_PATH)
    return Path(chosen)


def load_config(path: Path) -> Config:
    """Read and validate `path`.

    Raises:
        ConfigError: the file is unreadable, not TOML, or a key is unknown, missing or invalid.
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return parse_config(raw, path=path.resolve())


def parse_config(raw: Mapping[str, Any], *, path: Path) -> Config:
    """Validate an already-decoded TOML document; `path` anchors relative paths."""
    base = path.parent
    for section in raw:
        if section not in _SCHEMA:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(_SCHEMA)})")
    values: dict[str, dict[str, Any]] = {}
    for section, keys in _SCHEMA.items():
        given = raw.get(section, {})
        if not isinstance(given, Mapping):
            raise ConfigError(f"{section}: expected a table [{section}]")
        for key in given:
            if key not in keys:
                raise ConfigError(f"{section}.{key}: unknown key")
        values[section] = {}
        for key, (parse, default) in keys.items():
            if key not in given and default is _REQUIRED:
                raise ConfigError(f"{section}.{key}: missing required key")
            try:
                values[section][key] = parse(given.get(key, default), base)
            except ValueError as exc:
                raise ConfigError(f"{section}.{key}: {exc}") from None
    if values["auth"]["trusted_authserv_id"] and not values["smtp"]["trusted_proxies"]:
        # The MTA's results are believed only from the MTA: else any client could write them.
        raise ConfigError(
            "auth.trusted_authserv_id: needs smtp.trusted_proxies, the address of that MTA"
        )
    _smtp_tls(values["smtp"])
    warnings = _outbound_tls(values["outbound"])
    privacy = _privacy(values)
    _sender_name(values["outbound"])
    return Config(
        path=path,
        smtp=SmtpConfig(**values["smtp"]),
        storage=StorageConfig(**values["storage"]),
        outbound=OutboundConfig(**values["outbound"]),
        http=HttpConfig(**values["http"]),
        tickets=TicketsConfig(**values["tickets"]),
        verification=VerificationConfig(**values["verification"]),
        agents=AgentsConfig(**values["agents"]),
        auth=AuthConfig(**values["auth"]),
        log=LogConfig(**values["log"]),
        security=_security(values["security"], base),
        retention=_retention(values["retention"], values["storage"]["database"]),
        privacy=privacy,
        warnings=warnings,
    )


def _sender_name(outbound: dict[str, Any]) -> None:
    """Split `sender` into the address and the name; the name is given in one place only.

    Raises:
        ConfigError: both `sender` ("Name <address>") and `sender_name` give a name.
    """
    outbound["sender"], name = outbound["sender"]
    if name is not None and outbound["sender_name"] is not None:
        raise ConfigError(
            "outbound.sender_name: the name is given in outbound.sender already; keep one"
        )
    outbound["sender_name"] = outbound["sender_name"] or name


def _smtp_tls(smtp: Mapping[str, Any]) -> None:
    """Certificate and key come together; what needs TLS needs them.

    Raises:
        ConfigError: naming the key that is missing or that cannot work without them.
    """
    if (smtp["tls_cert"] is None) != (smtp["tls_key"] is None):
        missing = "tls_key" if smtp["tls_key"] is None else "tls_cert"
        raise ConfigError(f"smtp.{missing}: needed with smtp.tls_cert and smtp.tls_key: set both")
    for key in ("require_tls", "tls_listen"):
        if smtp[key] and smtp["tls_cert"] is None:
            raise ConfigError(f"smtp.{key}: needs smtp.tls_cert and smtp.tls_key")
    listen, tls_listen = smtp["listen"], smtp["tls_listen"]
    if tls_listen is not None and tls_listen == listen and listen.port:
        raise ConfigError("smtp.tls_listen: must differ from smtp.listen")


def _outbound_tls(outbound: dict[str, Any]) -> tuple[str, ...]:
    """The relay's TLS: the old value "starttls" still works (a warning); the password is
    never sent over a connection mailgate does not encrypt.

    Raises:
        ConfigError: `tls = "none"` with a username.
    """
    warnings: tuple[str, ...] = ()
    if outbound["tls"] == "starttls":
        outbound["tls"] = "opportunistic"
        warnings = (
            'outbound.tls: "starttls" is now called "opportunistic" (the same: STARTTLS when'
            ' the relay offers it, verified); write that, or "required" to never send in clear',
        )
    if outbound["tls"] == "none" and outbound["username"] is not None:
        raise ConfigError(
            'outbound.tls: "none" with outbound.username would send the password in clear;'
            ' use "required" (STARTTLS) or "implicit" (port 465)'
        )
    return warnings


def _privacy(values: dict[str, dict[str, Any]]) -> PrivacyConfig:
    """The privacy address is accepted implicitly: it is added to `smtp.accept` (so it is one
    of our own addresses everywhere: never a participant, never sent automatic mail).

    Raises:
        ConfigError: it is an agent's address (an agent's mail is the team's; a person asks
            for their rights there).
    """
    given = values["privacy"]
    address = address_key(given["address"]) if given["address"] else None
    if address is not None:
        if _listed(address, values["agents"]["addresses"]):
            raise ConfigError("privacy.address: is an agent's address (agents.addresses)")
        if not _listed(address, values["smtp"]["accept"]):
            values["smtp"]["accept"] = (*values["smtp"]["accept"], address)
    return PrivacyConfig(address, given["ttl"], given["max_export_size"])


def _security(values: Mapping[str, Any], base: Path) -> SecurityConfig:
    """With no key_file, one is made beside the other secrets; the keystore defaults to the key
    file's folder."""
    key_file = values["key_file"] or (base / "var" / "master.key").resolve()
    keystore = values["keystore"] or key_file.parent / "keystore.sqlite"
    return SecurityConfig(key_file, keystore, key_file_given=values["key_file"] is not None)
