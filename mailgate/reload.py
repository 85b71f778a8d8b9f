"""SIGHUP: read the config file and the templates again and apply what may change live.

The new config is loaded and the templates checked off the event loop; anything wrong
(a ConfigError naming the key, a template naming its file and line) refuses the whole reload
and the old config stays in force. Keys in `RELOADABLE` are applied through the daemon's
`Live[Config]`, whose readers take the current value at use; every other key that changed is
kept as it was and named in a warning, since it needs a restart (the listen addresses and
storage paths are bound, the keys opened, at start), but for the keys in `TIED`, whose change
refuses the reload. No connection is touched.
"""

from __future__ import annotations

import asyncio
from dataclasses import fields, is_dataclass, replace

import structlog

from mailgate.config import Config, load_config
from mailgate.errors import ConfigError
from mailgate.live import Live
from mailgate.outbound.templates import Templates
from mailgate.tls import server_context

log = structlog.get_logger(__name__)

# "section.key" of every key a reload applies. A component that reads a key from the live
# config at use time (or rebuilds from it in a `Live.on_change` callback) adds it here.
RELOADABLE = frozenset(
    {
        "smtp.accept",
        "smtp.max_message_size",
        "smtp.drain_timeout",
        "smtp.max_connections",
        "smtp.max_connections_per_ip",
        "smtp.max_recipients",
        "smtp.max_errors",
        "smtp.timeout",
        "smtp.min_data_rate",
        "smtp.max_received_headers",
        "smtp.trusted_proxies",
        "outbound.templates",
        "http.api_tokens",
        "http.api_rate_limit",
        "agents.addresses",
        "agents.expose_address",
        "retention.raw_messages",
        "retention.closed_tickets",
        "retention.unverified_requesters",
        "retention.delivery_log",
        "retention.identification",
        "retention.audit",
        "retention.active_after_close",
    }
)

# Keys that a reloadable key is derived from: `privacy.address` is added to `smtp.accept` as
# the file is read, and must not be an agent's. Kept while the rest is applied, the address
# in force would drop out of the accept list (its mail refused 550) or become an agent's; so
# a change to one refuses the reload, and the old config stays whole until a restart.
TIED = frozenset({"privacy.address"})


# The certificate and its key change live while TLS stays on (the listeners hold one
# context whose handshakes take the certificate loaded last); switching TLS on or off needs
# a restart, since it changes what the listeners offer.
CERTIFICATE = frozenset({"smtp.tls_cert", "smtp.tls_key"})


def merge(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The config to apply: `new`'s reloadable keys and `old`'s others; and the keys that
    changed but need a restart ("http.listen")."""
    reloadable = RELOADABLE
    if old.smtp.tls_cert is not None and new.smtp.tls_cert is not None:
        reloadable |= CERTIFICATE
    restart = [name for name in changed_keys(old, new) if name not in reloadable]
    kept: dict[str, dict[str, object]] = {section: {} for section in _sections(old)}
    for name in restart:
        section, _, key = name.partition(".")
        kept[section][key] = getattr(getattr(old, section), key)
    sections = {section: replace(getattr(new, section), **keys) for section, keys in kept.items()}
    return replace(old, **sections), restart


def changed_keys(old: Config, new: Config) -> list[str]:
    """The "section.key" names whose values differ."""
    return [
        f"{section}.{key.name}"
        for section in _sections(old)
        for key in fields(getattr(old, section))
        if getattr(getattr(old, section), key.name) != getattr(getattr(new, section), key.name)
    ]


def _sections(config: Config) -> list[str]:
    """The config's sections (`[smtp]`, ...): its fields that are dataclasses, not the path
    or the warnings it was loaded with."""
    return [f.name for f in fields(config) if is_dataclass(getattr(config, f.name))]


def _load(old: Config) -> tuple[Config, Templates]:
    config = load_config(old.path)
    templates = Templates(config.outbound.templates)
    templates.check()
    smtp = config.smtp
    if smtp.tls_cert is not None and smtp.tls_key is not None:
        server_context(smtp.tls_cert, smtp.tls_key)  # a ConfigError refuses the reload
    return config, templates


async def reload(live: Live[Config], templates: Templates) -> bool:
    """Reload from the file the daemon started with; False if the new config was refused."""
    old = live.current
    try:
        new, fresh = await asyncio.to_thread(_load, old)
    except ConfigError as exc:
        log.error("reload_refused", error=str(exc))
        return False
    tied = [name for name in changed_keys(old, new) if name in TIED]
    if tied:
        log.error("reload_refused", error=f"{', '.join(tied)}: changed; needs a restart")
        return False
    for warning in new.warnings:
        log.warning("config_deprecated", detail=warning)
    applied, restart = merge(old, new)
    if restart:
        log.warning("reload_needs_restart", keys=restart)
    templates.adopt(fresh)
    live.replace(applied)
    log.info("config_reloaded", changed=changed_keys(old, applied))
    return True
