"""OCSP responses signed by a key cryptography cannot hold (a PKCS#11 token).

cryptography's ``OCSPResponseBuilder.sign`` needs an in-memory private key matching the
responder certificate. For a token key we let it build and sign the response with a
throwaway stand-in key and certificate of the same family (so the ResponseData layout,
the signatureAlgorithm and the included certificates are exactly what the PEM path
produces), then:

1. put the real responder's key hash into ``responderID byKey`` (SHA-1: always 20 bytes,
   so no length inside tbsResponseData changes),
2. sign those ``tbsResponseData`` bytes with the token,
3. re-encode BasicOCSPResponse and OCSPResponse around them with the new signature.
"""

from __future__ import annotations

import datetime as dt
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from signer.der import TLV, DERError, element_children, read_element
from signer.pkcs11_key import Pkcs11Key

StandInKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_stand_ins: dict[str, tuple[StandInKey, x509.Certificate]] = {}
_stand_ins_lock = threading.Lock()


def _stand_in(kind: str) -> tuple[StandInKey, x509.Certificate]:
    """A process-wide throwaway key and self-signed certificate: they only give the builder
    something to sign with; neither ever appears in a response we send."""
    with _stand_ins_lock:
        if kind not in _stand_ins:
            key: StandInKey = (
                ec.generate_private_key(ec.SECP256R1())
                if kind == "ec"
                else rsa.generate_private_key(public_exponent=65537, key_size=2048)
            )
            name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "stand-in")])
            now = dt.datetime.now(dt.UTC)
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(1)
                .not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=3650))
                .sign(key, hashes.SHA256())
            )
            _stand_ins[kind] = (key, cert)
        return _stand_ins[kind]


def encode_length(length: int) -> bytes:
    """DER definite length, minimal form."""
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def encode_tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + encode_length(len(value)) + value


def _one(data: bytes, tlv: TLV, tag: int, what: str) -> list[TLV]:
    if tlv.tag != tag:
        raise DERError(f"{what}: unexpected tag {tlv.tag:#x}")
    return element_children(data, tlv)


def replace_responder_key_hash(tbs: bytes, key_hash: bytes) -> bytes:
    """tbsResponseData with its ``responderID byKey`` hash replaced (same length)."""
    outer = read_element(tbs)
    fields = _one(tbs, outer, 0x30, "ResponseData")
    if fields and fields[0].tag == 0xA0:  # [0] EXPLICIT version
        fields = fields[1:]
    if not fields or fields[0].tag != 0xA2:
        raise DERError("ResponseData.responderID is not byKey")
    (octets,) = element_children(tbs, fields[0])
    if octets.tag != 0x04 or octets.end - octets.value_start != len(key_hash):
        raise DERError("responderID byKey is not a 20-byte OCTET STRING")
    return tbs[: octets.value_start] + key_hash + tbs[octets.end :]


def replace_signature(response_der: bytes, tbs_der: bytes, signature: bytes) -> bytes:
    """The same OCSPResponse with tbsResponseData and its signature BIT STRING replaced."""
    outer = read_element(response_der)
    if outer.end != len(response_der):
        raise DERError("trailing bytes after OCSPResponse")
    status, response_bytes = _one(response_der, outer, 0x30, "OCSPResponse")
    (rb_seq,) = _one(response_der, response_bytes, 0xA0, "responseBytes")
    rtype, octets = _one(response_der, rb_seq, 0x30, "ResponseBytes")
    if octets.tag != 0x04:
        raise DERError("ResponseBytes.response is not an OCTET STRING")
    basic_der = response_der[octets.value_start : octets.end]
    basic = read_element(basic_der)
    parts = _one(basic_der, basic, 0x30, "BasicOCSPResponse")
    if len(parts) < 3 or parts[2].tag != 0x03:
        raise DERError("BasicOCSPResponse lacks its signature BIT STRING")
    tbs, alg, _old, *certs = parts
    if tbs.end - tbs.start != len(tbs_der):
        raise DERError("the replacement tbsResponseData changed length")
    new_basic = encode_tlv(
        0x30,
        tbs_der
        + basic_der[alg.start : alg.end]
        + encode_tlv(0x03, b"\x00" + signature)
        + b"".join(basic_der[c.start : c.end] for c in certs),
    )
    new_rb = encode_tlv(0x30, response_der[rtype.start : rtype.end] + encode_tlv(0x04, new_basic))
    return encode_tlv(0x30, response_der[status.start : status.end] + encode_tlv(0xA0, new_rb))


def sign_with_token(
    builder: ocsp.OCSPResponseBuilder,
    key: Pkcs11Key,
    responder_certificate: x509.Certificate,
    algorithm: hashes.HashAlgorithm,
) -> bytes:
    """Build with a stand-in, then make it the responder's: its key hash, the token's
    signature. ``builder`` has everything but the responder id."""
    stand_in_key, stand_in_cert = _stand_in(key.kind)
    draft = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, stand_in_cert).sign(
        stand_in_key, algorithm
    )
    key_hash = x509.SubjectKeyIdentifier.from_public_key(responder_certificate.public_key()).digest
    tbs = replace_responder_key_hash(draft.tbs_response_bytes, key_hash)
    signature = key.sign(tbs, algorithm)
    return replace_signature(draft.public_bytes(Encoding.DER), tbs, signature)
