"""Verification of signed tree heads: Static CT checkpoints and RFC 6962 STHs.

A tree head is only ever returned after its signature verified with the
configured log key; callers never see an unverified size or root.

* RFC 6962 ``get-sth``: ``digitally-signed`` TreeHeadSignature
  (version v1, signature_type tree_hash, timestamp, tree_size, root) with
  ECDSA P-256/SHA-256 or RSA PKCS#1 v1.5/SHA-256.
* Static CT checkpoint (c2sp.org/signed-note + tlog-checkpoint): the
  RFC6962NoteSignature type 0x05 (uint64 timestamp || TreeHeadSignature) whose
  key ID is SHA-256(name || 0x0A || 0x05 || LogID)[:4]; and plain Ed25519 note
  signatures (type 0x01, key ID over the raw key) for non-CT tlogs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from .errors import MalformedResponseError, SignatureError

HASH_SHA256 = 4
SIG_RSA = 1
SIG_ECDSA = 3
NOTE_SIG_ED25519 = 0x01
NOTE_SIG_RFC6962 = 0x05
MAX_NOTE_SIZE = 1 << 16
#: tree sizes and timestamps are uint64 on the wire; we keep them below 2^63 (signed
#: bigint columns). 19 digits hold 2^63 - 1: a longer size line is refused before int().
MAX_TREE_SIZE = (1 << 63) - 1
MAX_SIZE_DIGITS = len(str(MAX_TREE_SIZE))


@dataclass(frozen=True, slots=True)
class TreeHead:
    """A signature-verified tree head."""

    tree_size: int
    root_hash: bytes
    timestamp_ms: int | None  # None for Ed25519 note signatures (they carry none)


class LogKey:
    """A log's public key; ``log_id`` is SHA-256 of its DER SubjectPublicKeyInfo."""

    def __init__(self, key: str | bytes) -> None:
        """Accept PEM (str or bytes), base64 DER SPKI (str), or DER SPKI (bytes)."""
        raw = key.encode() if isinstance(key, str) else key
        try:
            if b"-----BEGIN" in raw:
                pub = serialization.load_pem_public_key(raw)
            else:
                if isinstance(key, str):
                    raw = base64.b64decode("".join(key.split()), validate=True)
                pub = serialization.load_der_public_key(raw)
        except (ValueError, binascii.Error) as exc:
            raise ValueError(f"log public key is neither PEM nor DER SPKI: {exc}") from exc
        if not isinstance(
            pub, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey)
        ):
            raise ValueError("log key must be ECDSA, RSA or Ed25519")
        self.public_key = pub
        self.spki_der = pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.log_id = hashlib.sha256(self.spki_der).digest()

    def verify_digitally_signed(self, ds: bytes, message: bytes) -> None:
        """Verify an RFC 5246 ``digitally-signed`` struct (hash, sig alg, opaque<0..2^16-1>)."""
        if len(ds) < 4:
            raise SignatureError("digitally-signed struct too short")
        halg, salg, n = ds[0], ds[1], int.from_bytes(ds[2:4], "big")
        sig = ds[4:]
        if len(sig) != n:
            raise SignatureError("digitally-signed length mismatch")
        if halg != HASH_SHA256:
            raise SignatureError(f"unsupported hash algorithm {halg}")
        pub = self.public_key
        try:
            if salg == SIG_ECDSA and isinstance(pub, ec.EllipticCurvePublicKey):
                pub.verify(sig, message, ec.ECDSA(hashes.SHA256()))
            elif salg == SIG_RSA and isinstance(pub, rsa.RSAPublicKey):
                pub.verify(sig, message, padding.PKCS1v15(), hashes.SHA256())
            else:
                raise SignatureError(f"signature algorithm {salg} does not match the log key")
        except InvalidSignature as exc:
            raise SignatureError("tree head signature does not verify") from exc


def tree_head_signature_input(timestamp_ms: int, tree_size: int, root_hash: bytes) -> bytes:
    """The RFC 6962 TreeHeadSignature input: v1, tree_hash, timestamp, size, root."""
    return struct.pack(">BBQQ", 0, 1, timestamp_ms, tree_size) + root_hash


def _check_root(root: bytes) -> bytes:
    if len(root) != 32:
        raise MalformedResponseError("root hash must be 32 bytes")
    return root


