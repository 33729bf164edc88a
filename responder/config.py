"""Configuration: one TOML file, every key overridable by an environment variable.

The file comes from ``--config PATH`` or ``OCSP_RESPONDER_CONFIG``. Each top-level key
``name`` can be set by ``OCSP_RESPONDER_NAME`` (upper case); list-valued keys
(``issuers``, ``ct_logs``) take JSON in the variable. Relative paths are resolved against
the config file's directory. Errors name the key and what is wrong (``ConfigError``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from signer.issuers import (
    AnySigningKey,
    Issuer,
    IssuerConfigError,
    IssuerRegistry,
    issuer_from_certificate,
    make_responder,
)
from signer.keys import KeyLoadError, load_pem_key
from signer.pkcs11_key import Pkcs11Key, Pkcs11KeySpec, parse_pkcs11_uri, spec_from_table
from signer.response_builder import ValidityPolicy

ENV_PREFIX = "OCSP_RESPONDER_"


class ConfigError(Exception):
    """The configuration is unusable; the message names the key."""


def parse_duration(value: object, key: str) -> dt.timedelta:
    """``"4d"``, ``"96h"``, ``"30m"``, ``"45s"``, ``"1h30m"`` or a number of seconds."""
    seconds = _duration_seconds(value)
    if seconds is None:
        raise ConfigError(f"{key}: expected a duration like '4d' or '8h', got {value!r}")
    # TOML has nan, inf and negative numbers; timedelta refuses more than 999,999,999 days
    # (OverflowError): each is a one-line error here, not a traceback or a negative timeout
    if not 0 <= seconds <= MAX_DURATION_SECONDS:
        raise ConfigError(
            f"{key}: expected a duration from 0 to {MAX_DURATION_SECONDS // 86400} days, "
            f"got {value!r}"
        )
    return dt.timedelta(seconds=seconds)


#: the longest duration any key takes: 100 years (keys bound their own ranges further)
MAX_DURATION_SECONDS = 100 * 365 * 86400


def _duration_seconds(value: object) -> float | None:
    """Seconds of ``value`` (unbounded; NaN stays NaN), or None if it is not a duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        parts = re.findall(r"(\d+)([dhms])", text)
        if parts and "".join(n + u for n, u in parts) == text.replace(" ", ""):
            units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
            return sum(int(n) * units[u] for n, u in parts)
    return None


