"""Sender authentication after the 250: DKIM, SPF and DMARC (RFC 7489), in three steps.

1. `Authenticator.lookup` (the daemon, asyncio): the DNS the verdict needs, each message on its
   own, within a time budget. Only what can align with the From domain is looked up: DKIM keys
   of signatures whose `d=` shares the From's organisational domain (at most MAX_CHECKED) and
   SPF when the MAIL FROM (or HELO) domain does; the lookups an attacker adds by signing with
   other domains cost nothing. DKIM keys and DMARC records come from dnspython's asyncio
   resolver (short tries, retried, as stub resolvers do); pyspf, which is blocking, runs in a
   thread pool of its own sized for DNS waits.
2. `verify_signatures` (the parser process): dkimpy checks the fetched keys against the one
   view of the header that the parser read (`mime.HeaderView`) and the body as received, under
   the parser's time budget, where a quadratic header cannot stall the daemon.
3. `Lookup.results`: the DMARC result from both, with a flag for an aligned pass.

Behind an MTA that already verified the mail, `[auth] trusted_authserv_id` makes mailgate read
that MTA's Authentication-Results instead (RFC 8601); other headers claiming the same id came
with the message and are ignored. Domains are compared as A-labels (`domains.py`).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import authres
import dkim
import dkim.crypto
import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
import spf
import structlog
from dkim.util import parse_tag_value
from publicsuffixlist import PublicSuffixList

from mailgate import metrics
from mailgate.config import AuthConfig
from mailgate.domains import a_label, in_dns
from mailgate.ingest.mime import read_header
from mailgate.model import DkimRef, Envelope, ParsedMail

log = structlog.get_logger(__name__)

Result = Literal["pass", "fail", "none", "temperror"]
SignatureResult = Literal["pass", "fail", "temperror", "skipped"]
_SPF_RESULTS: dict[str, Result] = {
    "pass": "pass",
    "fail": "fail",
    "softfail": "fail",
    "permerror": "fail",
    "neutral": "none",
    "none": "none",
    "temperror": "temperror",
}
_RESULTS: set[str] = {"pass", "fail", "none", "temperror"}
MAX_CHECKED = 3  # DKIM signatures verified per message (aligned ones, topmost first)
RETRY_AFTER = 1.0  # seconds before a DNS query is sent again (a lost UDP answer)
# One message's lookups may take this many `dns_timeout`s in all: they run at once, but the
# DMARC record of a subdomain falls back to the organisational domain's, one after the other.
BUDGET_LOOKUPS = 3
SPF_THREADS = 128  # pyspf blocks on DNS: threads that wait (a lost answer holds one 1 s+)

T = TypeVar("T")
R = TypeVar("R", bound=dns.resolver.BaseResolver)


@dataclass(frozen=True, slots=True)
class DkimSignature:
    domain: str
    result: SignatureResult  # skipped: it could not align with From, so it was not checked
    partial_body: bool = False  # l= signed only part of the body; the rest could be anything


@dataclass(frozen=True, slots=True)
class AuthResults:
    dkim: Result
    spf: Result
    dmarc: Result
    aligned: bool = False  # a DKIM (full body) or SPF pass aligned with the From domain
    policy: str | None = None  # the p= of the From domain's DMARC record, if one was found
    # The header fields the proof covers: those of the aligned DKIM signatures when DKIM alone
    # proves the sender; None (all of them) when the sending server is proven (SPF, the MTA).
    covered: frozenset[str] | None = None
    signatures: tuple[DkimSignature, ...] = ()
    source: str = "mailgate"  # or the trusted MTA's authserv-id
    forged_results: int = 0  # Authentication-Results headers that claimed the trusted id
    notes: tuple[str, ...] = field(default=())

    def as_json(self) -> dict[str, object]:
        return {
            "dkim": self.dkim,
            "spf": self.spf,
            "dmarc": self.dmarc,
            "aligned": self.aligned,
            "policy": self.policy,
            "source": self.source,
            "signatures": [
                {"d": s.domain, "result": s.result, "partial_body": s.partial_body}
                for s in self.signatures
            ],
            "forged_results": self.forged_results,
            "notes": list(self.notes),
        }


class TempError(Exception):
    """A DNS lookup timed out or found no server: the result is temperror, not fail."""


# One DKIM verification for the parser process: (signature index, key record name, record).
VerifyJob = tuple[int, str, bytes]


@dataclass(frozen=True, slots=True)
class Lookup:
    """What DNS said for one message: enough to decide, once its signatures are verified."""

    from_domain: str
    policy: dict[str, str] | TempError | None = None
    spf: Result = "none"
    spf_domain: str = ""
    checked: tuple[DkimRef, ...] = ()
    keys: dict[int, bytes | TempError] = field(default_factory=dict)  # by signature index
    skipped: tuple[DkimRef, ...] = ()
    final: AuthResults | None = None  # decided without verification (trusted MTA, ...)
    forged_results: int = 0  # Authentication-Results claiming our MTA's id, not from it

    @property
    def jobs(self) -> list[VerifyJob]:
        """The signatures to verify in the parser process, with their keys."""
        return [
            (ref.index, _key_name(ref), key)
            for ref in self.checked
            if isinstance(key := self.keys.get(ref.index, b""), bytes) and key
        ]

    def results(self, verified: dict[int, bool], psl: PublicSuffixList) -> AuthResults:
        """Combine DNS and the parser process's verifications (`verified`, by index)."""
        if self.final is not None:
            return self.final
        signatures = [
            DkimSignature(ref.domain, _signature_result(ref, self.keys, verified), ref.partial_body)
            for ref in self.checked
        ] + [DkimSignature(ref.domain, "skipped", ref.partial_body) for ref in self.skipped]
        policy = self.policy
        strict_dkim = isinstance(policy, dict) and policy.get("adkim", "r") == "s"
        strict_spf = isinstance(policy, dict) and policy.get("aspf", "r") == "s"
        proving = [
            ref
            for s, ref in zip(signatures, self.checked, strict=False)
            if s.result == "pass"
            and not s.partial_body
            and _aligned(psl, ref.domain, self.from_domain, strict=strict_dkim)
        ]
        spf_aligned = self.spf == "pass" and _aligned(
            psl, self.spf_domain, self.from_domain, strict=strict_spf
        )
        aligned = bool(proving) or spf_aligned
        covered = None if spf_aligned else frozenset().union(*(ref.signed for ref in proving))
        checked = signatures[: len(self.checked)]
        dkim_result = _overall(checked)
        dmarc: Result
        if isinstance(policy, TempError):
            dmarc = "temperror"
        elif policy is None:
            dmarc = "none"
        elif aligned:
            dmarc = "pass"
        elif dkim_result == "temperror" or self.spf == "temperror":
            dmarc = "temperror"  # an aligned check that could still pass did not answer
        else:
            dmarc = "fail"
        return AuthResults(
            forged_results=self.forged_results,
            dkim=dkim_result,
            spf=self.spf,
            dmarc=dmarc,
            aligned=aligned,
            policy=policy.get("p", "none") if isinstance(policy, dict) else None,
            covered=covered,
            signatures=tuple(signatures),
        )


