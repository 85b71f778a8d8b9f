"""structlog set-up: JSON lines on stdout under systemd, a console renderer on a TTY.

Every line passes `mask_addresses`, so an address that slips into an event is logged as
`j***@example.com`. Bodies are never logged by any call site; masking is the safety net.
stdlib loggers (aiosmtpd's "mail.log", asyncio) go through the same chain.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from structlog.typing import Processor

# A local part, "@", a domain. The local part is plain (stopping at what cannot be in one) or
# quoted, with spaces, "@" or escaped quotes inside (`"john @ doe"@example.com`); the domain is
# a name (dotless too: root@localhost) or an address literal (`[192.0.2.1]`, `[IPv6:...]`;
# unclosed too, as in a cut-off error text).
# A plain local part starts only where a word starts and every loop is possessive, so each
# character is looked at a bounded number of times: a 40 KB token without "@" took 6 s
# (quadratic) before, and a log line must never cost that.
_WORD = r"""[^\s<>"'@,;:()\[\]]"""
_ADDRESS = re.compile(
    rf"""("(?:[^"\\\r\n]|\\.){{0,200}}+"|(?<!{_WORD}){_WORD}++)"""
    rf"""@(\[[^\[\]\s\\]{{1,300}}+\]?|{_WORD}++)"""
)


def mask_address(text: str) -> str:
    """Replace every address in `text` with its first letter, stars and the domain."""
    return _ADDRESS.sub(_masked, text)


def _masked(match: re.Match[str]) -> str:
    local = match.group(1).strip('"').strip()
    return f"{local[:1]}***@{match.group(2)}"


_PLAIN = (bool, int, float, type(None))
MAX_DEPTH = 20  # nesting masked; deeper (or a value that holds itself) is cut


def _mask(value: Any, depth: int = 0) -> Any:
    """Mask the strings in `value`, however nested: dict keys and values, lists, tuples and
    sets; any other object as the renderer would show it (its repr), masked. Never raises
    (a log call must not fail): what cannot be shown is logged as "[unloggable]"."""
    try:
        if isinstance(value, str):
            return mask_address(value)
        if isinstance(value, _PLAIN):
            return value
        if depth >= MAX_DEPTH:
            return "[nested too deep]"
        if isinstance(value, list | set | frozenset):
            return [_mask(item, depth + 1) for item in value]
        if isinstance(value, tuple):  # a NamedTuple (HostPort) cannot be rebuilt from one
            return tuple(_mask(item, depth + 1) for item in value)
        if isinstance(value, dict):  # e.g. authentication results, rendered whole into JSON
            return {_mask(k, depth + 1): _mask(item, depth + 1) for k, item in value.items()}
        # An exception, an Address, a Path: the renderers would print its repr unmasked.
        return mask_address(repr(value))
    except Exception:  # noqa: BLE001 - a repr that raises, a dict key that cannot be hashed
        return "[unloggable]"


def mask_addresses(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask addresses in every value (exception text included: it runs
    after `format_exc_info` has rendered the traceback into a string)."""
    for key, value in list(event_dict.items()):
        event_dict[key] = _mask(value)
    return event_dict


def configure_logging(level: str = "info", *, fmt: str = "auto") -> None:
    """Configure structlog and the stdlib root logger once, at start-up."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks are rendered to text before masking, in either format: the console
    # renderer's own traceback printing would come after it and show addresses.
    tail: list[Processor] = [structlog.processors.format_exc_info, mask_addresses]
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *tail,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command at INFO, peer addresses and MAIL FROM included: keep it quiet.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, root.level))
