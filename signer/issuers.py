"""Issuers we answer for, and the identities that sign their responses.

An ``Issuer`` holds everything the hot path needs precomputed: the CertID hashes of the
issuer for every hash algorithm a client may use (so a SHA-256 CertID is matched as
cheaply as a SHA-1 one), and CT's identity for it (SHA-256 of the whole SPKI).
A ``ResponderIdentity`` is a certificate + key allowed to sign for an issuer: either the
issuer itself or a delegated responder whose certificate meets BR 7.1.2.8. Both are
checked when loaded, and a first signature is verified before the identity is used.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from signer.der import DERError, spki_key_bits, tbs_fields
from signer.keys import SigningKey, ecdsa_hash_for_curve
from signer.pkcs11_key import Pkcs11Key

#: A key in memory (PEM) or inside a PKCS#11 token.
AnySigningKey = SigningKey | Pkcs11Key

#: CertID hash algorithms we accept, by the name cryptography reports.
CERT_ID_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


class IssuerConfigError(Exception):
    """An issuer or responder certificate/key is unusable; the message says how."""


def signature_hash_for(key: AnySigningKey) -> hashes.HashAlgorithm | None:
    """The signature digest for a key: SHA-256, none for Ed25519, and for ECDSA the hash
    BR 7.1.3.2.2 pairs with the curve (P-384: SHA-384, P-521: SHA-512; anything else is
    a misissued response)."""
    if isinstance(key, Pkcs11Key):
        return key.signature_hash()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return ecdsa_hash_for_curve(key.curve.key_size)
    return hashes.SHA256()


def signature_function(key: AnySigningKey) -> Callable[[bytes], bytes]:
    """The call that makes the signature a response signed by ``key`` carries (the
    algorithm ``signature_hash_for`` names), resolved once: for code that assembles
    response DER itself and signs per request."""
    alg = signature_hash_for(key)
    if isinstance(key, Pkcs11Key):
        assert alg is not None
        return functools.partial(key.sign, algorithm=alg)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign
    assert alg is not None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return functools.partial(key.sign, signature_algorithm=ec.ECDSA(alg))
    return functools.partial(key.sign, padding=padding.PKCS1v15(), algorithm=alg)


def public_keys_match(key: SigningKey, cert: x509.Certificate) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return key.public_key().public_bytes(enc, fmt) == cert.public_key().public_bytes(enc, fmt)


@dataclass(frozen=True, slots=True)
class ResponderIdentity:
    """A certificate and key that sign OCSP responses for one issuer."""

    certificate: x509.Certificate
    key: AnySigningKey
    delegated: bool
    not_before: dt.datetime
    not_after: dt.datetime
    #: when the start-up signature of this key was verified (readiness reports it)
    verified_at: dt.datetime | None = None
    #: First 8 bytes of the certificate's SHA-256 as a signed 64-bit integer: stored
    #: with each response (``responses.signer``) so that the refresher can find, through
    #: an index, every response a no-longer-active responder signed (key rollover).
    #: Computed once here: every signature records it.
    fingerprint64: int = field(init=False)

    def __post_init__(self) -> None:
        digest = self.certificate.fingerprint(hashes.SHA256())
        object.__setattr__(self, "fingerprint64", int.from_bytes(digest[:8], "big", signed=True))

    @property
    def certificate_sha256(self) -> bytes:
        return self.certificate.fingerprint(hashes.SHA256())


@dataclass(eq=False, slots=True)
class Issuer:
    """One CA we answer for (matched by key, so cross-signed copies are the same issuer)."""

    name: str
    certificate: x509.Certificate
    subject_der: bytes
    spki_der: bytes
    key_bits: bytes
    spki_sha256: bytes
    responders: list[ResponderIdentity]
    #: (hash name, issuerNameHash, issuerKeyHash) for every accepted algorithm
    cert_id_hashes: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    #: row id in the ``issuers`` table, set once registered with the store
    db_id: int = -1

    @property
    def token_signed(self) -> bool:
        """A responder key of this issuer is inside a PKCS#11 token: each signature is a
        round trip to it (milliseconds on a network HSM), so callers in an event loop
        that also answers OCSP sign for it in a thread."""
        return any(isinstance(r.key, Pkcs11Key) for r in self.responders)

    def active_responder(self, now: dt.datetime | None = None) -> ResponderIdentity:
        """The newest identity that is valid now: a new responder certificate configured
        beside the old one takes over as soon as its notBefore has passed (key rollover)."""
        at = now or dt.datetime.now(dt.UTC)
        usable = [r for r in self.responders if r.not_before <= at < r.not_after]
        if not usable:
            configured = "; ".join(
                f"{r.certificate.subject.rfc4514_string()!r} valid "
                f"{r.not_before:%Y-%m-%d %H:%M}Z..{r.not_after:%Y-%m-%d %H:%M}Z"
                for r in self.responders
            )
            raise IssuerConfigError(
                f"issuer {self.name}: no responder certificate is valid now "
                f"({configured or 'none configured'}): configure a new one"
            )
        return max(usable, key=lambda r: r.not_before)


def issuer_from_certificate(name: str, cert: x509.Certificate) -> Issuer:
    """Precompute an issuer's CertID hashes (all algorithms) and CT key identity."""
    try:
        tbs = cert.tbs_certificate_bytes
        fields = tbs_fields(tbs)
        subject_der = tbs[fields.subject[0] : fields.subject[1]]
        spki_der = tbs[fields.spki[0] : fields.spki[1]]
        key_bits = spki_key_bits(spki_der)
    except DERError as exc:
        raise IssuerConfigError(f"issuer {name}: cannot read certificate fields: {exc}") from exc
    issuer = Issuer(
        name=name,
        certificate=cert,
        subject_der=subject_der,
        spki_der=spki_der,
        key_bits=key_bits,
        spki_sha256=hashlib.sha256(spki_der).digest(),
        responders=[],
    )
    for alg in CERT_ID_HASHES:
        issuer.cert_id_hashes[alg] = (
            hashlib.new(alg, subject_der).digest(),
            hashlib.new(alg, key_bits).digest(),
        )
    return issuer


