"""``ocsp-responder audit``: ask the responder about indexed serials, as a relying party.

What an outside monitor such as SSLMate's OCSP Watch does, from the inside: for every
serial in the CT index (or a random sample), POST an OCSP request with a SHA-1 CertID
built from the configured issuer certificate, over HTTP, and report every answer that
is not a valid signed good/revoked response for exactly that CertID. Only the issuer
certificates are needed (no keys): the checks use nothing the responder could fake.

Problems reported (``Violation.problem``): ``http-error``, ``malformed``, ``unauthorized``,
``try-later``, ``internal-error``, ``error-status``, ``unknown``, ``wrong-certid``,
``stale``, ``bad-signature``, ``wrong-status`` (good for a serial revoked in the database).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import asyncpg
import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from responder.config import Config, ConfigError
from responder.ct_index_store import retired_before
from responder.schema import ct_index_has_not_after
from responder.store import serial_from_key
from signer.issuers import Issuer, IssuerConfigError, issuer_from_certificate

#: thisUpdate may be this far in the future (clock skew between us and the responder)
CLOCK_SKEW = dt.timedelta(seconds=60)

_ERROR_STATUS = {
    ocsp.OCSPResponseStatus.UNAUTHORIZED: "unauthorized",
    ocsp.OCSPResponseStatus.TRY_LATER: "try-later",
    ocsp.OCSPResponseStatus.INTERNAL_ERROR: "internal-error",
}


@dataclass(frozen=True, slots=True)
class Violation:
    issuer: str
    serial: str  # hex
    problem: str
    detail: str


@dataclass
class AuditReport:
    url: str
    checked: int = 0
    good: int = 0
    revoked: int = 0
    violations: list[Violation] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "url": self.url,
            "checked": self.checked,
            "good": self.good,
            "revoked": self.revoked,
            "violations": [asdict(v) for v in self.violations],
        }

    def render(self) -> str:
        lines = [
            f"VIOLATION {v.issuer} {v.serial}: {v.problem}: {v.detail}" for v in self.violations
        ]
        lines.append(
            f"audited {self.checked} indexed serials at {self.url}: {self.good} good, "
            f"{self.revoked} revoked, {len(self.violations)} violations"
        )
        return "\n".join(lines)

    def render_json(self) -> str:
        return json.dumps(self.as_json(), indent=2)


@dataclass(frozen=True, slots=True)
class Target:
    issuer: Issuer
    serial: int
    revoked: bool  # a revocation is recorded in the database


def load_audit_issuers(config: Config) -> list[Issuer]:
    """The configured issuers from their certificates alone (no keys are read)."""
    issuers = []
    for ic in config.issuers:
        try:
            data = ic.certificate.read_bytes()
            cert = (
                x509.load_pem_x509_certificate(data)
                if b"-----BEGIN" in data
                else x509.load_der_x509_certificate(data)
            )
            issuers.append(issuer_from_certificate(ic.name, cert))
        except (OSError, ValueError, IssuerConfigError) as exc:
            raise ConfigError(f"issuer {ic.name}: cannot load {ic.certificate}: {exc}") from exc
    if not issuers:
        raise ConfigError("issuers: at least one issuer must be configured")
    return issuers


async def load_targets(
    dsn: str,
    issuers: Sequence[Issuer],
    sample: int | None,
    *,
    expired_retention: dt.timedelta | None = None,
) -> list[Target]:
    """Indexed serials of the configured issuers: all, or a uniform random sample.

    With ``expired_retention``, serials whose certificate expired longer ago are left out:
    the responder answers those ``unauthorized`` on purpose (retired; docs/deploy.md), and
    an outside monitor checks unexpired certificates only."""
    conn = await asyncpg.connect(dsn)
    try:
        ids = {
            bytes(r["spki_sha256"]): r["id"]
            for r in await conn.fetch("SELECT id, spki_sha256 FROM issuers")
        }
        by_id = {ids[i.spki_sha256]: i for i in issuers if i.spki_sha256 in ids}
        ct_not_after = await ct_index_has_not_after(conn)
        not_after = "coalesce(r.not_after, c.not_after)" if ct_not_after else "r.not_after"
        retired = retired_before(expired_retention)
        query = (
            "SELECT c.issuer_id, c.serial, "
            "  EXISTS (SELECT 1 FROM revocations v "
            "          WHERE v.issuer_id = c.issuer_id AND v.serial = c.serial) AS revoked "
            "FROM ct_index c "
            "LEFT JOIN certificates r ON r.issuer_id = c.issuer_id AND r.serial = c.serial "
            "WHERE c.issuer_id = ANY($1::smallint[]) "
            f"  AND ($2::timestamptz IS NULL OR {not_after} IS NULL OR {not_after} >= $2)"
        )
        args = (list(by_id), retired)
        if sample is not None:
            rows = await conn.fetch(query + " ORDER BY random() LIMIT $3", *args, sample)
        else:
            rows = await conn.fetch(query + " ORDER BY c.issuer_id, c.serial", *args)
    finally:
        await conn.close()
    return [
        Target(by_id[r["issuer_id"]], serial_from_key(bytes(r["serial"])), r["revoked"])
        for r in rows
    ]


def build_request(issuer: Issuer, serial: int) -> bytes:
    """A relying party's request: one SHA-1 CertID, no nonce (what browsers send)."""
    name_hash, key_hash = issuer.cert_id_hashes["sha1"]
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        name_hash, key_hash, serial, hashes.SHA1()
    )
    return builder.build().public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True, slots=True)
