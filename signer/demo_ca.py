"""A throwaway CA hierarchy (root -> issuing CA -> delegated OCSP responder, leaves).

For ``ocsp-responder demo`` and for tests: every key is generated on the spot, nothing
is shipped. The responder certificate follows BR 7.1.2.8 so that the loader's profile
check accepts it.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from signer.der import (
    OID_CT_POISON,
    OID_CT_SCT_LIST,
    element_children,
    encode_tlv,
    read_element,
)
from signer.keys import SigningKey, write_pem_key


def new_key(kind: str = "p256") -> SigningKey:
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "p521":
        return ec.generate_private_key(ec.SECP521R1())
    if kind == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key kind {kind!r}")


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "XX"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ocsp-responder demo"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _ski(key: SigningKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def _sign_hash(key: SigningKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    """BR 7.1.3.2.2: an ECDSA key signs with the hash of its size (P-521: SHA-512)."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 384:
        return hashes.SHA512()
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


@dataclass
class DemoCA:
    root_cert: x509.Certificate
    root_key: SigningKey
    ca_cert: x509.Certificate
    ca_key: SigningKey
    responder_cert: x509.Certificate
    responder_key: SigningKey

    def issue_leaf(
        self,
        common_name: str,
        *,
        precertificate: bool = False,
        serial: int | None = None,
        lifetime: dt.timedelta = dt.timedelta(days=90),
        issuer_cert: x509.Certificate | None = None,
        issuer_key: SigningKey | None = None,
        issued_at: dt.datetime | None = None,
    ) -> x509.Certificate:
        """A TLS server certificate (or precertificate, with the CT poison extension).

        ``issued_at`` (default: now) is the instant the validity counts from: a
        precertificate and its final certificate issued in two calls must share it, or a
        second boundary between the calls gives them different notAfters (and a CT
        follower rightly refuses such a precertificate as not the logged one)."""
        signer_cert = issuer_cert or self.ca_cert
        signer_key = issuer_key or self.ca_key
        now = (issued_at or dt.datetime.now(dt.UTC)).replace(microsecond=0)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(signer_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial if serial is not None else random_serial())
            # an already expired one (a negative lifetime, for tests) starts a day earlier
            .not_valid_before(
                min(now - dt.timedelta(minutes=5), now + lifetime - dt.timedelta(days=1))
            )
            .not_valid_after(now + lifetime)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
                critical=False,
            )
        )
        if precertificate:
            builder = builder.add_extension(x509.PrecertPoison(), critical=True)
        return builder.sign(signer_key, _sign_hash(signer_key))


def random_serial() -> int:
    """A 64+ bit random serial as BR 7.1 asks (here 127 bits, positive)."""
    return secrets.randbits(127) | (1 << 126)


def create_ca(kind: str = "p256", name: str = "Demo") -> DemoCA:
    """Root, issuing CA and delegated responder, valid for a year."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    root_key, ca_key, responder_key = new_key(kind), new_key(kind), new_key(kind)
    root = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{name} Root"))
        .issuer_name(_name(f"{name} Root"))
        .public_key(root_key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(_ski(root_key), critical=False)
        # BR 7.1.2.1.2 recommends a root's AKI; 7.1.2.1.3: keyIdentifier = its own SKI
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, _sign_hash(root_key))
    )
    ca = make_issuing_ca_certificate(root, root_key, ca_key, _name(f"{name} Issuing CA"))
    responder = make_responder_certificate(ca, ca_key, responder_key, name=name)
    return DemoCA(root, root_key, ca, ca_key, responder, responder_key)


def make_issuing_ca_certificate(
    root_cert: x509.Certificate,
    root_key: SigningKey,
    ca_key: SigningKey,
    subject: x509.Name,
) -> x509.Certificate:
    """An issuing CA certificate (pathlen 0, five years) for ``subject`` under the root."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(root_cert.subject)
        .public_key(ca_key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1825))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), True
        )
        .add_extension(_ski(ca_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, _sign_hash(root_key))
    )


def make_responder_certificate(
    ca_cert: x509.Certificate,
    ca_key: SigningKey,
    responder_key: SigningKey,
    *,
    name: str = "Demo",
    not_before: dt.datetime | None = None,
    lifetime: dt.timedelta = dt.timedelta(days=365),
) -> x509.Certificate:
    """A BR 7.1.2.8 delegated OCSP responder certificate."""
    start = not_before or dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=2)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(f"{name} OCSP Responder"))
        .issuer_name(ca_cert.subject)
        .public_key(responder_key.public_key())
        .serial_number(random_serial())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), False)
        .add_extension(x509.OCSPNoCheck(), critical=False)
        # BR 7.1.2.8.1: subjectKeyIdentifier SHOULD be present (pkilint warns without it)
        .add_extension(_ski(responder_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, _sign_hash(ca_key))
    )


def write_pem_cert(path: Path, *certs: x509.Certificate) -> None:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))


@dataclass(frozen=True)
class DemoFiles:
    root: Path
    ca: Path
    ca_key: Path
    responder: Path
    responder_key: Path