def check_delegated_responder(issuer: Issuer, cert: x509.Certificate) -> None:
    """Enforce the BR 7.1.2.8 OCSP responder certificate profile, naming what is wrong."""
    problems: list[str] = []
    try:
        cert.verify_directly_issued_by(issuer.certificate)
    except (ValueError, TypeError, InvalidSignature):
        problems.append("it is not signed by the issuer")
    exts = cert.extensions
    try:
        eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
        if list(eku) != [ExtendedKeyUsageOID.OCSP_SIGNING]:
            problems.append("extendedKeyUsage must be id-kp-OCSPSigning only")
    except x509.ExtensionNotFound:
        problems.append("extendedKeyUsage id-kp-OCSPSigning is missing")
    try:
        nocheck = exts.get_extension_for_class(x509.OCSPNoCheck)
        if nocheck.critical:
            problems.append("id-pkix-ocsp-nocheck must be non-critical")
    except x509.ExtensionNotFound:
        problems.append("id-pkix-ocsp-nocheck is missing")
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage)
        if not ku.value.digital_signature or not ku.critical:
            problems.append("keyUsage digitalSignature (critical) is required")
        if _other_key_usages(ku.value):
            problems.append(
                "keyUsage must be digitalSignature only (7.1.2.8.7), not "
                + ", ".join(_other_key_usages(ku.value))
            )
    except x509.ExtensionNotFound:
        problems.append("keyUsage is missing")
    try:
        if exts.get_extension_for_class(x509.BasicConstraints).value.ca:
            # a CA certificate with id-kp-OCSPSigning can answer for its issuer's other
            # certificates (the 2020 delegated-responder incident)
            problems.append("basicConstraints cA must be FALSE (7.1.2.8.4)")
    except x509.ExtensionNotFound:
        pass
    try:
        exts.get_extension_for_class(x509.AuthorityKeyIdentifier)
    except x509.ExtensionNotFound:
        problems.append("authorityKeyIdentifier is missing")
    for forbidden in (
        x509.CRLDistributionPoints,
        x509.SubjectAlternativeName,
        x509.NameConstraints,
        x509.CertificatePolicies,
    ):
        try:
            exts.get_extension_for_class(forbidden)
            problems.append(f"{forbidden.__name__} must not be present")
        except x509.ExtensionNotFound:
            pass
    if problems:
        raise IssuerConfigError(
            f"issuer {issuer.name}: responder certificate {cert.subject.rfc4514_string()!r} "
            "does not meet the BR 7.1.2.8 profile: " + "; ".join(problems)
        )


def _other_key_usages(usage: x509.KeyUsage) -> list[str]:
    """The keyUsage bits besides digitalSignature that are set (RFC 5280 names)."""
    names = {
        "nonRepudiation": usage.content_commitment,
        "keyEncipherment": usage.key_encipherment,
        "dataEncipherment": usage.data_encipherment,
        "keyAgreement": usage.key_agreement,
        "keyCertSign": usage.key_cert_sign,
        "cRLSign": usage.crl_sign,
    }
    if usage.key_agreement:  # only then may cryptography read the two below
        names["encipherOnly"] = usage.encipher_only
        names["decipherOnly"] = usage.decipher_only
    return [name for name, present in names.items() if present]


