"""A throwaway test PKI: our CA, a precertificate signing CA, another CA, an impostor."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

CT_POISON = ObjectIdentifier("1.3.6.1.4.1.11129.2.4.3")
CT_PRECERT_SIGNING = ObjectIdentifier("1.3.6.1.4.1.11129.2.4.4")
NOW = dt.datetime(2025, 7, 1, tzinfo=dt.UTC)
DER = serialization.Encoding.DER


def name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "XX"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


@dataclass
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(DER)

    @property
    def key_hash(self) -> bytes:
        spki = self.cert.public_key().public_bytes(
            DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(spki).digest()


def _builder(
    subject: x509.Name, issuer: x509.Name, pub: ec.EllipticCurvePublicKey, serial: int
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(pub)
        .serial_number(serial)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=90))
    )


def make_ca(
    cn: str,
    parent: CA | None = None,
    *,
    precert_signing: bool = False,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> CA:
    key = key or ec.generate_private_key(ec.SECP256R1())
    issuer_name = parent.cert.subject if parent else name(cn)
    signer = parent.key if parent else key
    b = _builder(name(cn), issuer_name, key.public_key(), x509.random_serial_number())
    b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    if precert_signing:
        b = b.add_extension(x509.ExtendedKeyUsage([CT_PRECERT_SIGNING]), critical=False)
    return CA(b.sign(signer, hashes.SHA256()), key)


def leaf(
    issuer: CA,
    serial: int,
    cn: str = "leaf.test",
    *,
    precert: bool = False,
    issuer_name: x509.Name | None = None,
    aki_from: CA | None = None,
) -> x509.Certificate:
    """An end-entity certificate (or precertificate, with the poison extension)."""
    key = ec.generate_private_key(ec.SECP256R1())
    b = _builder(name(cn), issuer_name or issuer.cert.subject, key.public_key(), serial)
    b = b.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key((aki_from or issuer).key.public_key()),
        critical=False,
    )
    b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if precert:
        b = b.add_extension(x509.PrecertPoison(), critical=True)
    return b.sign(issuer.key, hashes.SHA256())


@dataclass
class Pki:
    root: CA
    ca: CA  # our issuing CA
    ca_cross: CA  # cross-signed copy of `ca` (same key and Name, other issuer)
    precert_ca: CA  # precertificate signing CA under `ca`
    other: CA  # someone else's CA
    impostor: CA  # same Name as `ca`, different key


def make_pki() -> Pki:
    root = make_ca("Test Root")
    root2 = make_ca("Test Other Root")
    ca = make_ca("Test Issuing CA 1", root)
    cross = make_ca("Test Issuing CA 1", root2, key=ca.key)
    return Pki(
        root=root,
        ca=ca,
        ca_cross=cross,
        precert_ca=make_ca("Test Issuing CA 1 Precert Signing", ca, precert_signing=True),
        other=make_ca("Other CA", root),
        impostor=make_ca("Test Issuing CA 1", make_ca("Impostor Root")),
    )
