"""Checkpoint and STH signature verification: formats, keys, refusals."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from responder.ct.checkpoint import LogKey, note_key_id, verify_checkpoint, verify_sth
from responder.ct.errors import MalformedResponseError, SignatureError

from .fakelog import FakeLog


def test_fake_checkpoint_verifies_and_witness_lines_are_ignored() -> None:
    log = FakeLog()
    log.leaf_hashes = [hashlib.sha256(bytes([i])).digest() for i in range(5)]
    log.publish(5)
    key = LogKey(log.public_key_pem)
    assert key.log_id == log.log_id
    head = verify_checkpoint(log.checkpoint(), key, log.origin)
    assert head.tree_size == 5 and head.root_hash == log.mth(0, 5) and head.timestamp_ms
    b64_der = base64.b64encode(log.spki).decode()
    assert verify_checkpoint(log.checkpoint(), LogKey(b64_der), log.origin).tree_size == 5
    with pytest.raises(SignatureError):
        verify_checkpoint(log.checkpoint(), key, "other.example/log")
    with pytest.raises(SignatureError):
        verify_checkpoint(log.checkpoint(), LogKey(FakeLog().public_key_pem), log.origin)
    # Tampering with the size or root breaks the signature.
    text = log.checkpoint().decode().replace("\n5\n", "\n6\n", 1)
    with pytest.raises(SignatureError):
        verify_checkpoint(text.encode(), key, log.origin)
    log.faults.bad_signature = True
    with pytest.raises(SignatureError):
        verify_checkpoint(log.checkpoint(), key, log.origin)
    for bad in (b"", b"x\n5\nAAAA\n\n", b"origin\n05\n" + b"A" * 44 + b"\n\n\xe2\x80\x94 o x\n"):
        with pytest.raises((MalformedResponseError, SignatureError)):
            verify_checkpoint(bad, key, log.origin)


def test_sth_ecdsa_and_rsa() -> None:
    log = FakeLog()
    log.leaf_hashes = [hashlib.sha256(b"a").digest()] * 3
    log.publish(3)
    sth = log.sth()
    head = verify_sth(json.dumps(sth).encode(), LogKey(log.public_key_pem))
    assert (head.tree_size, head.root_hash) == (3, log.mth(0, 3))
    with pytest.raises(SignatureError):
        verify_sth({**sth, "tree_size": 4}, LogKey(log.public_key_pem))
    with pytest.raises(MalformedResponseError):
        verify_sth({**sth, "tree_size": "3"}, LogKey(log.public_key_pem))

    rkey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = log.mth(0, 3)
    msg = b"\x00\x01" + (123).to_bytes(8, "big") + (3).to_bytes(8, "big") + root
    sig = rkey.sign(msg, padding.PKCS1v15(), hashes.SHA256())
    ds = b"\x04\x01" + len(sig).to_bytes(2, "big") + sig
    rsth = {
        "tree_size": 3,
        "timestamp": 123,
        "sha256_root_hash": base64.b64encode(root).decode(),
        "tree_head_signature": base64.b64encode(ds).decode(),
    }
    pem = rkey.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert verify_sth(rsth, LogKey(pem)).timestamp_ms == 123
    with pytest.raises(SignatureError):  # an ECDSA-labelled signature with an RSA key
        verify_sth(
            {**rsth, "tree_head_signature": base64.b64encode(b"\x04\x03" + ds[2:]).decode()},
            LogKey(pem),
        )


def test_ed25519_note() -> None:
    k = ed25519.Ed25519PrivateKey.generate()
    raw = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    body = "example.com/log\n7\n" + base64.b64encode(b"\x11" * 32).decode() + "\n"
    sig = note_key_id("example.com/log", 0x01, raw) + k.sign(body.encode())
    note = (body + "\n\u2014 example.com/log " + base64.b64encode(sig).decode() + "\n").encode()
    pem = k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = verify_checkpoint(note, LogKey(pem), "example.com/log")
    assert head.tree_size == 7 and head.timestamp_ms is None
    with pytest.raises(SignatureError):
        verify_checkpoint(note.replace(b"\n7\n", b"\n8\n"), LogKey(pem), "example.com/log")


@pytest.mark.parametrize(
    "size", [str(2**64), str(2**63), "9" * 20, "9" * 5000, "\u0661\u0662", "+5", "5 ", "-1"]
)
def test_unsigned_absurd_checkpoint_size_is_malformed_not_a_crash(size: str) -> None:
    """The size line is parsed before the signature is checked: 2^64 used to raise
    struct.error and 5,000 digits ValueError (int's digit limit), neither a CTError."""
    log = FakeLog()
    log.publish(0)
    log.faults.head_size = size
    with pytest.raises(MalformedResponseError, match="tree size"):
        verify_checkpoint(log.checkpoint(), LogKey(log.public_key_pem), log.origin)
    log.faults.head_size = str(2**63 - 1)  # in range: reaches the signature, which fails
    with pytest.raises(SignatureError):
        verify_checkpoint(log.checkpoint(), LogKey(log.public_key_pem), log.origin)


@pytest.mark.parametrize("size", [True, 2**63, 2**64, -1, 1.0, "5", []])
def test_sth_tree_size_must_be_an_int_in_range(size: object) -> None:
    log = FakeLog()
    log.publish(0)
    log.faults.head_size = size
    with pytest.raises(MalformedResponseError):
        verify_sth(log.sth(), LogKey(log.public_key_pem))
    sth = log.sth()
    sth["tree_size"], sth["timestamp"] = 0, True
    with pytest.raises(MalformedResponseError):
        verify_sth(sth, LogKey(log.public_key_pem))
    huge = json.dumps({**sth, "timestamp": 0}).replace(
        '"tree_size": 0', '"tree_size": ' + "9" * 5000
    )
    with pytest.raises(MalformedResponseError):
        verify_sth(huge.encode(), LogKey(log.public_key_pem))