def parse_address(value: str, key: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8080`` for IPv6)."""
    match = re.fullmatch(r"\[?([^\]]*?)\]?:(\d{1,5})", value.strip())
    if not match or not 0 <= int(match[2]) <= 65535:
        raise ConfigError(f"{key}: expected host:port, got {value!r}")
    return match[1], int(match[2])


#: A signing key: a PEM file, or a key inside a PKCS#11 token.
KeyRef = Path | Pkcs11KeySpec


def load_key(ref: KeyRef) -> AnySigningKey:
    """Open a PEM key file (owner-only) or a token key (logged in with its PIN)."""
    if isinstance(ref, Pkcs11KeySpec):
        return Pkcs11Key(ref)
    return load_pem_key(ref)


@dataclass(frozen=True)
class ResponderKeyConfig:
    certificate: Path
    key: KeyRef


@dataclass(frozen=True)
class IssuerConfig:
    name: str
    certificate: Path
    #: delegated responders (BR 7.1.2.8); several during a key rollover
    responders: list[ResponderKeyConfig]
    #: the issuer's own key, when it signs its responses itself
    key: KeyRef | None


#: the longest ``poll_interval`` accepted: with retries and the batch it must leave the
#: follower well inside BR 4.9.9's 15 minutes (docs/deploy.md, "The CT follower")
MAX_CT_POLL_INTERVAL = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CTLogConfig:
    name: str
    url: str
    kind: str  # "rfc6962" | "static"
    public_key: str  # PEM or base64 DER SubjectPublicKeyInfo
    poll_interval: dt.timedelta
    origin: str | None = None  # static: checkpoint origin (default: URL without scheme)
    batch_size: int = 4096  # entries per committed batch
    #: the first leaf indexed: a position below it jumps there (docs/ct-index.md)
    start_index: int = 0


@dataclass(frozen=True)
class CdnPurgeConfig:
    #: template with {get_path}, {get_path_raw}, {post_key}, {serial}, {issuer}
    url: str
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Config:
    database_url: str | None = None
    data_dir: Path = Path("var")
    listen: tuple[str, int] = ("127.0.0.1", 8080)
    admin_listen: tuple[str, int] | None = ("127.0.0.1", 8081)
    admin_token: str | None = None
    path_prefix: str = ""
    policy: ValidityPolicy = field(default_factory=ValidityPolicy)
    max_age: int = 3600
    cache_size: int = 1_000_000
    signing_concurrency: int = 4
    signing_queue_limit: int = 256
    #: serials waiting for a batched store lookup beyond which a request is answered
    #: tryLater at once (responder/store_lookup.py)
    store_lookup_queue_limit: int = 4096
    #: the OCSP port's HTTP server: "native" (responder/ocsp_http.py) or "uvicorn"
    ocsp_http_server: str = "native"
    #: an idle keep-alive connection on the OCSP port is closed after this long (a CDN
    #: that pools connections longer may want more)
    ocsp_keep_alive_timeout: dt.timedelta = dt.timedelta(seconds=5)
    #: a request not fully received in this long is answered 408 and closed (native)
    ocsp_request_read_timeout: dt.timedelta = dt.timedelta(seconds=10)
    log_level: str = "info"
    issuers: list[IssuerConfig] = field(default_factory=list)
    ct_logs: list[CTLogConfig] = field(default_factory=list)
    ct_follow_in_serve: bool = False
    #: background re-signing inside `serve` (signer/refresher.py); `refresh` runs one pass
    refresher: bool = True
    refresher_interval: dt.timedelta = dt.timedelta(seconds=60)
    refresher_batch_size: int = 200
    refresher_concurrency: int = 2
    refresher_spread: dt.timedelta = dt.timedelta(hours=1)
    #: how long after notAfter a certificate's response is still refreshed (BR 4.10.1)
    expired_retention: dt.timedelta = dt.timedelta(days=7)
    #: CDN purge hook called after a revocation commits (responder/cdn_purge.py)
    cdn_purge: list[CdnPurgeConfig] = field(default_factory=list)
    cdn_purge_attempts: int = 3
    cdn_purge_timeout: dt.timedelta = dt.timedelta(seconds=2)
    replica_urls: list[str] = field(default_factory=list)
    replica_max_lag: dt.timedelta = dt.timedelta(seconds=30)
    workers: int = 1
    #: a serve process (or worker) whose event loop has not run for this long is ended
    #: (responder/loop_watchdog.py); 0 turns the watchdog off
    worker_hang_timeout: dt.timedelta = dt.timedelta(seconds=30)
    warmup_responses: int = 100_000
    source: Path | None = None
    # operations (docs/operations.md)
    log_format: str = "text"
    log_success_sample_every: int = 1000
    admin_tls_cert: Path | None = None
    admin_tls_key: Path | None = None
    admin_client_ca: Path | None = None
    health_check_interval: dt.timedelta = dt.timedelta(seconds=30)
    refresh_deadline_slack: dt.timedelta = dt.timedelta(hours=6)
    readiness_requires_fresh_responses: bool = True

    def load_issuers(self) -> IssuerRegistry:
        """Load every issuer's certificate and signing identities, checking each."""
        if not self.issuers:
            raise ConfigError("issuers: at least one issuer must be configured")
        loaded: list[Issuer] = []
        for ic in self.issuers:
            try:
                issuer = issuer_from_certificate(ic.name, _load_cert(ic.certificate, ic.name))
                for rc in ic.responders:
                    cert = _load_cert(rc.certificate, ic.name)
                    issuer.responders.append(
                        make_responder(issuer, cert, load_key(rc.key), delegated=True)
                    )
                if ic.key is not None:
                    issuer.responders.append(
                        make_responder(
                            issuer, issuer.certificate, load_key(ic.key), delegated=False
                        )
                    )
            except (KeyLoadError, IssuerConfigError) as exc:
                raise ConfigError(str(exc)) from exc
            loaded.append(issuer)
        try:
            return IssuerRegistry(loaded)
        except IssuerConfigError as exc:
            raise ConfigError(str(exc)) from exc


