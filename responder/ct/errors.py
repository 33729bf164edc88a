"""Exception hierarchy of the CT layer.

Every failure mode has its own type so the follower's caller can tell a log
that misbehaves (verification errors: alert, do not advance) from a log that is
merely unavailable (fetch errors: retry later) from a malformed entry (parse
errors: reported per entry, never indexed silently).
"""

from __future__ import annotations

# The shared DER walker's error (a ValueError), re-exported for the CT layer's callers.
from signer.der import DERError as DERError


class CTError(Exception):
    """Base class of every error raised by ``responder.ct``."""


# --- parsing -----------------------------------------------------------------


class CTParseError(CTError, ValueError):
    """Bytes from a log do not follow the expected encoding."""


class MalformedEntryError(CTParseError):
    """One log entry cannot be parsed; the entries around it may still be fine."""


class MalformedTileError(CTParseError):
    """A data tile's framing is broken, so no entry after the fault can be located."""


class MalformedResponseError(CTParseError):
    """An RFC 6962 JSON response or a checkpoint note has the wrong shape."""


# --- verification ------------------------------------------------------------


class VerificationError(CTError):
    """The log served data that does not verify: never index it."""


class SignatureError(VerificationError):
    """A checkpoint or STH signature is missing or does not verify."""


class RootMismatchError(VerificationError):
    """Fetched leaves do not hash to the signed root of the tree head."""


class LeafHashMismatchError(RootMismatchError):
    """A specific entry does not hash to the leaf hash the log published for it."""

    def __init__(self, leaf_index: int, message: str | None = None) -> None:
        super().__init__(message or f"entry {leaf_index} does not match its leaf hash")
        self.leaf_index = leaf_index


class InclusionProofError(VerificationError):
    """An inclusion proof does not lead to the signed root, or contradicts our frontier."""


class LeafIndexMismatchError(VerificationError):
    """An entry's ``leaf_index`` extension disagrees with its position in the log."""


class LogRollbackError(VerificationError):
    """The log's signed tree is smaller than what we already verified."""


class ResumeStateError(CTError, ValueError):
    """A stored resume state is corrupt or belongs to another log."""


class StartIndexError(CTError):
    """The configured ``start_index`` is beyond the log's signed tree size (a typo, or
    the wrong log): nothing is skipped, the poll is retried from the stored position."""


# --- fetching ----------------------------------------------------------------


class FetchError(CTError):
    """A log endpoint could not be fetched (after retries where they apply)."""


class NotFoundError(FetchError):
    """The log answered 404 (e.g. a partial tile replaced by its full tile)."""


class RetriesExhaustedError(FetchError):
    """429/5xx/transport errors persisted through every retry attempt."""


class ResponseTooLargeError(FetchError):
    """A response exceeded the configured memory bound."""


class ShortResponseError(FetchError):
    """The log returned no progress (an empty get-entries page, a short tile)."""