class Verdict:
    """``ok`` with ``what`` = "good"/"revoked", or not ok with ``what`` = the problem."""

    ok: bool
    what: str
    detail: str = ""


def _bad(problem: str, detail: str) -> Verdict:
    return Verdict(False, problem, detail)


def check_answer(
    target: Target, status: int, body: bytes, now: dt.datetime | None = None
) -> Verdict:
    """Whether an HTTP answer is a valid signed good/revoked response for the target."""
    now = now or dt.datetime.now(dt.UTC)
    if status != 200:
        return _bad("http-error", f"HTTP {status}")
    try:
        resp = ocsp.load_der_ocsp_response(body)
    except ValueError as exc:
        return _bad("malformed", f"not an OCSPResponse: {exc}")
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        name = _ERROR_STATUS.get(resp.response_status, "error-status")
        return _bad(name, f"responseStatus {resp.response_status.name}")
    singles = list(resp.responses)
    if len(singles) != 1:
        return _bad("wrong-certid", f"{len(singles)} SingleResponses, expected 1")
    single = singles[0]
    name_hash, key_hash = target.issuer.cert_id_hashes["sha1"]
    if not isinstance(single.hash_algorithm, hashes.SHA1):
        return _bad("wrong-certid", f"hash algorithm {single.hash_algorithm.name}, asked sha1")
    if single.issuer_name_hash != name_hash or single.issuer_key_hash != key_hash:
        return _bad("wrong-certid", "issuerNameHash/issuerKeyHash do not match the issuer")
    if single.serial_number != target.serial:
        return _bad("wrong-certid", f"serial {single.serial_number:x} answered")
    if single.this_update_utc > now + CLOCK_SKEW:
        return _bad(
            "stale", f"thisUpdate {single.this_update_utc:%Y-%m-%dT%H:%M:%SZ} is in the future"
        )
    if single.next_update_utc is None or single.next_update_utc <= now:
        return _bad("stale", f"nextUpdate {single.next_update_utc} has passed (or is absent)")
    problem = verify_response_signature(resp, target.issuer.certificate)
    if problem is not None:
        return _bad("bad-signature", problem)
    cert_status = single.certificate_status
    if cert_status == ocsp.OCSPCertStatus.UNKNOWN:
        return _bad("unknown", "certStatus unknown")
    if cert_status == ocsp.OCSPCertStatus.GOOD:
        if target.revoked:
            return _bad("wrong-status", "good, but the serial is revoked in the database")
        return Verdict(True, "good")
    return Verdict(True, "revoked")