def write_ca(ca: DemoCA, directory: Path) -> DemoFiles:
    """Write the hierarchy's certificates (0644) and keys (0600) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    files = DemoFiles(
        root=directory / "root.pem",
        ca=directory / "issuing-ca.pem",
        ca_key=directory / "issuing-ca.key",
        responder=directory / "responder.pem",
        responder_key=directory / "responder.key",
    )
    write_pem_cert(files.root, ca.root_cert)
    write_pem_cert(files.ca, ca.ca_cert)
    write_pem_cert(files.responder, ca.responder_cert)
    write_pem_key(files.ca_key, ca.ca_key)
    write_pem_key(files.responder_key, ca.responder_key)
    return files


class LeafFactory:
    """Many distinct leaves fast (tests and benchmarks): one template TBSCertificate whose
    16-byte serial is replaced, then signed by the issuing CA (one ECDSA signature each,
    about ten times cheaper than building every certificate with cryptography)."""

    def __init__(self, ca: DemoCA, *, precertificate: bool = False) -> None:
        self.ca = ca
        template = ca.issue_leaf("leaf.example", precertificate=precertificate)
        tbs = template.tbs_certificate_bytes
        serial = template.serial_number.to_bytes(16, "big")
        at = tbs.index(b"\x02\x10" + serial)
        self._head, self._tail = tbs[: at + 2], tbs[at + 2 + 16 :]
        cert_der = template.public_bytes(serialization.Encoding.DER)
        outer = _der_read(cert_der, 0)
        inner = outer[1]
        tbs_end = _der_read(cert_der, inner)[2]
        sig_alg_end = _der_read(cert_der, tbs_end)[2]
        self._sig_alg = cert_der[tbs_end:sig_alg_end]
        self._hash = _sign_hash(ca.ca_key)

    def der(self, serial: int | None = None) -> bytes:
        """One DER certificate with ``serial`` (default: a fresh random 127-bit one)."""
        value = serial if serial is not None else random_serial()
        tbs = self._head + value.to_bytes(16, "big") + self._tail
        key = self.ca.ca_key
        assert isinstance(key, ec.EllipticCurvePrivateKey), "LeafFactory needs an EC CA"
        signature = key.sign(tbs, ec.ECDSA(self._hash))
        body = tbs + self._sig_alg + _der_tlv(0x03, b"\x00" + signature)
        return _der_tlv(0x30, body)

    def certificate(self, serial: int | None = None) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der(serial))


def _der_tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes((tag, n)) + value
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(body))) + body + value


def _der_read(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, value start, end) of the TLV at ``pos``."""
    first = data[pos + 1]
    if first < 0x80:
        return data[pos], pos + 2, pos + 2 + first
    count = first & 0x7F
    length = int.from_bytes(data[pos + 2 : pos + 2 + count], "big")
    return data[pos], pos + 2 + count, pos + 2 + count + length


def sct_list_extension_value(count: int = 1) -> bytes:
    """The extnValue content of an embedded SCT list (RFC 6962 3.3): an OCTET STRING
    holding a TLS SignedCertificateTimestampList of ``count`` v1 SCTs. The SCTs are well
    formed but signed by no log (tests only need the final certificate's shape)."""
    scts = b""
    for _ in range(count):
        signature = secrets.token_bytes(70)
        sct = (
            b"\x00"  # v1
            + secrets.token_bytes(32)  # log id
            + int(dt.datetime.now(dt.UTC).timestamp() * 1000).to_bytes(8, "big")
            + b"\x00\x00"  # no extensions
            + b"\x04\x03"  # sha256 / ecdsa
            + len(signature).to_bytes(2, "big")
            + signature
        )
        scts += len(sct).to_bytes(2, "big") + sct
    return encode_tlv(0x04, len(scts).to_bytes(2, "big") + scts)


def final_certificate(
    ca: DemoCA,
    precert: x509.Certificate,
    *,
    sct_list: bytes | None = None,
    sct_position: int | None = None,
) -> x509.Certificate:
    """The final certificate of ``precert`` as RFC 6962 3.1 makes it: the precertificate's
    exact TBSCertificate without the poison extension, plus an SCT list extension
    (``sct_list``: its extnValue content, default one SCT; b"" for none) inserted at
    ``sct_position`` among the remaining extensions (default: last), signed by the CA."""
    tbs = precert.tbs_certificate_bytes
    top = read_element(tbs)
    fields = element_children(tbs, top)
    exts_field = fields[-1]
    assert exts_field.tag == 0xA3, "the precertificate has no extensions"
    exts = element_children(tbs, element_children(tbs, exts_field)[0])
    kept = [
        tbs[e.start : e.end]
        for e in exts
        if tbs[e.value_start :].startswith(encode_tlv(0x06, OID_CT_POISON)) is False
    ]
    value = sct_list_extension_value() if sct_list is None else sct_list
    if value:
        sct = encode_tlv(0x30, encode_tlv(0x06, OID_CT_SCT_LIST) + encode_tlv(0x04, value))
        kept.insert(len(kept) if sct_position is None else sct_position, sct)
    head = tbs[top.value_start : exts_field.start]
    new_tbs = encode_tlv(
        0x30, head + (encode_tlv(0xA3, encode_tlv(0x30, b"".join(kept))) if kept else b"")
    )
    key = ca.ca_key
    assert isinstance(key, ec.EllipticCurvePrivateKey), "final_certificate needs an EC CA"
    der = precert.public_bytes(serialization.Encoding.DER)
    sig_alg = element_children(der, read_element(der))[1]
    signature = key.sign(new_tbs, ec.ECDSA(_sign_hash(key)))
    return x509.load_der_x509_certificate(
        encode_tlv(
            0x30, new_tbs + der[sig_alg.start : sig_alg.end] + encode_tlv(0x03, b"\x00" + signature)
        )
    )
