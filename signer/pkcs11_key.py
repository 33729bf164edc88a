"""Signing keys that stay inside a PKCS#11 token (an HSM, or SoftHSM2 in tests).

The key is referenced either by an RFC 7512 URI or by a TOML table::

    responder_key = "pkcs11:token=ocsp;object=r1-ocsp?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/ocsp-responder/pin"
    responder_key = { pkcs11_module = "/usr/lib/softhsm/libsofthsm2.so", token = "ocsp",
                      label = "r1-ocsp", pin_file = "/etc/ocsp-responder/pin" }   # or pin_env = "VAR"

The PIN is never written in the configuration itself (``pin-value`` is refused): it comes
from a file (mode 0600, like a PEM key) or an environment variable. ECDSA (P-256, P-384,
P-521) and RSA PKCS#1 v1.5 keys are supported; the hash is computed here and the token
signs the digest (CKM_ECDSA / CKM_RSA_PKCS with a DigestInfo), which every token supports.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from signer.keys import KeyLoadError, check_key_file_mode, ecdsa_hash_for_curve

#: DER of the namedCurve OIDs (CKA_EC_PARAMS) -> key size.
_CURVES = {
    bytes.fromhex("06082a8648ce3d030107"): 256,  # prime256v1 / P-256
    bytes.fromhex("06052b81040022"): 384,  # secp384r1
    bytes.fromhex("06052b81040023"): 521,  # secp521r1
}
#: DigestInfo prefixes (RFC 8017 9.2 note 1) for RSA PKCS#1 v1.5 over a precomputed hash.
_DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


@dataclass(frozen=True)
class Pkcs11KeySpec:
    """Where a token-held key lives and where its PIN comes from."""

    module: Path
    token: str
    label: str
    pin_file: Path | None = None
    pin_env: str | None = None

    def describe(self) -> str:
        return f"pkcs11 token {self.token!r} key {self.label!r}"

    def read_pin(self) -> str:
        """The user PIN, from its file (owner-only) or environment variable."""
        if self.pin_file is not None:
            try:
                check_key_file_mode(self.pin_file)
                return self.pin_file.read_text().strip()
            except OSError as exc:
                raise KeyLoadError(
                    f"{self.pin_file}: cannot read PIN file: {exc.strerror}"
                ) from exc
        if self.pin_env is not None:
            pin = os.environ.get(self.pin_env)
            if pin is None:
                raise KeyLoadError(f"{self.describe()}: environment variable {self.pin_env} unset")
            return pin
        raise KeyLoadError(f"{self.describe()}: give pin_file or pin_env")


def parse_pkcs11_uri(uri: str, base: Path) -> Pkcs11KeySpec:
    """An RFC 7512 ``pkcs11:`` URI (token, object; module-path, pin-source, pin-env)."""
    if not uri.startswith("pkcs11:"):
        raise KeyLoadError(f"not a pkcs11: URI: {uri!r}")
    path, _, query = uri[len("pkcs11:") :].partition("?")
    attrs: dict[str, str] = {}
    for part in filter(None, path.split(";")):
        name, sep, value = part.partition("=")
        if not sep:
            raise KeyLoadError(f"pkcs11 URI: attribute {part!r} has no value")
        attrs[name] = unquote(value)
    params = dict(parse_qsl(query, keep_blank_values=True))
    if "pin-value" in params:
        raise KeyLoadError("pkcs11 URI: pin-value is refused; use pin-source=file:... or pin-env")
    pin_file: Path | None = None
    source = params.get("pin-source")
    if source is not None:
        if not source.startswith("file:"):
            raise KeyLoadError("pkcs11 URI: pin-source must be a file: URI")
        pin_file = _resolve(base, unquote(source[len("file:") :]).removeprefix("//"))
    return _spec(
        {
            "pkcs11_module": params.get("module-path"),
            "token": attrs.get("token"),
            "label": attrs.get("object"),
            "pin_env": params.get("pin-env"),
        },
        base,
        "pkcs11 URI",
        pin_file,
    )


def spec_from_table(table: dict[str, object], base: Path, where: str) -> Pkcs11KeySpec:
    """The TOML table form: pkcs11_module, token, label, pin_file | pin_env."""
    allowed = {"pkcs11_module", "token", "label", "pin_file", "pin_env"}
    unknown = set(table) - allowed
    if unknown:
        raise KeyLoadError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    pin_file = table.get("pin_file")
    return _spec(
        table, base, where, _resolve(base, str(pin_file)) if pin_file is not None else None
    )


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _spec(
    values: dict[str, object], base: Path, where: str, pin_file: Path | None
) -> Pkcs11KeySpec:
    for required in ("pkcs11_module", "token", "label"):
        if not values.get(required):
            name = {"pkcs11_module": "module-path", "label": "object"}.get(required, required)
            raise KeyLoadError(f"{where}: {required} ({name}) is required")
    pin_env = values.get("pin_env")
    if (pin_file is None) == (pin_env is None):
        raise KeyLoadError(f"{where}: give exactly one of pin_file (pin-source) or pin_env")
    return Pkcs11KeySpec(
        module=_resolve(base, str(values["pkcs11_module"])),
        token=str(values["token"]),
        label=str(values["label"]),
        pin_file=pin_file,
        pin_env=None if pin_env is None else str(pin_env),
    )


#: One logged-in session per (module, token): PKCS#11 logs in per application and token,
#: so a second key in the same token shares the session (and its lock).
_sessions: dict[tuple[str, str], tuple[Any, threading.Lock]] = {}
_sessions_lock = threading.Lock()


def _session(spec: Pkcs11KeySpec, stale: Any = None) -> tuple[Any, threading.Lock]:
    """The token's logged-in session; a new one if ``stale`` is the cached one."""
    import pkcs11

    key = (str(spec.module), spec.token)
    with _sessions_lock:
        cached = _sessions.get(key)
        if cached is not None and stale is not None and cached[0] is stale:
            with contextlib.suppress(pkcs11.PKCS11Error):
                stale.close()
            cached = None
        if cached is None:
            token = pkcs11.lib(str(spec.module)).get_token(token_label=spec.token)
            try:
                session = token.open(user_pin=spec.read_pin())
            except pkcs11.exceptions.UserAlreadyLoggedIn:
                session = token.open()  # another session of ours is still logged in
            lock = _sessions[key][1] if key in _sessions else threading.Lock()
            cached = _sessions[key] = (session, lock)
        return cached