def verify_response_signature(resp: ocsp.OCSPResponse, issuer: x509.Certificate) -> str | None:
    """None when the response is signed by the issuer or by a responder certificate the
    issuer signed for OCSP signing (included in the response); else what is wrong."""
    signer = _responder_certificate(resp, issuer)
    if isinstance(signer, str):
        return signer
    try:
        _verify(signer.public_key(), resp.signature, resp.tbs_response_bytes, resp)
    except (InvalidSignature, UnsupportedAlgorithm, TypeError, ValueError) as exc:
        return f"signature does not verify with {signer.subject.rfc4514_string()}: {exc!r}"
    return None


def _responder_certificate(
    resp: ocsp.OCSPResponse, issuer: x509.Certificate
) -> x509.Certificate | str:
    if _names_signer(resp, issuer):
        return issuer
    for cert in resp.certificates:
        if not _names_signer(resp, cert):
            continue
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            return "the responder certificate is not signed by the issuer"
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            return "the responder certificate lacks id-kp-OCSPSigning"
        if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            return "the responder certificate lacks id-kp-OCSPSigning"
        return cert
    return "responderID names neither the issuer nor an included responder certificate"


def _names_signer(resp: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    if resp.responder_key_hash is not None:
        try:
            ski = x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
        except (TypeError, ValueError):
            return False
        return ski.digest == resp.responder_key_hash
    return resp.responder_name == cert.subject


def _verify(pub: object, signature: bytes, data: bytes, resp: ocsp.OCSPResponse) -> None:
    alg = resp.signature_hash_algorithm
    if isinstance(pub, rsa.RSAPublicKey):
        if alg is None:
            raise ValueError("RSA signature without a hash algorithm")
        pub.verify(signature, data, padding.PKCS1v15(), alg)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        if alg is None:
            raise ValueError("ECDSA signature without a hash algorithm")
        pub.verify(signature, data, ec.ECDSA(alg))
    elif isinstance(pub, ed25519.Ed25519PublicKey):
        pub.verify(signature, data)
    else:
        raise TypeError(f"unsupported responder key {type(pub).__name__}")


async def run_audit(
    url: str,
    targets: Sequence[Target],
    *,
    concurrency: int = 16,
    timeout: float = 10.0,
) -> AuditReport:
    """POST one request per target with at most ``concurrency`` in flight."""
    report = AuditReport(url)
    pending: Iterator[Target] = iter(targets)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            for target in pending:
                await _audit_one(client, url, target, report)

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    report.violations.sort(key=lambda v: (v.issuer, v.serial))
    return report


async def _audit_one(
    client: httpx.AsyncClient, url: str, target: Target, report: AuditReport
) -> None:
    try:
        body = build_request(target.issuer, target.serial)
    except ValueError as exc:
        # e.g. a negative serial in the CT index: no relying party can ask for it, and
        # cryptography refuses to encode it; report it rather than abort the audit
        report.checked += 1
        report.violations.append(
            Violation(
                target.issuer.name,
                format(target.serial, "x"),
                "unaskable-serial",
                f"no OCSP request can carry this serial: {exc}",
            )
        )
        return
    try:
        answer = await client.post(
            url, content=body, headers={"Content-Type": "application/ocsp-request"}
        )
        verdict = check_answer(target, answer.status_code, answer.content)
    except httpx.HTTPError as exc:
        verdict = _bad("http-error", f"{type(exc).__name__}: {exc}")
    report.checked += 1
    if not verdict.ok:
        report.violations.append(
            Violation(target.issuer.name, format(target.serial, "x"), verdict.what, verdict.detail)
        )
    elif verdict.what == "good":
        report.good += 1
    else:
        report.revoked += 1