def _load_cert(path: Path, issuer: str) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"issuer {issuer}: cannot read {path}: {exc.strerror}") from exc
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"issuer {issuer}: {path} is not a certificate: {exc}") from exc


def _str(v: object, key: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected a string, got {v!r}")
    return v


def _int(v: object, key: str) -> int:
    if isinstance(v, bool):
        raise ConfigError(f"{key}: expected an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
        return int(v)
    raise ConfigError(f"{key}: expected an integer, got {v!r}")


def _bool(v: object, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return v.lower() in ("1", "true", "yes", "on")
    raise ConfigError(f"{key}: expected true or false, got {v!r}")


def _str_list(v: object, key: str) -> list[str]:
    if isinstance(v, str):
        try:
            v = json.loads(v) if v.strip().startswith("[") else [p for p in v.split(",") if p]
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{key}: expected a JSON array of strings: {exc}") from exc
    if not isinstance(v, list) or not all(isinstance(item, str) for item in v):
        raise ConfigError(f"{key}: expected a list of strings")
    return v


def _list(v: object, key: str) -> list[Any]:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{key}: the environment value must be a JSON array: {exc}") from exc
    if not isinstance(v, list) or not all(isinstance(item, dict) for item in v):
        raise ConfigError(f"{key}: expected a list of tables")
    return v


KNOWN_KEYS: dict[str, Callable[[object, str], object]] = {
    "database_url": _str,
    "data_dir": _str,
    "listen": _str,
    "admin_listen": _str,
    "admin_token": _str,
    "admin_token_file": _str,
    "path_prefix": _str,
    "response_validity": parse_duration,
    "refresh_margin": parse_duration,
    "this_update_backdate": parse_duration,
    "max_age": parse_duration,
    "cache_size": _int,
    "signing_concurrency": _int,
    "signing_queue_limit": _int,
    "store_lookup_queue_limit": _int,
    "ocsp_http_server": _str,
    "ocsp_keep_alive_timeout": parse_duration,
    "ocsp_request_read_timeout": parse_duration,
    "log_level": _str,
    "issuers": _list,
    "ct_logs": _list,
    "ct_follow_in_serve": _bool,
    "refresher": _bool,
    "refresher_interval": parse_duration,
    "refresher_batch_size": _int,
    "refresher_concurrency": _int,
    "refresher_spread": parse_duration,
    "expired_retention": parse_duration,
    "cdn_purge": _list,
    "cdn_purge_attempts": _int,
    "cdn_purge_timeout": parse_duration,
    "log_format": _str,
    "log_success_sample_every": _int,
    "admin_tls_cert": _str,
    "admin_tls_key": _str,
    "admin_client_ca": _str,
    "health_check_interval": parse_duration,
    "refresh_deadline_slack": parse_duration,
    "readiness_requires_fresh_responses": _bool,
    "replica_urls": _str_list,
    "replica_max_lag": parse_duration,
    "workers": _int,
    "worker_hang_timeout": parse_duration,
    "warmup_responses": _int,
}


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply environment overrides, validate everything."""
    env = os.environ if environ is None else environ
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = Path(env[ENV_PREFIX + "CONFIG"])
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
        base = path.resolve().parent
    unknown = set(raw) - set(KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    for key in KNOWN_KEYS:
        value = env.get(ENV_PREFIX + key.upper())
        if value is not None:
            raw[key] = value
    values = {key: KNOWN_KEYS[key](value, key) for key, value in raw.items()}
    return _build(values, base, path)


def _path(base: Path, value: object, key: str) -> Path:
    text = _str(value, key)
    if "\x00" in text:  # every file call would raise ValueError on it
        raise ConfigError(f"{key}: a path cannot contain a NUL character")
    p = Path(text).expanduser()
    return p if p.is_absolute() else base / p


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

#: worker processes per serve (``workers`` and ``serve --workers``)
MAX_WORKERS = 256


def check_database_url(url: str, key: str) -> str:
    """A PostgreSQL URL asyncpg can use, checked before anything connects: asyncpg raises
    a bare ValueError (or OverflowError) deep in connect for a bad port or scheme."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check (ValueError if invalid)
    except ValueError as exc:
        raise ConfigError(f"{key}: not a valid PostgreSQL URL: {exc}") from exc
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{key}: expected a postgresql:// URL, got scheme {parts.scheme!r}")
    return url


def _build(v: dict[str, Any], base: Path, source: Path | None) -> Config:
    cfg = Config(source=source)
    if "database_url" in v:
        if not v["database_url"].strip():
            # an unset variable in a deploy template: never fall back to an embedded,
            # throwaway database that would take (and lose) the CA's recordings
            raise ConfigError(
                "database_url: is empty; set it, or leave the key out altogether to try "
                "the responder on an embedded PostgreSQL"
            )
        cfg.database_url = check_database_url(v["database_url"], "database_url")
    if "data_dir" in v:
        cfg.data_dir = _path(base, v["data_dir"], "data_dir")
    else:
        cfg.data_dir = base / "var"
    if "listen" in v:
        cfg.listen = parse_address(v["listen"], "listen")
    if "admin_listen" in v:
        cfg.admin_listen = (
            parse_address(v["admin_listen"], "admin_listen") if v["admin_listen"] else None
        )
    if v.get("admin_token"):
        cfg.admin_token = v["admin_token"]
    elif "admin_token_file" in v:
        token_path = _path(base, v["admin_token_file"], "admin_token_file")
        try:
            cfg.admin_token = token_path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"admin_token_file: cannot read {token_path}: {exc.strerror}"
            ) from exc
    if cfg.admin_token is not None and len(cfg.admin_token) < 16:
        raise ConfigError("admin_token: must be at least 16 characters")
    if "path_prefix" in v:
        prefix = v["path_prefix"].strip()
        if prefix and not prefix.startswith("/"):
            raise ConfigError("path_prefix: must start with '/' (e.g. '/ocsp')")
        cfg.path_prefix = prefix.rstrip("/")
    defaults = ValidityPolicy()
    policy = ValidityPolicy(
        validity=v.get("response_validity", defaults.validity),
        refresh_margin=v.get("refresh_margin", defaults.refresh_margin),
        backdate=v.get("this_update_backdate", defaults.backdate),
    )
    try:
        policy.check()
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    cfg.policy = policy
    if "max_age" in v:
        cfg.max_age = int(v["max_age"].total_seconds())
    for key in (
        "cache_size",
        "signing_concurrency",
        "signing_queue_limit",
        "store_lookup_queue_limit",
    ):
        if key in v:
            if v[key] < 0 or (
                key in ("signing_concurrency", "store_lookup_queue_limit") and v[key] < 1
            ):
                raise ConfigError(f"{key}: must be positive")
            setattr(cfg, key, v[key])
    if "ocsp_http_server" in v:
        if v["ocsp_http_server"] not in ("native", "uvicorn"):
            raise ConfigError('ocsp_http_server: must be "native" or "uvicorn"')
        cfg.ocsp_http_server = v["ocsp_http_server"]
    for key in ("ocsp_keep_alive_timeout", "ocsp_request_read_timeout"):
        if key in v:
            if not dt.timedelta(seconds=1) <= v[key] <= dt.timedelta(hours=1):
                raise ConfigError(f"{key}: must be between 1s and 1h")
            setattr(cfg, key, v[key])
    if "ocsp_request_read_timeout" in v and cfg.ocsp_http_server != "native":
        # uvicorn has no such limit: never accept a setting that would do nothing
        raise ConfigError(
            'ocsp_request_read_timeout: only the native server has it (ocsp_http_server = "'
            f'{cfg.ocsp_http_server}")'
        )
    if "log_level" in v:
        level = v["log_level"].lower()
        if level not in LOG_LEVELS:
            raise ConfigError(f"log_level: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
        cfg.log_level = level
    cfg.issuers = [_issuer(base, item, i) for i, item in enumerate(v.get("issuers", []))]
    names = [ic.name for ic in cfg.issuers]
    for i, name in enumerate(names):
        if name in names[:i]:
            # revocations and the admin API name an issuer: two of one name is ambiguous
            raise ConfigError(
                f"issuers[{i}].name: {name!r} is already the name of issuers[{names.index(name)}]"
            )
    cfg.ct_logs = [_ct_log(item, i) for i, item in enumerate(v.get("ct_logs", []))]
    if "ct_follow_in_serve" in v:
        cfg.ct_follow_in_serve = v["ct_follow_in_serve"]
    _refresh_settings(cfg, v)
    _operations(cfg, v, base)
    cfg.replica_urls = [
        check_database_url(url, f"replica_urls[{i}]")
        for i, url in enumerate(v.get("replica_urls", []))
    ]
    if "replica_max_lag" in v:
        cfg.replica_max_lag = v["replica_max_lag"]
    if "workers" in v:
        if not 1 <= v["workers"] <= MAX_WORKERS:
            raise ConfigError(f"workers: must be between 1 and {MAX_WORKERS}")
        cfg.workers = v["workers"]
    if "warmup_responses" in v:
        if v["warmup_responses"] < 0:
            raise ConfigError("warmup_responses: must be 0 (off) or more")
        cfg.warmup_responses = v["warmup_responses"]
    return cfg


#: Upper bounds: each refresher batch holds one of a serve process's 10 pooled connections
#: while it is signed (the store lookups take up to 4; recording and health need the
#: rest: 100,000 workers made recordings wait 5 s for a connection), and a batch's rows stay
#: locked while they are signed (2^63 rows failed every batch, 10,000 is the batch API's
#: own limit).
REFRESHER_LIMITS = {"refresher_concurrency": 4, "refresher_batch_size": 10_000}

#: RFC 9110 token: what an HTTP method may be made of
_HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _refresh_settings(cfg: Config, v: dict[str, Any]) -> None:
    """Refresher, retention and CDN purge keys (docs/deploy.md)."""
    if "refresher" in v:
        cfg.refresher = v["refresher"]
    for key in ("refresher_batch_size", "refresher_concurrency", "cdn_purge_attempts"):
        if key in v:
            if v[key] < 1:
                raise ConfigError(f"{key}: must be at least 1")
            if v[key] > REFRESHER_LIMITS.get(key, v[key]):
                raise ConfigError(f"{key}: must be at most {REFRESHER_LIMITS[key]:,}")
            setattr(cfg, key, v[key])
    for key in ("refresher_interval", "refresher_spread", "expired_retention", "cdn_purge_timeout"):
        if key in v:
            setattr(cfg, key, v[key])
    if cfg.refresher_interval < dt.timedelta(seconds=1):
        raise ConfigError("refresher_interval: must be at least 1s")
    if cfg.refresher_spread >= cfg.policy.refresh_margin:
        raise ConfigError("refresher_spread: must be shorter than refresh_margin")
    # a row is claimed up to the spread before its renewal point, which comes
    # validity - margin - backdate after it was signed: a longer spread re-signs responses
    # as soon as they are signed, every pass, and a pass with a batch of them never ends
    served = cfg.policy.validity - cfg.policy.refresh_margin - cfg.policy.backdate
    if cfg.refresher_spread > served / 2:
        raise ConfigError(
            f"refresher_spread: must be at most half of response_validity - refresh_margin - "
            f"this_update_backdate ({served.total_seconds() / 3600:g}h / 2): a new response "
            "would be due again (almost) as soon as it is signed"
        )
    if cfg.expired_retention < dt.timedelta(0):
        raise ConfigError("expired_retention: must not be negative")
    if cfg.cdn_purge_timeout <= dt.timedelta(0):  # httpx times out at once: every purge failed
        raise ConfigError("cdn_purge_timeout: must be more than 0")
    cfg.cdn_purge = [_cdn_purge(item, i) for i, item in enumerate(v.get("cdn_purge", []))]


def _cdn_purge(item: dict[str, Any], index: int) -> CdnPurgeConfig:
    where = f"cdn_purge[{index}]"
    unknown = set(item) - {"url", "method", "headers"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    if "url" not in item:
        raise ConfigError(f"{where}: 'url' (a template) is required")
    url = _str(item["url"], f"{where}.url")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.url: must be an http:// or https:// URL template")
    try:
        url.format(get_path="", get_path_raw="", post_key="", serial="", issuer="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"{where}.url: bad template ({exc}); placeholders are {{get_path}}, "
            "{get_path_raw}, {post_key}, {serial}, {issuer}"
        ) from exc
    headers = item.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(h, str) for k, h in headers.items()
    ):
        raise ConfigError(f"{where}.headers: expected a table of strings")
    method = _str(item.get("method", "GET"), f"{where}.method").upper()
    if not _HTTP_TOKEN.fullmatch(method):  # else every purge failed, after each revocation
        raise ConfigError(f"{where}.method: not an HTTP method: {method!r}")
    return CdnPurgeConfig(url=url, method=method, headers=dict(headers))


def _operations(cfg: Config, v: dict[str, Any], base: Path) -> None:
    """Logging, admin TLS and health keys (see docs/operations.md)."""
    if "log_format" in v:
        cfg.log_format = v["log_format"].strip().lower()
        if cfg.log_format not in ("json", "text"):
            raise ConfigError(f"log_format: expected 'json' or 'text', got {v['log_format']!r}")
    if "log_success_sample_every" in v:
        if v["log_success_sample_every"] < 1:
            raise ConfigError("log_success_sample_every: must be >= 1 (1 logs every success)")
        cfg.log_success_sample_every = v["log_success_sample_every"]
    for key in ("admin_tls_cert", "admin_tls_key", "admin_client_ca"):
        if v.get(key):
            setattr(cfg, key, _path(base, v[key], key))
    if (cfg.admin_tls_cert is None) != (cfg.admin_tls_key is None):
        raise ConfigError("admin_tls_cert and admin_tls_key go together")
    if cfg.admin_client_ca is not None and cfg.admin_tls_cert is None:
        raise ConfigError("admin_client_ca needs admin_tls_cert and admin_tls_key (mTLS is TLS)")
    if "worker_hang_timeout" in v:
        timeout = v["worker_hang_timeout"]
        # below 5 s a GC pause or a slow disk could look like a hang; beyond 10 min a
        # hung process hoards connections for too long to be of use
        if timeout and not dt.timedelta(seconds=5) <= timeout <= dt.timedelta(minutes=10):
            raise ConfigError("worker_hang_timeout: must be 0 (off) or between 5s and 10m")
        cfg.worker_hang_timeout = timeout
    if "health_check_interval" in v:
        if v["health_check_interval"] < dt.timedelta(seconds=1):
            raise ConfigError("health_check_interval: must be at least 1s")
        cfg.health_check_interval = v["health_check_interval"]
    margin = cfg.policy.refresh_margin
    cfg.refresh_deadline_slack = v.get(
        "refresh_deadline_slack", min(margin / 4, cfg.refresh_deadline_slack)
    )
    if not dt.timedelta(0) <= cfg.refresh_deadline_slack < margin:
        raise ConfigError(
            "refresh_deadline_slack: must be shorter than refresh_margin, so a late refresh "
            "is reported while the served responses are still valid"
        )
    if "readiness_requires_fresh_responses" in v:
        cfg.readiness_requires_fresh_responses = v["readiness_requires_fresh_responses"]


def _issuer(base: Path, item: dict[str, Any], index: int) -> IssuerConfig:
    where = f"issuers[{index}]"
    allowed = {"name", "certificate", "responder_certificate", "responder_key", "responders", "key"}
    unknown = set(item) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    if "certificate" not in item:
        raise ConfigError(f"{where}: 'certificate' (the issuer's certificate) is required")
    name = _str(item.get("name", f"issuer-{index}"), f"{where}.name")
    responders: list[ResponderKeyConfig] = []
    if "responder_certificate" in item or "responder_key" in item:
        if "responder_certificate" not in item or "responder_key" not in item:
            raise ConfigError(f"{where}: responder_certificate and responder_key go together")
        responders.append(
            ResponderKeyConfig(
                _path(base, item["responder_certificate"], f"{where}.responder_certificate"),
                _key_ref(base, item["responder_key"], f"{where}.responder_key"),
            )
        )
    if not isinstance(item.get("responders", []), list):
        raise ConfigError(f"{where}.responders: expected a list of {{certificate, key}} tables")
    for j, r in enumerate(item.get("responders", [])):
        if not isinstance(r, dict) or set(r) != {"certificate", "key"}:
            raise ConfigError(f"{where}.responders[{j}]: expected {{certificate, key}}")
        responders.append(
            ResponderKeyConfig(
                _path(base, r["certificate"], f"{where}.responders[{j}].certificate"),
                _key_ref(base, r["key"], f"{where}.responders[{j}].key"),
            )
        )
    key = _key_ref(base, item["key"], f"{where}.key") if "key" in item else None
    if not responders and key is None:
        raise ConfigError(
            f"{where}: give a delegated responder (responder_certificate + responder_key) "
            "or the issuer's own key"
        )
    return IssuerConfig(
        name=name,
        certificate=_path(base, item["certificate"], f"{where}.certificate"),
        responders=responders,
        key=key,
    )


def _key_ref(base: Path, value: object, key: str) -> KeyRef:
    """A PEM path, a ``pkcs11:`` URI, or a PKCS#11 table (see signer/pkcs11_key.py)."""
    try:
        if isinstance(value, dict):
            return spec_from_table(value, base, key)
        if isinstance(value, str) and value.startswith("pkcs11:"):
            return parse_pkcs11_uri(value, base)
    except KeyLoadError as exc:
        raise ConfigError(f"{key}: {exc}") from exc
    return _path(base, value, key)


CT_LOG_KEYS = {
    "name",
    "url",
    "kind",
    "origin",
    "public_key",
    "poll_interval",
    "batch_size",
    "start_index",
}


def _ct_log(item: dict[str, Any], index: int) -> CTLogConfig:
    where = f"ct_logs[{index}]"
    unknown = set(item) - CT_LOG_KEYS
    if unknown:  # a misspelt poll_interval silently kept the default, as in issuers
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    for required in ("url", "kind", "public_key"):
        if required not in item:
            raise ConfigError(f"{where}: '{required}' is required")
    kind = _str(item["kind"], f"{where}.kind")
    if kind not in ("rfc6962", "static"):
        raise ConfigError(f"{where}.kind: expected 'rfc6962' or 'static', got {kind!r}")
    poll = parse_duration(item.get("poll_interval", "10s"), f"{where}.poll_interval")
    if not dt.timedelta(0) < poll <= MAX_CT_POLL_INTERVAL:
        # the poll interval is spent inside BR 4.9.9's 15 minutes for a lost recording
        raise ConfigError(
            f"{where}.poll_interval: must be more than 0 and at most 5m (a lost recording "
            f"must be answered within 15 minutes of its CT publication), got {poll}"
        )
    return CTLogConfig(
        name=_str(item.get("name", item["url"]), f"{where}.name"),
        url=_str(item["url"], f"{where}.url").rstrip("/"),
        kind=kind,
        public_key=_str(item["public_key"], f"{where}.public_key"),
        poll_interval=poll,
        origin=_str(item["origin"], f"{where}.origin") if "origin" in item else None,
        batch_size=_positive(item.get("batch_size", 4096), f"{where}.batch_size"),
        start_index=_leaf_index(item.get("start_index", 0), f"{where}.start_index"),
    )


def _leaf_index(v: object, key: str) -> int:
    """A CT leaf index: what ct_logs.next_index (bigint) can hold."""
    n = _int(v, key)
    if not 0 <= n < 2**63:
        raise ConfigError(f"{key}: must be between 0 and 2^63 - 1, got {n}")
    return n


def _positive(v: object, key: str) -> int:
    n = _int(v, key)
    if n < 1:
        raise ConfigError(f"{key}: must be at least 1, got {n}")
    return n
