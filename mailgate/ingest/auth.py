"""Sender authentication after the 250: DKIM (dkimpy), SPF (pyspf), DMARC alignment.

Authentication decides trust, never acceptance: the results are stored per message, and a
From that fails DMARC (its domain publishes a policy, and neither an aligned DKIM signature
nor an aligned SPF pass backs it) cannot join an existing ticket and gets no automatic mail.
Behind an MTA that already verified the mail, `[auth] trusted_authserv_id` makes mailgate read
that MTA's Authentication-Results instead (RFC 8601); other headers claiming the same id were
forged by the sender and are ignored.

All lookups go through one dnspython resolver with `[auth] dns_timeout` as its lifetime, so
tests can point it at a stub server on loopback. The checks are blocking library calls; the
worker runs them in threads.
"""

from __future__ import annotations

import email.parser
import email.policy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import authres
import dkim
import dns.exception
import dns.resolver
import spf
from publicsuffixlist import PublicSuffixList

from mailgate.config import AuthConfig
from mailgate.model import Envelope

Result = Literal["pass", "fail", "none", "temperror"]
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
MAX_SIGNATURES = 10


@dataclass(frozen=True, slots=True)
class DkimSignature:
    domain: str
    result: Result
    partial_body: bool = False  # l= signed only part of the body; the rest could be anything


@dataclass(frozen=True, slots=True)
class AuthResults:
    dkim: Result
    spf: Result
    dmarc: Result
    signatures: tuple[DkimSignature, ...] = ()
    source: str = "mailgate"  # or the trusted MTA's authserv-id
    forged_results: int = 0  # Authentication-Results headers that claimed the trusted id
    notes: tuple[str, ...] = field(default=())

    def as_json(self) -> dict[str, object]:
        return {
            "dkim": self.dkim,
            "spf": self.spf,
            "dmarc": self.dmarc,
            "source": self.source,
            "signatures": [
                {"d": s.domain, "result": s.result, "partial_body": s.partial_body}
                for s in self.signatures
            ],
            "forged_results": self.forged_results,
        }


UNDECIDED = AuthResults(dkim="temperror", spf="temperror", dmarc="temperror")


class TempError(Exception):
    """A DNS lookup timed out or found no server: the result is temperror, not fail."""


