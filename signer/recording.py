"""Recording issuance: a certificate or precertificate becomes a durable signed response.

The CA calls this BEFORE publishing a (pre)certificate. We parse it, find its issuer by
name and signature, sign a "good" response, and commit the certificate record and the
response in one transaction. Only after the commit does the caller hear "recorded"; any
failure is an exception the caller must turn into a refusal, so the CA does not publish.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from responder.store import CertificateRecord, PresignedStore
from signer.issuers import IssuerRegistry
from signer.response_builder import CertStatus, SignedResponse, ValidityPolicy, sign_response

log = logging.getLogger(__name__)


class CertificateRejected(ValueError):
    """The submitted bytes are not a certificate we can record; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class RecordOutcome:
    serial: int
    issuer: str
    precertificate: bool
    created: bool
    this_update: int
    next_update: int

    def as_json(self) -> dict[str, object]:
        return {
            "serial": format_serial(self.serial),
            "issuer": self.issuer,
            "precertificate": self.precertificate,
            "created": self.created,
            "status": "good",
            "this_update": self.this_update,
            "next_update": self.next_update,
        }


def format_serial(serial: int) -> str:
    """Lower-case hex of the serial, even length (as `openssl x509 -serial` prints it)."""
    text = format(serial, "x")
    return text if len(text) % 2 == 0 else "0" + text


def parse_serial(text: str) -> int:
    """Hex serial, with or without colons or 0x; refuses anything else."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    if not cleaned or any(c not in "0123456789abcdef" for c in cleaned):
        raise ValueError(f"serial {text!r} is not hexadecimal")
    return int(cleaned, 16)


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """PEM (one or many) or a single DER certificate; strict."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise CertificateRejected(f"not a PEM or DER certificate: {exc}") from exc
    if not certs:
        raise CertificateRejected("no certificate found")
    return certs


def is_precertificate(cert: x509.Certificate) -> bool:
    """A precertificate carries the critical CT poison extension (RFC 6962 3.1)."""
    try:
        cert.extensions.get_extension_for_class(x509.PrecertPoison)
    except x509.ExtensionNotFound:
        return False
    except ValueError as exc:
        raise CertificateRejected(f"certificate extensions are malformed: {exc}") from exc
    return True


class CertificateRecorder:
    """Parse, sign and durably store; the one code path for the API, CLI and bulk import."""

    def __init__(
        self, registry: IssuerRegistry, store: PresignedStore, policy: ValidityPolicy
    ) -> None:
        self.registry = registry
        self.store = store
        self.policy = policy

    def prepare(self, cert: x509.Certificate) -> tuple[CertificateRecord, SignedResponse, str]:
        """Find the issuer and sign the response (CPU only, no I/O)."""
        issuer = self.registry.issuer_of(cert)
        if issuer is None:
            raise CertificateRejected(
                f"issuer {cert.issuer.rfc4514_string()!r} is not configured here "
                "(or did not sign this certificate): add it to `issuers` first",
                status=422,
            )
        precert = is_precertificate(cert)
        serial = cert.serial_number
        signed = sign_response(issuer, serial, CertStatus.GOOD, self.policy)
        record = CertificateRecord(
            issuer_id=issuer.db_id,
            serial=serial,
            not_after=cert.not_valid_after_utc,
            precertificate=precert,
        )
        return record, signed, issuer.name

    async def record(self, certs: Sequence[x509.Certificate]) -> list[RecordOutcome]:
        """Record all ``certs`` in one transaction; returns after the commit."""
        prepared = [self.prepare(cert) for cert in certs]
        try:
            created = await self.store.record_certificates([(r, s) for r, s, _ in prepared])
        except Exception:
            for record, _, issuer in prepared:
                log.error(
                    "recording FAILED (not acknowledged): issuer=%s serial=%s",
                    issuer,
                    format_serial(record.serial),
                )
            raise
        return [
            RecordOutcome(
                serial=record.serial,
                issuer=issuer,
                precertificate=record.precertificate,
                created=new,
                this_update=signed.this_update,
                next_update=signed.next_update,
            )
            for (record, signed, issuer), new in zip(prepared, created, strict=True)
        ]
