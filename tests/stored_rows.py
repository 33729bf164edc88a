"""Writing stored responses as a past refresher (or a dead one) would have left them:
really signed, with thisUpdate/nextUpdate in the past, straight into the database."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from cryptography import x509

from responder.config import load_config
from responder.store import serial_key
from signer.demo_ca import create_ca, make_responder_certificate
from signer.issuers import Issuer
from signer.response_builder import (
    CertStatus,
    Revocation,
    SignedResponse,
    ValidityPolicy,
    sign_response,
)
from tests.support import IssuerFiles, issuer_files, sql_sync


def load_issuer(config_path: Path, name: str, dsn: str) -> Issuer:
    """The issuer exactly as `serve` loads it from its config, with its database id."""
    issuer = load_config(config_path).load_issuers().by_name(name)
    assert issuer is not None
    issuer.db_id = sql_sync(dsn, "SELECT id FROM issuers WHERE name = $1", name)[0]["id"]
    return issuer


def sign_at(
    issuer: Issuer,
    serial: int,
    moment: dt.datetime,
    *,
    policy: ValidityPolicy | None = None,
    revocation: Revocation | None = None,
) -> SignedResponse:
    """A response signed as if at ``moment`` (a real signature, old times)."""
    status = CertStatus.REVOKED if revocation else CertStatus.GOOD
    return sign_response(
        issuer, serial, status, policy or ValidityPolicy(), revocation=revocation, now=moment
    )


def put_row(dsn: str, issuer: Issuer, serial: int, signed: SignedResponse) -> None:
    """Overwrite the stored response (no guards: this is the test rewinding time)."""
    sql_sync(
        dsn,
        "INSERT INTO responses (issuer_id, serial, status, this_update, next_update, der, signer) "
        "VALUES ($1, $2, $3, to_timestamp($4), to_timestamp($5), $6, $7) "
        "ON CONFLICT (issuer_id, serial) DO UPDATE SET status = EXCLUDED.status, "
        "this_update = EXCLUDED.this_update, next_update = EXCLUDED.next_update, "
        "der = EXCLUDED.der, signer = EXCLUDED.signer",
        issuer.db_id,
        serial_key(serial),
        int(signed.status),
        signed.this_update,
        signed.next_update,
        signed.der,
        signed.signer,
    )


def put_certificate(dsn: str, issuer: Issuer, cert: x509.Certificate) -> None:
    """Record a certificate without signing (for an issuer whose responder refuses)."""
    sql_sync(
        dsn,
        "INSERT INTO certificates (issuer_id, serial, not_after, kinds) VALUES ($1, $2, $3, 2)",
        issuer.db_id,
        serial_key(cert.serial_number),
        cert.not_valid_after_utc,
    )


def stored(dsn: str, issuer: Issuer, serial: int) -> dict[str, object]:
    rows = sql_sync(
        dsn,
        "SELECT status, extract(epoch FROM this_update)::bigint AS this_update, "
        "extract(epoch FROM next_update)::bigint AS next_update, der, signer "
        "FROM responses WHERE issuer_id = $1 AND serial = $2",
        issuer.db_id,
        serial_key(serial),
    )
    assert len(rows) == 1
    return dict(rows[0])


def issuer_with_responder(
    name: str, base: Path, *, valid_from: dt.timedelta, valid_for: dt.timedelta
) -> IssuerFiles:
    """A fresh CA whose delegated responder certificate starts ``valid_from`` ago and
    lasts ``valid_for``: old enough to sign responses "in the past", or about to expire."""
    ca = create_ca("p256", name.capitalize())
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - valid_from
    cert = make_responder_certificate(
        ca.ca_cert, ca.ca_key, ca.responder_key, name=name, not_before=start, lifetime=valid_for
    )
    return issuer_files(name, dataclasses.replace(ca, responder_cert=cert), base)