class Authenticator:
    """Checks one message at a time; safe to call from several threads."""

    def __init__(self, config: AuthConfig) -> None:
        self._config = config
        self._resolver = dns.resolver.Resolver(configure=not config.nameservers)
        if config.nameservers:
            self._resolver.nameservers = [ns.host for ns in config.nameservers]
            self._resolver.nameserver_ports = {ns.host: ns.port for ns in config.nameservers}
        self._resolver.lifetime = config.dns_timeout
        self._resolver.timeout = config.dns_timeout
        self._psl = PublicSuffixList()
        # pyspf looks names up through this module-level hook; ours uses the same resolver.
        spf.DNSLookup = self._spf_lookup

    def check(self, raw: bytes, envelope: Envelope, from_domain: str) -> AuthResults:
        if self._config.trusted_authserv_id:
            return self._trusted(raw, self._config.trusted_authserv_id)
        signatures = self._dkim(raw)
        spf_result, spf_domain = self._spf(envelope)
        return AuthResults(
            dkim=_overall(signatures),
            spf=spf_result,
            dmarc=self._dmarc(from_domain.lower(), signatures, spf_result, spf_domain),
            signatures=tuple(signatures),
        )

    # -- DNS --

    def _txt(self, name: str) -> list[str]:
        try:
            answer = self._resolver.resolve(name, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise TempError(str(exc)) from exc
        except dns.exception.DNSException:
            return []
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]

    def _dkim_dns(self, name: bytes, timeout: int = 5) -> bytes:
        records = self._txt(name.decode("ascii", "replace").rstrip("."))
        return records[0].encode() if records else b""

    def _spf_lookup(
        self, name: str, qtype: str, tcpfallback: bool = True, timeout: float = 30
    ) -> list[tuple[tuple[str, str], object]]:
        """pyspf's DNSLookup contract: [((name, qtype), data), ...]; TempError on timeout."""
        try:
            answer = self._resolver.resolve(name, qtype)
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

    # -- the checks --

    def _dkim(self, raw: bytes) -> list[DkimSignature]:
        try:
            verifier = dkim.DKIM(raw)
        except Exception:  # noqa: BLE001 - a message dkimpy cannot even read has no valid signature
            return []
        count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
        found = []
        for index in range(min(count, MAX_SIGNATURES)):
            result: Result
            try:
                result = "pass" if verifier.verify(idx=index, dnsfunc=self._dkim_dns) else "fail"
            except TempError:
                result = "temperror"
            except Exception:  # noqa: BLE001 - malformed signatures raise anything
                result = "fail"
            fields = verifier.signature_fields or {}
            domain = fields.get(b"d", b"").decode("ascii", "replace").lower()
            found.append(DkimSignature(domain, result, partial_body=b"l" in fields))
        return found

    def _spf(self, envelope: Envelope) -> tuple[Result, str]:
        """SPF for the connecting IP and MAIL FROM (HELO for the null sender)."""
        ip = _peer_ip(envelope.peer)
        helo = envelope.helo or ""
        sender = envelope.mail_from or (f"postmaster@{helo}" if helo else "")
        domain = sender.rpartition("@")[2].lower()
        if not ip or not domain:
            return "none", domain
        try:
            result, _explanation = spf.check2(
                i=ip, s=sender, h=helo or domain, querytime=self._config.dns_timeout
            )
        except Exception:  # noqa: BLE001 - pyspf raises on odd input; no pass then
            return "temperror", domain
        return _SPF_RESULTS.get(str(result).lower(), "none"), domain

    def _dmarc(
        self,
        from_domain: str,
        signatures: Sequence[DkimSignature],
        spf_result: Result,
        spf_domain: str,
    ) -> Result:
        try:
            policy = self._dmarc_policy(from_domain)
        except TempError:
            return "temperror"
        if policy is None:
            return "none"
        strict_dkim = policy.get("adkim", "r") == "s"
        strict_spf = policy.get("aspf", "r") == "s"
        dkim_aligned = any(
            s.result == "pass"
            and not s.partial_body
            and self._aligned(s.domain, from_domain, strict_dkim)
            for s in signatures
        )
        spf_aligned = spf_result == "pass" and self._aligned(spf_domain, from_domain, strict_spf)
        return "pass" if dkim_aligned or spf_aligned else "fail"

    def _dmarc_policy(self, domain: str) -> dict[str, str] | None:
        """The DMARC record of the From domain, else of its organisational domain."""
        candidates = [domain]
        organisational = self._psl.privatesuffix(domain)
        if organisational and organisational != domain:
            candidates.append(organisational)
        for name in candidates:
            for record in self._txt(f"_dmarc.{name}"):
                tags = _tags(record)
                if tags.get("v") == "DMARC1":
                    return tags
        return None

    def _aligned(self, domain: str, from_domain: str, strict: bool) -> bool:
        if not domain:
            return False
        if strict:
            return domain == from_domain
        return self._psl.privatesuffix(domain) == self._psl.privatesuffix(from_domain) is not None

    # -- behind a trusted MTA --

    def _trusted(self, raw: bytes, authserv_id: str) -> AuthResults:
        """Read the first Authentication-Results with our MTA's id; the rest are forgeries."""
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
        trusted: dict[str, Result] = {}
        seen, forged = False, 0
        for value in headers.get_all("Authentication-Results") or []:
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
        return AuthResults(
            dkim=trusted.get("dkim", "none"),
            spf=trusted.get("spf", "none"),
            dmarc=trusted.get("dmarc", "none"),
            source=authserv_id,
            forged_results=forged,
        )


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


def _peer_ip(peer: str) -> str:
    host = peer.rpartition(":")[0] if ":" in peer else peer
    return host.removeprefix("[").removesuffix("]")
