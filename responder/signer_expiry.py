"""Warn before an issuer's responses can no longer be signed.

An issuer signs until the last responder certificate of an unbroken chain from now
expires (or its own certificate, if that comes first: ``signer.response_builder.
response_window`` never lets nextUpdate pass either). A next certificate that starts less
than 8 h before the one before it ends does not continue the chain: in between nothing can
be signed (too short for BR 4.9.9's 8 hours, the next one not valid yet), so the moment
announced is that gap, not the end of the later certificate. Long before it, responses get
shorter: nextUpdate is capped at that moment, so from ``response_validity`` -
``this_update_backdate`` before it every new response is capped; from 8 h before it a
revocation can no longer be signed (its thisUpdate is the revocation time, not backdated)
and from 8 h - ``this_update_backdate`` nothing at all (BR 4.9.9 minimum): recordings get
503 and stored responses run out. The rollover procedure (docs/deploy.md) wants the next
certificate configured ``response_validity`` + a few days ahead; this module makes sure
the operator hears about it in time:

- ``ocsp_signer_expiry_timestamp_seconds{issuer}``: that moment, for alerts
  (``ocsp_signer_expiry_timestamp_seconds - time() < 14 * 86400``);
- a WARNING line from ``response_validity + WARN_LEAD`` before it, an ERROR line once a
  revocation can no longer be signed; at start and then at most once an hour.
"""

from __future__ import annotations

import datetime as dt
import logging

from responder import metrics
from signer.issuers import Issuer, IssuerConfigError, IssuerRegistry
from signer.response_builder import MIN_VALIDITY, ValidityPolicy

log = logging.getLogger(__name__)

#: warn this long before responses start being capped (on top of response_validity)
WARN_LEAD = dt.timedelta(days=7)
#: one line per issuer at most this often while the condition lasts
LOG_EVERY = dt.timedelta(hours=1)


def signing_ends(issuer: Issuer, now: dt.datetime | None = None) -> dt.datetime | None:
    """When the issuer can no longer sign (None: no responder at all): the notAfter of
    the last responder certificate in an unbroken chain from ``now`` (each next one valid
    at least ``MIN_VALIDITY`` before the one before it ends), capped at the issuer
    certificate's. The latest notAfter alone hid a gap between two certificates (the next
    one configured with a later notBefore): nothing could be signed there, unannounced."""
    if not issuer.responders:
        return None
    at = now or dt.datetime.now(dt.UTC)
    current = [r.not_after for r in issuer.responders if r.not_before <= at < r.not_after]
    if current:
        ends = max(current)
        extended = True
        while extended:
            extended = False
            for r in issuer.responders:
                if r.not_after > ends and r.not_before <= ends - MIN_VALIDITY:
                    ends, extended = r.not_after, True
    else:  # none valid now (check() logs that): the latest notAfter, as configured
        ends = max(r.not_after for r in issuer.responders)
    return min(ends, issuer.certificate.not_valid_after_utc)


class SignerExpiryWatch:
    """Export each issuer's signing end and log (rate-limited) when it comes close."""

    def __init__(self, registry: IssuerRegistry, policy: ValidityPolicy) -> None:
        self.registry = registry
        self.policy = policy
        self._logged: dict[str, dt.datetime] = {}

    def check(self, now: dt.datetime | None = None) -> None:
        """Set the gauges; log issuers whose signing ends soon (once per LOG_EVERY)."""
        at = now or dt.datetime.now(dt.UTC)
        for issuer in self.registry.issuers:
            ends = signing_ends(issuer, at)
            if ends is None:
                continue
            metrics.signer_expiry_timestamp.labels(issuer.name).set(ends.timestamp())
            left = ends - at
            unusable: IssuerConfigError | None = None
            try:
                issuer.active_responder(at)
            except IssuerConfigError as exc:  # none valid yet (or any more)
                unusable = exc
            if unusable is None and left >= self.policy.validity + WARN_LEAD:
                self._logged.pop(issuer.name, None)
                continue
            last = self._logged.get(issuer.name)
            if last is not None and at - last < LOG_EVERY:
                continue
            self._logged[issuer.name] = at
            if unusable is not None:
                log.error("issuer %s cannot sign: %s", issuer.name, unusable)
            else:
                self._log(issuer, ends, left)

    def _log(self, issuer: Issuer, ends: dt.datetime, left: dt.timedelta) -> None:
        # response_window: thisUpdate is now - backdate (a revocation's: the revocation
        # time, up to now) and nextUpdate at most ``ends``; below 8 h it refuses
        when = f"{ends:%Y-%m-%d %H:%M}Z"
        if left < MIN_VALIDITY:
            log.error(
                "issuer %s cannot sign revocations: its last responder certificate (or the issuer "
                "certificate) expires %s, too soon for an 8-hour response (BR 4.9.9); other "
                "responses only until 8 hours - this_update_backdate before it, stored "
                "responses are served until their nextUpdate, then tryLater: configure a new "
                "responder certificate (docs/deploy.md, Responder key rollover)",
                issuer.name,
                when,
            )
            return
        capped = "are" if left < self.policy.validity - self.policy.backdate else "will be"
        log.warning(
            "issuer %s: its last responder certificate (or the issuer certificate) expires "
            "%s (in %.1f days): new responses %s capped at it, revocations cannot be signed "
            "from 8 hours before it, nothing from 8 hours - this_update_backdate; configure "
            "the next responder certificate beside it (docs/deploy.md, Responder key "
            "rollover)%s",
            issuer.name,
            when,
            left.total_seconds() / 86400,
            capped,
            _too_late(issuer, ends),
        )


def _too_late(issuer: Issuer, ends: dt.datetime) -> str:
    """What to say of a later responder certificate that does not continue the chain."""
    later = [r.not_before for r in issuer.responders if r.not_after > ends]
    if not later or ends >= issuer.certificate.not_valid_after_utc:
        return ""
    return (
        f"; the next one configured starts only {min(later):%Y-%m-%d %H:%M}Z, not 8 hours "
        "before: nothing can be signed in between"
    )
