"""Warn before an issuer's responses can no longer be signed.

An issuer signs until the last of its responder certificates expires (or its own
certificate, if that comes first: ``signer.response_builder.response_window`` never
lets nextUpdate pass either). Long before that, responses get shorter: nextUpdate is
capped at that moment, so from ``response_validity`` before it every new response is
capped, and within 8 h (+ backdate) of it nothing can be signed at all (BR 4.9.9 minimum),
recordings get 503 and stored responses run out. The rollover procedure
(docs/deploy.md) wants the next certificate configured ``response_validity`` + a few
days ahead; this module makes sure the operator hears about it in time:

- ``ocsp_signer_expiry_timestamp_seconds{issuer}``: that moment, for alerts
  (``ocsp_signer_expiry_timestamp_seconds - time() < 14 * 86400``);
- a WARNING line from ``response_validity + WARN_LEAD`` before it, an ERROR line once the
  issuer can no longer sign an 8-hour response; at start and then at most once an hour.
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


def signing_ends(issuer: Issuer) -> dt.datetime | None:
    """When the issuer's last signing certificate expires (None: no responder at all)."""
    if not issuer.responders:
        return None
    latest = max(r.not_after for r in issuer.responders)
    return min(latest, issuer.certificate.not_valid_after_utc)


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
            ends = signing_ends(issuer)
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
        when = f"{ends:%Y-%m-%d %H:%M}Z"
        if left < MIN_VALIDITY + self.policy.backdate:
            log.error(
                "issuer %s cannot sign: its last responder certificate (or the issuer "
                "certificate) expires %s, too soon for an 8-hour response (BR 4.9.9); stored "
                "responses are served until their nextUpdate, then tryLater: configure a new "
                "responder certificate (docs/deploy.md, Responder key rollover)",
                issuer.name,
                when,
            )
            return
        capped = "are" if left < self.policy.validity + self.policy.backdate else "will be"
        log.warning(
            "issuer %s: its last responder certificate (or the issuer certificate) expires "
            "%s (in %.1f days): new responses %s capped at it, and nothing can be signed "
            "from 8 hours + this_update_backdate before it; configure the next responder "
            "certificate beside it (docs/deploy.md, Responder key rollover)",
            issuer.name,
            when,
            left.total_seconds() / 86400,
            capped,
        )