#: Errors after which a new session (and a new login) may succeed: the token was
#: restarted, the network HSM connection dropped, the session was closed under us.
def _session_errors() -> tuple[type[BaseException], ...]:
    from pkcs11 import exceptions as e

    return (
        e.SessionHandleInvalid,
        e.SessionClosed,
        e.UserNotLoggedIn,
        e.DeviceRemoved,
        e.DeviceError,
        e.TokenNotPresent,
        e.KeyHandleInvalid,
        e.ObjectHandleInvalid,
    )


class TokenSigningError(Exception):
    """The token did not sign, even after a new session; the message names token and key."""


class Pkcs11Key:
    """A private key inside a token: signs digests, never leaves the token.

    Operations on a token's session run under its lock (PKCS#11 sessions are not meant
    for concurrent operations).
    """

    def __init__(self, spec: Pkcs11KeySpec) -> None:
        try:
            import pkcs11
            from pkcs11 import Attribute, KeyType, ObjectClass
        except ImportError as exc:
            raise KeyLoadError(
                f"{spec.describe()}: python-pkcs11 is not installed "
                "(pip install 'ocsp-responder[pkcs11]')"
            ) from exc

        self.spec = spec
        self._object_class = ObjectClass.PRIVATE_KEY
        try:
            self._session, self._lock = _session(spec)
            with self._lock:
                self._key: Any = self._session.get_key(
                    object_class=self._object_class, label=spec.label
                )
        except KeyLoadError:
            raise
        except (pkcs11.PKCS11Error, RuntimeError, OSError) as exc:
            raise KeyLoadError(f"{spec.describe()}: {type(exc).__name__}: {exc}") from exc
        self._mechanism = pkcs11.Mechanism
        key_type = self._key.key_type
        if key_type == KeyType.EC:
            params = bytes(self._key[Attribute.EC_PARAMS])
            if params not in _CURVES:
                raise KeyLoadError(f"{spec.describe()}: unsupported EC curve {params.hex()}")
            self.kind = "ec"
            self.key_size = _CURVES[params]
        elif key_type == KeyType.RSA:
            self.kind = "rsa"
            self.key_size = int(self._key.key_length)
        else:
            raise KeyLoadError(f"{spec.describe()}: unsupported key type {key_type!r}")

    def signature_hash(self) -> hashes.HashAlgorithm:
        """SHA-256 for RSA; for ECDSA the curve's hash (BR 7.1.3.2.2), as for PEM keys."""
        if self.kind == "ec":
            return ecdsa_hash_for_curve(self.key_size)
        return hashes.SHA256()

    def sign(self, data: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
        """Sign ``data``: a DER ECDSA-Sig-Value, or an RSA PKCS#1 v1.5 signature.

        If the session was lost (token restart, dropped HSM connection), log in again once
        and retry; anything else, or a second failure, raises TokenSigningError."""
        import pkcs11

        digester = hashes.Hash(algorithm)
        digester.update(data)
        digest = digester.finalize()
        if self.kind == "ec":
            payload, mechanism = digest, self._mechanism.ECDSA
        else:
            prefix = _DIGEST_INFO.get(algorithm.name)
            if prefix is None:
                raise ValueError(f"unsupported RSA digest {algorithm.name}")
            payload, mechanism = prefix + digest, self._mechanism.RSA_PKCS
        try:
            try:
                with self._lock:
                    raw = bytes(self._key.sign(payload, mechanism=mechanism))
            except _session_errors():
                self._reconnect()
                with self._lock:
                    raw = bytes(self._key.sign(payload, mechanism=mechanism))
        except (pkcs11.PKCS11Error, RuntimeError, OSError, KeyLoadError) as exc:
            # KeyLoadError: the new login could not read its PIN (file gone, mode changed)
            raise TokenSigningError(
                f"{self.spec.describe()}: signing failed: {type(exc).__name__}: {exc}"
            ) from exc
        if self.kind == "ec":
            half = len(raw) // 2
            return encode_dss_signature(
                int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
            )
        return raw

    def _reconnect(self) -> None:
        """A new session for the token (shared with its other keys) and the key's handle."""
        self._session, self._lock = _session(self.spec, stale=self._session)
        with self._lock:
            self._key = self._session.get_key(
                object_class=self._object_class, label=self.spec.label
            )

    def __repr__(self) -> str:  # never anything secret: the PIN is not kept
        return f"Pkcs11Key({self.spec.describe()})"