def make_responder(
    issuer: Issuer, cert: x509.Certificate, key: AnySigningKey, *, delegated: bool
) -> ResponderIdentity:
    """Check a signing identity and prove it works by verifying one real signature.

    A token key's public half is not read from the token: the verified signature below
    proves that the key matches the certificate."""
    if not isinstance(key, Pkcs11Key) and not public_keys_match(key, cert):
        raise IssuerConfigError(
            f"issuer {issuer.name}: the key does not match certificate "
            f"{cert.subject.rfc4514_string()!r}"
        )
    if delegated:
        check_delegated_responder(issuer, cert)
    elif (
        cert.public_bytes(serialization.Encoding.DER)
        != issuer.certificate.public_bytes(serialization.Encoding.DER)
        and not isinstance(key, Pkcs11Key)
        and not public_keys_match(key, issuer.certificate)
    ):
        raise IssuerConfigError(f"issuer {issuer.name}: issuer key does not match the issuer")
    _verify_first_signature(issuer.name, key, cert)
    return ResponderIdentity(
        certificate=cert,
        key=key,
        delegated=delegated,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        verified_at=dt.datetime.now(dt.UTC),
    )


def _verify_first_signature(name: str, key: AnySigningKey, cert: x509.Certificate) -> None:
    """Sign and verify a probe: a key that cannot produce verifiable signatures (a broken
    HSM session, a mismatched key) must fail at start, not on the first relying party."""
    probe = b"ocsp-responder signing self-test"
    pub = cert.public_key()
    try:
        if isinstance(key, Pkcs11Key):
            _verify_token_signature(key, pub, probe)
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            sig = key.sign(probe)
            assert isinstance(pub, ed25519.Ed25519PublicKey)
            pub.verify(sig, probe)
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            alg = signature_hash_for(key)
            assert alg is not None and isinstance(pub, ec.EllipticCurvePublicKey)
            pub.verify(key.sign(probe, ec.ECDSA(alg)), probe, ec.ECDSA(alg))
        else:
            assert isinstance(key, rsa.RSAPrivateKey) and isinstance(pub, rsa.RSAPublicKey)
            sig = key.sign(probe, padding.PKCS1v15(), hashes.SHA256())
            pub.verify(sig, probe, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, AssertionError) as exc:
        raise IssuerConfigError(
            f"issuer {name}: signing self-test failed (the key does not match certificate "
            f"{cert.subject.rfc4514_string()!r}, or cannot sign)"
        ) from exc
    except Exception as exc:  # a token error: the identity is unusable, say so at start
        if not isinstance(key, Pkcs11Key):
            raise
        raise IssuerConfigError(
            f"issuer {name}: signing self-test with {key.spec.describe()} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _verify_token_signature(key: Pkcs11Key, pub: object, probe: bytes) -> None:
    alg = key.signature_hash()
    sig = key.sign(probe, alg)
    if isinstance(pub, ec.EllipticCurvePublicKey) and key.kind == "ec":
        pub.verify(sig, probe, ec.ECDSA(alg))
    elif isinstance(pub, rsa.RSAPublicKey) and key.kind == "rsa":
        pub.verify(sig, probe, padding.PKCS1v15(), alg)
    else:
        raise InvalidSignature("token key type does not match the certificate's key")


class IssuerRegistry:
    """All configured issuers, indexed the ways requests and certificates find them."""

    def __init__(self, issuers: list[Issuer]) -> None:
        self.issuers = issuers
        self._by_cert_id: dict[tuple[str, bytes, bytes], Issuer] = {}
        self._by_subject: dict[bytes, list[Issuer]] = {}
        self._by_spki_sha256: dict[bytes, Issuer] = {}
        for issuer in issuers:
            if issuer.spki_sha256 in self._by_spki_sha256:
                raise IssuerConfigError(
                    f"issuers {self._by_spki_sha256[issuer.spki_sha256].name} and {issuer.name} "
                    "share a key: configure a key once (cross-signed copies are the same issuer)"
                )
            self._by_spki_sha256[issuer.spki_sha256] = issuer
            self._by_subject.setdefault(issuer.subject_der, []).append(issuer)
            for alg, (name_hash, key_hash) in issuer.cert_id_hashes.items():
                self._by_cert_id[(alg, name_hash, key_hash)] = issuer

    def for_cert_id(self, alg: str, name_hash: bytes, key_hash: bytes) -> Issuer | None:
        """The issuer a CertID names, or None: matched on name AND key hash."""
        return self._by_cert_id.get((alg, name_hash, key_hash))

    def for_spki_sha256(self, digest: bytes) -> Issuer | None:
        """The issuer with this CT issuer_key_hash (SHA-256 of the whole SPKI)."""
        return self._by_spki_sha256.get(digest)

    def by_db_id(self, db_id: int) -> Issuer | None:
        for issuer in self.issuers:
            if issuer.db_id == db_id:
                return issuer
        return None

    def by_name(self, name: str) -> Issuer | None:
        for issuer in self.issuers:
            if issuer.name == name:
                return issuer
        return None

    def issuer_of(self, cert: x509.Certificate) -> Issuer | None:
        """The configured issuer that signed ``cert`` (name match, then signature check)."""
        try:
            tbs = cert.tbs_certificate_bytes
            i0, i1 = tbs_fields(tbs).issuer
            issuer_der = tbs[i0:i1]
        except DERError:
            return None
        for candidate in self._by_subject.get(issuer_der, []):
            try:
                cert.verify_directly_issued_by(candidate.certificate)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return candidate
        return None
