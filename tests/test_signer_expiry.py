"""The signer expiry watch says what ``response_window`` will really do.

Checked against the signing code itself, at chosen moments before a responder
certificate's end (``SignerExpiryWatch.check(now)``), with real certificates and keys:

- "cannot sign" only once a signature is really refused (a revocation made now: 8 h
  before the end; other responses 8 h - this_update_backdate), never while both still sign
  (it said so from 8 h + this_update_backdate on);
- "are capped" only when ``response_window`` really caps nextUpdate;
- a next responder certificate that starts too late (less than 8 h before the current one
  ends) does not hide the gap: the gauge and the warning name the current one's end.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography import x509

from responder import metrics
from responder.config import load_config
from responder.signer_expiry import SignerExpiryWatch
from signer.demo_ca import make_responder_certificate
from signer.issuers import Issuer, IssuerRegistry, ResponderIdentity
from signer.response_builder import Revocation, SigningError, ValidityPolicy, response_window
from tests.stored_rows import issuer_with_responder
from tests.support import IssuerFiles, write_config

POLICY = ValidityPolicy()  # 4 days, renewed 2 days ahead, thisUpdate backdated 1 h


def loaded(files: IssuerFiles, base: Path) -> Issuer:
    config = write_config(base, "postgresql://unused/none", [files]).config_path
    issuer = load_config(config).load_issuers().by_name(files.name)
    assert issuer is not None
    return issuer


@pytest.fixture(scope="module")
def ending(workdir: Path) -> tuple[IssuerFiles, Issuer]:
    files = issuer_with_responder(
        "expiring", workdir, valid_from=dt.timedelta(days=60), valid_for=dt.timedelta(days=65)
    )
    return files, loaded(files, workdir / "expiring")


def watch_at(issuer: Issuer, now: dt.datetime, caplog: pytest.LogCaptureFixture) -> str:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="responder.signer_expiry"):
        SignerExpiryWatch(IssuerRegistry([issuer]), POLICY).check(now)
    return "\n".join(f"{r.levelname} {r.getMessage()}" for r in caplog.records)


def signs(issuer: Issuer, now: dt.datetime, *, revocation: bool = False) -> bool:
    """Whether the signing code itself makes a response at ``now``."""
    revoked = Revocation(now, x509.ReasonFlags.key_compromise) if revocation else None
    try:
        response_window(issuer, POLICY, now, revoked)
    except SigningError:
        return False
    return True


@pytest.mark.parametrize("hours_left", [9.5, 8.5, 7.5, 6.5])
def test_cannot_sign_only_when_signing_is_refused(
    ending: tuple[IssuerFiles, Issuer], hours_left: float, caplog: pytest.LogCaptureFixture
) -> None:
    _, issuer = ending
    end = issuer.responders[0].not_after
    now = end - dt.timedelta(hours=hours_left)
    text = watch_at(issuer, now, caplog)
    assert text  # within response_validity + 7 days: always a line
    revocations = signs(issuer, now, revocation=True)
    good = signs(issuer, now)
    # the ground truth of each moment: 8.5 h left still signs everything
    assert (revocations, good) == {
        9.5: (True, True),
        8.5: (True, True),
        7.5: (False, True),
        6.5: (False, False),
    }[hours_left]
    assert ("cannot sign" in text) == (not revocations), text
    assert text.startswith("ERROR") == (not revocations), text


@pytest.mark.parametrize(
    "left", [dt.timedelta(days=4, minutes=30), dt.timedelta(days=3, hours=22), dt.timedelta(days=6)]
)
def test_are_capped_only_when_next_update_is_capped(
    ending: tuple[IssuerFiles, Issuer], left: dt.timedelta, caplog: pytest.LogCaptureFixture
) -> None:
    _, issuer = ending
    now = issuer.responders[0].not_after - left
    _, this_update, next_update = response_window(issuer, POLICY, now)
    capped = next_update - this_update < POLICY.validity
    text = watch_at(issuer, now, caplog)
    assert ("are capped" in text) == capped, text
    assert ("will be capped" in text) == (not capped), text


def with_next_responder(
    files: IssuerFiles, issuer: Issuer, starts_before_end: dt.timedelta
) -> Issuer:
    """The issuer with a second responder certificate configured beside the first, valid
    from ``starts_before_end`` before the first one ends, for a year."""
    current = issuer.responders[0]
    cert = make_responder_certificate(
        files.ca.ca_cert,
        files.ca.ca_key,
        files.ca.responder_key,
        name="next",
        not_before=current.not_after - starts_before_end,
        lifetime=dt.timedelta(days=365),
    )
    following = ResponderIdentity(
        certificate=cert,
        key=current.key,
        delegated=True,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )
    return Issuer(
        name=issuer.name,
        certificate=issuer.certificate,
        subject_der=issuer.subject_der,
        spki_der=issuer.spki_der,
        key_bits=issuer.key_bits,
        spki_sha256=issuer.spki_sha256,
        responders=[current, following],
    )


def test_a_gap_before_the_next_responder_is_announced(
    ending: tuple[IssuerFiles, Issuer], caplog: pytest.LogCaptureFixture
) -> None:
    files, issuer = ending
    end = issuer.responders[0].not_after
    now = end - dt.timedelta(days=5)
    gap = with_next_responder(files, issuer, dt.timedelta(hours=2))
    # the signing code: from 8 h before the end until the next one starts, nothing
    assert not signs(gap, end - dt.timedelta(hours=7), revocation=True)
    assert not signs(gap, end - dt.timedelta(hours=6))
    text = watch_at(gap, now, caplog)
    gauge = metrics.signer_expiry_timestamp.labels(issuer.name)._value.get()
    assert gauge == end.timestamp()  # was the next one's notAfter, a year away
    assert "WARNING" in text and "starts only" in text, text
    # a next one that starts a day before: the chain goes on, nothing to say
    chained = with_next_responder(files, issuer, dt.timedelta(days=1))
    assert signs(chained, end - dt.timedelta(hours=7), revocation=True)
    assert watch_at(chained, now, caplog) == ""
    gauge = metrics.signer_expiry_timestamp.labels(issuer.name)._value.get()
    assert gauge == chained.responders[1].not_after.timestamp()
