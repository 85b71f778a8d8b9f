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

# A local part (plain, or quoted with spaces), "@", a domain (dotless too: root@localhost) or
# an address literal (printer@[192.0.2.10]).
_ADDRESS = re.compile(
    r"(\"[^\"\r\n]*\"|[^\s<>\"'@,;:()\[\]]+)@(\[[^\[\]\s]*\]|[^\s<>\"'@,;:()\[\]]+)"
)


def mask_address(text: str) -> str:
    """Replace every address in `text` with its first letter, stars and the domain."""
    return _ADDRESS.sub(lambda m: f"{m.group(1).strip(chr(34))[:1]}***@{m.group(2)}", text)


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        return mask_address(value)
    if isinstance(value, list | tuple):
        return type(value)(_mask(item) for item in value)
    return value


def mask_addresses(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask addresses in every string value (exception text included)."""
    for key, value in event_dict.items():
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
    tail: list[Processor] = [structlog.processors.format_exc_info] if as_json else []
    tail.append(mask_addresses)
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
