"""Loading signing keys.

A responder key is the most sensitive thing this process holds, so loading is strict:
a key file readable by group or others is refused (an operator must fix the mode, we
never silently accept it), and every loaded key must match the certificate it signs for.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def ecdsa_hash_for_curve(key_size: int) -> hashes.HashAlgorithm:
    """BR 7.1.3.2.2: P-256 signs with SHA-256, P-384 with SHA-384, P-521 with SHA-512."""
    if key_size > 384:
        return hashes.SHA512()
    if key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


class KeyLoadError(Exception):
    """A signing key could not be loaded or is not acceptable; the message says why."""


def check_key_file_mode(path: Path) -> None:
    """Refuse key files that group or others can read: a leaked key signs forged answers."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyLoadError(
            f"{path}: key file mode is {stat.filemode(mode)}; it must not be readable by group "
            f"or others (run: chmod 600 {path})"
        )


def load_pem_key(path: Path, password: bytes | None = None) -> SigningKey:
    """Load a PEM private key from a file that only its owner can read."""
    try:
        check_key_file_mode(path)
        data = path.read_bytes()
    except OSError as exc:
        raise KeyLoadError(f"{path}: cannot read key file: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise KeyLoadError(f"{path}: not a usable PEM private key: {exc}") from exc
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise KeyLoadError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def write_pem_key(path: Path, key: SigningKey) -> None:
    """Write a private key readable by its owner only (used by the demo CA and tests)."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)
