"""Certificate Transparency protocol layer of the CT-fed index.

Fetches, verifies, parses and filters CT log entries for our own issuers; no
database code lives here. Entry point: :class:`LogFollower` (see
``docs/ct-index.md``).
"""

from .checkpoint import LogKey, TreeHead, verify_checkpoint, verify_sth
from .client import RetryPolicy
from .errors import (
    CTError,
    CTParseError,
    FetchError,
    LeafHashMismatchError,
    LogRollbackError,
    MalformedEntryError,
    MalformedTileError,
    ResumeStateError,
    SignatureError,
    StartIndexError,
    VerificationError,
)
from .follower import Batch, LogConfig, LogFollower, ResumeState
from .leaf import IndexedEntry, Issuer, IssuerSet, MalformedEntry, SuspiciousEntry

__all__ = [
    "Batch",
    "CTError",
    "CTParseError",
    "FetchError",
    "IndexedEntry",
    "Issuer",
    "IssuerSet",
    "LeafHashMismatchError",
    "LogConfig",
    "LogFollower",
    "LogKey",
    "LogRollbackError",
    "MalformedEntry",
    "MalformedEntryError",
    "MalformedTileError",
    "ResumeState",
    "ResumeStateError",
    "RetryPolicy",
    "SignatureError",
    "StartIndexError",
    "SuspiciousEntry",
    "TreeHead",
    "VerificationError",
    "verify_checkpoint",
    "verify_sth",
]