def verify_sth(sth: bytes | Mapping[str, object], key: LogKey) -> TreeHead:
    """Verify an RFC 6962 ``get-sth`` response (JSON bytes or decoded mapping)."""
    try:
        obj = json.loads(sth) if isinstance(sth, bytes) else sth
        size, ts = obj["tree_size"], obj["timestamp"]
        root = base64.b64decode(str(obj["sha256_root_hash"]), validate=True)
        ds = base64.b64decode(str(obj["tree_head_signature"]), validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise MalformedResponseError(f"bad get-sth response: {exc!r}") from exc
    if isinstance(size, bool) or isinstance(ts, bool):
        raise MalformedResponseError("tree_size/timestamp must be integers, not booleans")
    if not isinstance(size, int) or not isinstance(ts, int):
        raise MalformedResponseError("tree_size/timestamp must be integers")
    if not (0 <= size <= MAX_TREE_SIZE and 0 <= ts <= MAX_TREE_SIZE):
        raise MalformedResponseError("tree_size/timestamp out of range")
    _check_root(root)
    key.verify_digitally_signed(ds, tree_head_signature_input(ts, size, root))
    return TreeHead(size, root, ts)


def note_key_id(name: str, sig_type: int, key_material: bytes) -> bytes:
    """Signed-note key ID: SHA-256(name || 0x0A || type || key material)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + key_material).digest()[:4]


def _parse_body(body: str) -> tuple[str, int, bytes, list[str]]:
    lines = body.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise MalformedResponseError("checkpoint body needs origin, size, root lines")
    origin, size_s, root_s, *ext = lines[:-1]
    # Bounded before int() and struct packing: the note is not yet authenticated, so a
    # 20-digit or 5,000-digit size must be a MalformedResponseError, never a crash.
    if (
        not 0 < len(size_s) <= MAX_SIZE_DIGITS
        or not size_s.isascii()
        or not size_s.isdigit()
        or (size_s != "0" and size_s[0] == "0")
        or int(size_s) > MAX_TREE_SIZE
    ):
        raise MalformedResponseError("bad checkpoint tree size")
    try:
        root = base64.b64decode(root_s, validate=True)
    except binascii.Error as exc:
        raise MalformedResponseError("bad checkpoint root hash") from exc
    if not origin or any(not e for e in ext):
        raise MalformedResponseError("empty checkpoint line")
    return origin, int(size_s), _check_root(root), ext


def verify_checkpoint(note: bytes, key: LogKey, origin: str) -> TreeHead:
    """Verify a Static CT / tlog checkpoint signed by ``key`` under name ``origin``.

    Signature lines from unknown names or key IDs (witness cosignatures) are
    ignored, as signed-note requires; at least one must be the log's, valid.
    """
    if len(note) > MAX_NOTE_SIZE:
        raise MalformedResponseError("checkpoint too large")
    try:
        text = note.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedResponseError("checkpoint is not UTF-8") from exc
    body, sep, sigs = text.partition("\n\n")
    if not sep or not sigs.endswith("\n"):
        raise MalformedResponseError("checkpoint lacks a signature block")
    body += "\n"
    cp_origin, size, root, ext = _parse_body(body)
    if cp_origin != origin:
        raise SignatureError(f"checkpoint origin {cp_origin!r} is not {origin!r}")
    pub = key.public_key
    if isinstance(pub, ed25519.Ed25519PublicKey):
        sig_type = NOTE_SIG_ED25519
        material = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        sig_type = NOTE_SIG_RFC6962
        material = key.log_id
    want_id = note_key_id(origin, sig_type, material)
    for line in sigs[:-1].split("\n"):
        if not line.startswith("\u2014 "):
            raise MalformedResponseError("bad signature line")
        name, _, b64 = line[2:].rpartition(" ")
        if name != origin:
            continue
        try:
            blob = base64.b64decode(b64, validate=True)
        except binascii.Error as exc:
            raise MalformedResponseError("bad signature base64") from exc
        if blob[:4] != want_id:
            continue
        sig = blob[4:]
        if sig_type == NOTE_SIG_ED25519:
            assert isinstance(pub, ed25519.Ed25519PublicKey)
            try:
                pub.verify(sig, body.encode())
            except InvalidSignature as exc:
                raise SignatureError("checkpoint Ed25519 signature does not verify") from exc
            return TreeHead(size, root, None)
        if ext:
            raise MalformedResponseError("RFC6962NoteSignature checkpoints have no extensions")
        if len(sig) < 8:
            raise SignatureError("RFC6962NoteSignature too short")
        ts = int.from_bytes(sig[:8], "big")
        key.verify_digitally_signed(sig[8:], tree_head_signature_input(ts, size, root))
        return TreeHead(size, root, ts)
    raise SignatureError("no signature by the log's key on the checkpoint")