def verify_signatures(raw: bytes, jobs: Sequence[VerifyJob]) -> dict[int, bool]:
    """Verify DKIM signatures of `raw` with keys fetched beforehand (in the parser process).

    dkimpy gets the header fields exactly as `mime.read_header` split them, so it judges the
    same From that becomes the requester, and never parses the raw header itself (its parser
    is quadratic in folded lines).
    """
    if not jobs:
        return {}
    header = read_header(raw)
    verifier = dkim.DKIM(b"")
    verifier.headers = [[name, value] for name, value in header.fields()]
    verifier.body = crlf_lines(raw[header.body_start :])
    records = {name: key for _index, name, key in jobs if _affordable(key)}

    def fetched(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(_name(name))

    found: dict[int, bool] = {}
    for index in (job[0] for job in jobs):
        try:
            found[index] = bool(verifier.verify(idx=index, dnsfunc=fetched))
        except Exception:  # noqa: BLE001 - malformed signatures and keys raise anything
            found[index] = False
    return found


def crlf_lines(body: bytes) -> bytes:
    """`body` with every line ending CRLF, as dkimpy reads body lines (a bare LF is one).

    Two bytes.replace passes, not re.sub(rb"\r?\n", ...): that keeps a list entry per line,
    and 25 MiB of empty lines took the parser process 1.1 GiB.
    """
    if body.count(b"\n") == body.count(b"\r\n"):
        return body  # the usual case: CRLF already (SMTP)
    return body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# An RSA key past these costs seconds a verification in pure Python (dkimpy's own pow): a
# sender could stall the parser process with its own domain's keys. Real keys are 1024-4096
# bits with the exponent 65537 (RFC 8301 asks for 1024-4096).
MAX_KEY_BITS = 4096
MAX_EXPONENT = 2**32


def _affordable(record: bytes) -> bool:
    """Tell whether a key record's RSA key is small enough to verify with (ed25519 always)."""
    try:
        tags = parse_tag_value(record)
        if tags.get(b"k", b"rsa").strip().lower() != b"rsa":
            return True
        key = dkim.crypto.parse_public_key(base64.b64decode(b"".join(tags[b"p"].split())))
    except Exception:  # noqa: BLE001 - dkimpy will find it broken itself: no pass
        return True
    return bool(
        key["modulus"].bit_length() <= MAX_KEY_BITS and key["publicExponent"] <= MAX_EXPONENT
    )


def _name(raw_name: bytes | str) -> str:
    text = raw_name.decode("ascii", "replace") if isinstance(raw_name, bytes) else raw_name
    return text.rstrip(".").lower()


def _key_name(ref: DkimRef) -> str:
    return f"{ref.selector}._domainkey.{ref.domain}".lower()


def _signature_result(
    ref: DkimRef, keys: dict[int, bytes | TempError], verified: dict[int, bool]
) -> SignatureResult:
    key = keys.get(ref.index)
    if isinstance(key, TempError):
        return "temperror"
    return "pass" if verified.get(ref.index) else "fail"


class Authenticator:
    """Looks up what one message's verdict needs; safe to use for many messages at once."""

    def __init__(
        self, config: AuthConfig, *, trusted_peer: Callable[[str], bool] = lambda _ip: False
    ) -> None:
        self._config = config
        self._trusted_peer = trusted_peer  # `[smtp] trusted_proxies`: where the MTA connects from
        self._psl = PublicSuffixList()
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._spf_resolver: dns.resolver.Resolver | None = None
        configure = not config.nameservers
        try:
            self._resolver = _configured(dns.asyncresolver.Resolver(configure=configure), config)
            self._spf_resolver = _configured(dns.resolver.Resolver(configure=configure), config)
        except dns.resolver.NoResolverConfiguration:
            log.warning(
                "dns_unavailable",
                effect="no nameserver is configured: mail is ingested unauthenticated at once",
            )
        self._spf_pool = ThreadPoolExecutor(SPF_THREADS, thread_name_prefix="spf")
        self.budget = config.dns_timeout * BUDGET_LOOKUPS

    @property
    def psl(self) -> PublicSuffixList:
        return self._psl

    @property
    def dns_configured(self) -> bool:
        return self._resolver is not None

    def close(self) -> None:
        self._spf_pool.shutdown(wait=False, cancel_futures=True)

    async def dns_state(self) -> str:
        """What authentication can do with the DNS it has, in a sentence for ops."""
        if self._resolver is None:
            return (
                "no nameserver is configured: sender checks cannot run, so every mail becomes"
                " a ticket at once, unauthenticated (it cannot act as an agent, rename a"
                " requester or add participants)"
            )
        try:
            await self._txt("_dmarc.mailgate-dns-probe.invalid")
        except TempError:
            return (
                f"DNS does not answer: mail from a domain in the DNS waits up to"
                f" {self._config.retry_for:g} s (retried with backoff) for its sender checks,"
                " then becomes a ticket as unauthenticated; mail from a dotless, .localhost,"
                " .local or .invalid domain becomes a ticket at once"
            )
        return "DNS answers: sender checks run"

    def source_of(self, mail: ParsedMail) -> str:
        """Whose DNS the checks of `mail` wait on: the From's organisational domain."""
        domain = a_label(mail.sender.email.rpartition("@")[2])
        return self._org(domain) or domain

    async def lookup(self, mail: ParsedMail, envelope: Envelope) -> Lookup:
        """Ask DNS what this message's verdict needs, within the budget; never raises."""
        from_domain = a_label(mail.sender.email.rpartition("@")[2])
        if mail.evidence.from_missing:  # DMARC judges the From, and there is none: ask nothing
            return Lookup(
                from_domain, final=AuthResults("none", "none", "none", notes=("no From",))
            )
        authserv_id = self._config.trusted_authserv_id
        if authserv_id and self._trusted_peer(envelope.peer_ip):
            results = self._trusted(mail.evidence.authentication_results, authserv_id, from_domain)
            return Lookup(from_domain, final=results)
        # Not from our MTA: its results, if the message carries any, were written by the sender
        # (flagged by `claims_trusted_results`); mailgate checks for itself.
        if not in_dns(from_domain) or self._resolver is None:
            why = "no DNS resolver" if self._resolver is None else "domain outside the DNS"
            return Lookup(from_domain, final=AuthResults("none", "none", "none", notes=(why,)))
        org = self._org(from_domain)
        refs = mail.evidence.signatures
        aligned = [r for r in refs if org is not None and self._org(r.domain) == org]
        checked = tuple(aligned[:MAX_CHECKED])
        skipped = tuple(r for r in refs if r not in checked)
        spf_sender = _spf_sender(envelope)
        spf_domain = a_label(spf_sender.rpartition("@")[2])
        check_spf = org is not None and self._org(spf_domain) == org and bool(envelope.client_ip)

        with metrics.AUTH_DNS_SECONDS.time():
            async with asyncio.TaskGroup() as group:
                policy = group.create_task(self._within(self._dmarc_policy(from_domain)))
                keys = {r.index: group.create_task(self._within(self._key(r))) for r in checked}
                spf_result = group.create_task(
                    self._within(self._spf(envelope, spf_sender, spf_domain))
                    if check_spf
                    else _none()
                )
        return Lookup(
            from_domain,
            forged_results=claims_trusted_results(
                mail.evidence.authentication_results, authserv_id
            ),
            policy=policy.result(),
            spf=_spf_of(spf_result.result()),
            spf_domain=spf_domain,
            checked=checked,
            keys={index: task.result() for index, task in keys.items()},
            skipped=skipped,
        )

    async def _within(self, lookup: Awaitable[T]) -> T | TempError:
        """Run one lookup within the message's budget; TempError past it or on DNS trouble."""
        try:
            async with asyncio.timeout(self.budget):
                return await lookup
        except TimeoutError:
            return TempError("budget exceeded")
        except TempError as exc:
            return exc

    # -- DNS --

    async def _txt(self, name: str) -> list[str]:
        assert self._resolver is not None
        try:
            answer = await self._resolver.resolve(name, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise TempError(str(exc)) from exc
        except dns.exception.DNSException:
            return []  # a name that cannot exist (bad label, too long) has no records
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]

    async def _key(self, ref: DkimRef) -> bytes:
        records = await self._txt(_key_name(ref))
        return records[0].encode() if records else b""

    async def _dmarc_policy(self, domain: str) -> dict[str, str] | None:
        """The DMARC record of the From domain, else of its organisational domain."""
        candidates = [domain]
        organisational = self._org(domain)
        if organisational and organisational != domain:
            candidates.append(organisational)
        for name in candidates:
            records = [_tags(r) for r in await self._txt(f"_dmarc.{name}")]
            policies = [tags for tags in records if tags.get("v") == "DMARC1"]
            if len(policies) == 1:  # several records: none applies (RFC 7489 6.6.3)
                return policies[0]
        return None

    async def _spf(self, envelope: Envelope, sender: str, domain: str) -> Result:
        """SPF for the original client (the one behind a trusted proxy) and MAIL FROM."""
        context = contextvars.copy_context()
        context.run(_SPF_LOOKUP.set, self._spf_lookup)
        helo = envelope.client_helo or domain
        budget = self.budget
        loop = asyncio.get_running_loop()

        def check() -> Result:
            local = sender.rpartition("@")[0]
            try:
                result, _explanation = spf.check2(
                    i=envelope.client_ip, s=f"{local}@{domain}", h=helo, querytime=budget
                )
            except Exception:  # noqa: BLE001 - pyspf raises on odd input; no pass then
                return "temperror"
            return _SPF_RESULTS.get(str(result).lower(), "none")

        return await loop.run_in_executor(self._spf_pool, context.run, check)

    def _spf_lookup(self, name: str, qtype: str) -> list[tuple[tuple[str, str], object]]:
        """pyspf's DNSLookup contract: [((name, qtype), data), ...]; TempError on timeout."""
        assert self._spf_resolver is not None
        try:
            answer = self._spf_resolver.resolve(name, qtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        found: list[tuple[tuple[str, str], object]] = []
        for rdata in answer:
            if qtype in ("A", "AAAA"):
                found.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                found.append(((name, qtype), (rdata.preference, rdata.exchange)))
            elif qtype == "PTR":
                found.append(((name, qtype), rdata.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                found.append(((name, qtype), rdata.strings))
        return found

    def _org(self, domain: str) -> str | None:
        """The organisational domain (RFC 7489 3.2), from the public suffix list."""
        found = self._psl.privatesuffix(domain) if domain else None
        return str(found) if found else None

    # -- behind a trusted MTA --

    def _trusted(self, values: Sequence[str], authserv_id: str, from_domain: str) -> AuthResults:
        """Read the first Authentication-Results with our MTA's id; the rest are forgeries."""
        trusted: dict[str, Result] = {}
        aligned = False
        seen, forged = False, 0
        for value in values:
            try:
                parsed = authres.AuthenticationResultsHeader.parse(
                    f"Authentication-Results: {value}"
                )
            except Exception:  # noqa: BLE001, S112 - an unparseable header is nobody's results
                continue
            if str(parsed.authserv_id).lower() != authserv_id.lower():
                continue
            if seen:  # our MTA adds one, on top; any further one came with the message
                forged += 1
                continue
            seen = True
            for result in parsed.results:
                method, outcome = str(result.method).lower(), str(result.result).lower()
                if method in ("dkim", "spf", "dmarc") and method not in trusted:
                    mapped = _SPF_RESULTS.get(outcome, "none") if method == "spf" else outcome
                    trusted[method] = mapped if mapped in _RESULTS else "fail"  # type: ignore[assignment]
                if outcome == "pass" and method in ("dkim", "spf"):
                    aligned = aligned or self._aligned_property(result, from_domain)
        return AuthResults(
            dkim=trusted.get("dkim", "none"),
            spf=trusted.get("spf", "none"),
            dmarc=trusted.get("dmarc", "none"),
            aligned=aligned,
            source=authserv_id,
            forged_results=forged,
        )

    def _aligned_property(self, result: object, from_domain: str) -> bool:
        """Tell whether a trusted dkim/spf pass names a domain aligned with the From."""
        for prop in getattr(result, "properties", ()):
            name = f"{prop.type}.{prop.name}".lower()
            if name in ("header.d", "header.i", "smtp.mailfrom", "smtp.helo"):
                domain = a_label(str(prop.value).rpartition("@")[2])
                if _aligned(self._psl, domain, from_domain, strict=False):
                    return True
        return False


def claims_trusted_results(values: Sequence[str], authserv_id: str | None) -> int:
    """How many Authentication-Results in `values` claim our MTA's id (forged, when the
    message did not come through that MTA)."""
    if not authserv_id:
        return 0
    claimed = 0
    for value in values:
        try:
            parsed = authres.AuthenticationResultsHeader.parse(f"Authentication-Results: {value}")
        except Exception:  # noqa: BLE001, S112 - an unparseable header claims nothing
            continue
        claimed += str(parsed.authserv_id).lower() == authserv_id.lower()
    return claimed


def _configured(resolver: R, config: AuthConfig) -> R:
    """`resolver` with our nameservers, short tries retried, and `dns_timeout` in all."""
    if config.nameservers:
        resolver.nameservers = [ns.host for ns in config.nameservers]
        resolver.nameserver_ports = {ns.host: ns.port for ns in config.nameservers}
    resolver.timeout = min(RETRY_AFTER, config.dns_timeout)
    resolver.lifetime = config.dns_timeout
    return resolver


# pyspf looks names up through a module-level hook. It is set once, here, to a dispatcher:
# each SPF check runs in a context that carries its own Authenticator's lookup.
_SPF_LOOKUP: contextvars.ContextVar[Callable[[str, str], list[tuple[tuple[str, str], object]]]]
_SPF_LOOKUP = contextvars.ContextVar("spf_lookup")


def _spf_dispatch(
    name: str, qtype: str, tcpfallback: bool = True, timeout: float = 30
) -> list[tuple[tuple[str, str], object]]:
    return _SPF_LOOKUP.get()(name, qtype)


spf.DNSLookup = _spf_dispatch


def _spf_sender(envelope: Envelope) -> str:
    """The identity SPF checks: MAIL FROM, or postmaster@HELO for the null sender."""
    if envelope.mail_from:
        return envelope.mail_from
    helo = envelope.client_helo or ""
    return f"postmaster@{helo}" if helo else ""


def _spf_of(value: Result | TempError) -> Result:
    return "temperror" if isinstance(value, TempError) else value


async def _none() -> Result:
    return "none"


def _aligned(psl: PublicSuffixList, domain: str, from_domain: str, *, strict: bool) -> bool:
    if not domain:
        return False
    if strict:
        return domain == from_domain
    org = psl.privatesuffix(domain)
    return org is not None and org == psl.privatesuffix(from_domain)


def _overall(signatures: Sequence[DkimSignature]) -> Result:
    if not signatures:
        return "none"
    if any(s.result == "pass" for s in signatures):
        return "pass"
    if any(s.result == "temperror" for s in signatures):
        return "temperror"
    return "fail"


def _tags(record: str) -> dict[str, str]:
    tags = {}
    for part in record.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags[key.strip().lower()] = value.strip()
    return tags
