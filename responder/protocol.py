"""OCSP on the wire: decoding requests (DER and the GET path form) and fixed error answers.

Strict by design: anything that is not exactly one DER OCSPRequest with one CertID is a
``MalformedRequest``, and the caller answers ``malformedRequest`` (never a 5xx). Parsing
happens once per request; everything later works on the ``CertIdRequest`` it returns.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509 import ocsp

from signer.der import TAG_SEQUENCE, DERError, children, encode_tlv, expect
from signer.issuers import CERT_ID_HASHES

# Unsigned OCSPResponse { responseStatus } for each non-successful status (RFC 6960 4.2.1).
MALFORMED_REQUEST = b"\x30\x03\x0a\x01\x01"
INTERNAL_ERROR = b"\x30\x03\x0a\x01\x02"
TRY_LATER = b"\x30\x03\x0a\x01\x03"
UNAUTHORIZED = b"\x30\x03\x0a\x01\x06"
TAG_OCTET_STRING = 0x04

#: RFC 9654: a nonce is 1 to 128 octets; a responder rejects others as malformed.
MAX_NONCE_LENGTH = 128
#: An OCSPRequest for one CertID with a nonce is ~120 bytes; 10 kB is far beyond any real one.
MAX_REQUEST_BYTES = 10 * 1024


class MalformedRequest(ValueError):
    """The request is not one well-formed DER OCSPRequest; the message says what is wrong."""


class UnsupportedHashAlgorithm(ValueError):
    """The CertID uses a hash we do not answer for (not SHA-1/256/384/512)."""


@dataclass(frozen=True, slots=True)
class CertIdRequest:
    """The one CertID of a request, plus its nonce if it sent one."""

    hash_algorithm: str
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    serial: int
    nonce: bytes | None
    #: the nonce's extnValue is the OCTET STRING holding it (RFC 8954/9654), not the raw
    #: nonce (the RFC 2560 reading, e.g. BouncyCastle clients): the echo copies the form
    nonce_wrapped: bool = True


#: the CertID hashes we answer for, and their digest sizes (issuerNameHash, issuerKeyHash)
_DIGEST_SIZES = {name: algorithm().digest_size for name, algorithm in CERT_ID_HASHES.items()}


def parse_request(der: bytes) -> CertIdRequest:
    """Decode a DER OCSPRequest holding exactly one CertID.

    cryptography's parser is strict DER and refuses trailing bytes and requests with zero
    or several CertIDs; we map all of those to MalformedRequest. Several CertIDs are refused
    rather than answered for the first one only (RFC 5019: one request per OCSPRequest).
    """
    if not der:
        raise MalformedRequest("empty request")
    if len(der) > MAX_REQUEST_BYTES:
        raise MalformedRequest("request too large")
    try:
        req = ocsp.load_der_ocsp_request(der)
    except (ValueError, NotImplementedError) as exc:  # several CertIDs: NotImplementedError
        raise MalformedRequest(f"not one DER OCSPRequest with one CertID: {exc}") from exc
    try:
        alg = req.hash_algorithm.name
    except UnsupportedAlgorithm as exc:
        raise UnsupportedHashAlgorithm(str(exc)) from exc
    size = _DIGEST_SIZES.get(alg)
    if size is None:
        raise UnsupportedHashAlgorithm(alg)
    if len(req.issuer_name_hash) != size or len(req.issuer_key_hash) != size:
        # not a hash of this algorithm: a malformed CertID, not an issuer we do not know
        # (it was answered ``unauthorized``, as if it could name someone else's issuer)
        raise MalformedRequest(f"CertID hashes are not {size}-octet {alg} digests")
    nonce: bytes | None = None
    nonce_wrapped = True
    try:
        extensions = req.extensions
    except (ValueError, x509.DuplicateExtension) as exc:
        # RFC 5280 4.2: an extension appears at most once (DuplicateExtension is not a
        # ValueError: uncaught it became internalError and a traceback per request)
        raise MalformedRequest(f"bad request extensions: {exc}") from exc
    if len(extensions):
        for extension in extensions:
            if extension.critical and not _understood(extension):
                # RFC 6960 4.4: only non-critical unknown extensions may be ignored
                raise MalformedRequest(f"critical request extension {extension.oid.dotted_string}")
        try:
            ext = extensions.get_extension_for_class(x509.OCSPNonce)
        except x509.ExtensionNotFound:
            pass
        else:
            nonce = ext.value.nonce
            if not 1 <= len(nonce) <= MAX_NONCE_LENGTH:
                raise MalformedRequest(f"nonce of {len(nonce)} octets (RFC 9654: 1 to 128)")
            # cryptography unwraps the OCTET STRING, or gives the extnValue as it is when
            # it holds none: only the wrapped form has this nested OCTET STRING in it
            nonce_wrapped = encode_tlv(TAG_OCTET_STRING, encode_tlv(TAG_OCTET_STRING, nonce)) in der
    problem = _single_request_extension_problem(der)
    if problem is not None:
        raise MalformedRequest(problem)
    return CertIdRequest(
        hash_algorithm=alg,
        issuer_name_hash=req.issuer_name_hash,
        issuer_key_hash=req.issuer_key_hash,
        serial=req.serial_number,
        nonce=nonce,
        nonce_wrapped=nonce_wrapped,
    )


#: id-pkix-ocsp-basic: the only response type we send (RFC 6960 4.2.1)
_OCSP_BASIC = x509.ObjectIdentifier("1.3.6.1.5.5.7.48.1.1")


def _understood(extension: x509.Extension[x509.ExtensionType]) -> bool:
    """A request extension we act on: the nonce, and acceptable response types that
    include the basic response (the one we send)."""
    value = extension.value
    if isinstance(value, x509.OCSPNonce):
        return True
    return isinstance(value, x509.OCSPAcceptableResponses) and _OCSP_BASIC in list(value)


def _single_request_extension_problem(der: bytes) -> str | None:
    """Why the one Request's singleRequestExtensions make it malformed, or None: a
    critical one (none is supported, so it must not be ignored) or one extnID twice (RFC
    5280 4.2, refused in requestExtensions too). cryptography does not expose them.

    ``der`` has already been parsed strictly by cryptography: the walk only locates
    ``OCSPRequest.tbsRequest.requestList[0].singleRequestExtensions``."""
    try:
        c0, c1 = expect(der, 0, len(der), TAG_SEQUENCE)  # OCSPRequest
        t0, t1 = expect(der, c0, c1, TAG_SEQUENCE)  # TBSRequest
        request_list = next(c for c in children(der, t0, t1) if c[0] == TAG_SEQUENCE)
        [(_, _, r0, r1)] = children(der, request_list[2], request_list[3])  # Request
        parts = children(der, r0, r1)
        if len(parts) < 2 or parts[1][0] != 0xA0:  # [0] EXPLICIT Extensions
            return None
        e0, e1 = expect(der, parts[1][2], parts[1][3], TAG_SEQUENCE)
        seen: set[bytes] = set()
        for _, _, x0, x1 in children(der, e0, e1):  # Extension
            fields = children(der, x0, x1)
            # extnID, critical BOOLEAN DEFAULT FALSE (present only when TRUE in DER)
            if (
                len(fields) == 3
                and fields[1][0] == 0x01
                and der[fields[1][2] : fields[1][3]] != b"\x00"
            ):
                return "critical singleRequestExtension (none is supported)"
            extn_id = der[fields[0][2] : fields[0][3]]
            if extn_id in seen:
                return "singleRequestExtension repeated (RFC 5280 4.2)"
            seen.add(extn_id)
    except (DERError, StopIteration, ValueError):
        return None  # cryptography accepted the structure: nothing else to find
    return None


_URL_SAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def decode_get_path(encoded: bytes) -> bytes:
    """Turn the part of a GET path after the prefix into DER request bytes.

    Clients send the base64 URL-encoded or not, so ``+`` arrives as ``+``, ``%2B`` or a
    space, and ``/`` as ``/`` or ``%2F``. Leading slashes are dropped (an AIA URL ending in
    ``/`` makes ``//``): base64 of a DER SEQUENCE starts with ``M``, never ``/``. ``=``
    padding is optional: none, partial or extra is read as the full one. The URL-safe
    alphabet (RFC 4648 section 5: ``-`` and ``_`` for ``+`` and ``/``), which some clients
    send since it needs no escaping, is read too, unless mixed with the standard one;
    other alphabets are refused.
    """
    stripped = encoded.lstrip(b"/")
    if not stripped:
        raise MalformedRequest("empty GET request")
    # padding carries no data: clients send all of it, none, or (rarely) some or extra;
    # its amount was checked only sometimes ("QUJD==" read, "QUI==" and "QQ=" refused)
    text = unquote_to_bytes(stripped).replace(b" ", b"+").rstrip(b"=")
    if b"-" in text or b"_" in text:
        if b"+" in text or b"/" in text:
            raise MalformedRequest("GET path mixes the standard and URL-safe base64 alphabets")
        text = text.translate(_URL_SAFE_TO_STANDARD)
    missing = -len(text) % 4
    if missing == 3:
        raise MalformedRequest("base64 length is impossible")
    text += b"=" * missing
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedRequest(f"bad base64 in GET path: {exc}") from exc


class ParsedRequests:
    """Parse each distinct request once: a bounded memo from request bytes to CertIdRequest.

    Relying parties ask about the same certificates over and over, byte for byte, and
    parsing (base64 + strict DER through cryptography, ~6 us) costs more than everything
    else the hot path does for a cached answer. Identical bytes always parse the same, so
    remembering the result is exact; malformed input is never remembered. When full, the
    oldest entry goes. GET paths and POST bodies are kept apart (different encodings).
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._get: dict[bytes, CertIdRequest] = {}
        self._post: dict[bytes, CertIdRequest] = {}

    def from_get_path(self, path: bytes, prefix_length: int) -> CertIdRequest:
        """The request in a GET path whose first ``prefix_length`` bytes are the prefix.

        Keyed by the whole raw path: its hash, computed once, serves every lookup."""
        found = self._get.get(path)
        if found is None:
            found = parse_request(decode_get_path(path[prefix_length:]))
            self._remember(self._get, path, found)
        return found

    def from_body(self, der: bytes) -> CertIdRequest:
        """The request in a POST body."""
        found = self._post.get(der)
        if found is None:
            found = parse_request(der)
            self._remember(self._post, der, found)
        return found

    def _remember(self, memo: dict[bytes, CertIdRequest], key: bytes, value: CertIdRequest) -> None:
        if self.max_entries <= 0:
            return
        if len(memo) >= self.max_entries:
            del memo[next(iter(memo))]
        memo[key] = value
