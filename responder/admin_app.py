"""The admin API (FastAPI), served only on the admin listener, never on the OCSP port.

Every route needs ``Authorization: Bearer <admin token>`` (compared in constant time),
checked by a middleware before routing: any request without it, to any path and with any
method, gets 401 and reaches no handler. The exceptions are the read-only operational
endpoints ``GET /healthz``, ``/readyz`` and ``/metrics`` (for probes and Prometheus; they
change nothing). With ``admin_client_ca`` set, TLS also requires a client certificate.
Recording answers only after the commit: 201 when the serial is new, 200 when it was
already recorded (idempotent), 409 when another certificate holds the serial (a serial
collision: nothing written), 4xx for bad input, 503 when the write could not be made.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from responder import metrics
from responder.health import Readiness
from responder.response_cache import ResponseCache
from responder.store import StoreUnavailable
from signer.issuers import IssuerRegistry
from signer.recording import (
    CertificateRecorder,
    CertificateRejected,
    SerialCollisionRejected,
    format_serial,
    load_certificates,
    parse_serial,
    quote,
)
from signer.response_builder import (
    RevocationReasonError,
    SigningError,
    parse_reason,
    reason_name,
)
from signer.revocation import RevocationConflict, Revoker, parse_revocation_time

log = logging.getLogger(__name__)

MAX_CERTIFICATE_BODY = 64 * 1024
MAX_JSON_BODY = 16 * 1024
#: Read-only endpoints that need no token (GET/HEAD only).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
MAX_BATCH_BODY = 16 * 1024 * 1024
MAX_BATCH_CERTIFICATES = 10_000


def not_recorded(exc: Exception) -> Response:
    """Fail closed: whatever went wrong after the input was accepted, the CA hears 503
    "not recorded" (and must not publish), never a bare 500 nor a silent success."""
    if isinstance(exc, StoreUnavailable | SigningError):
        reason = str(exc)
    else:
        log.error("recording failed unexpectedly", exc_info=exc)
        reason = f"internal error ({type(exc).__name__})"
    return json_response(503, {"error": "not recorded: " + reason}, {"Retry-After": "1"})


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice: which one counts is not the caller's to guess."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json.loads`` object hook: refuse duplicate keys (orjson, like most parsers, keeps
    the last one: ``"reason": "keyCompromise", "reason": "superseded"`` revoked as
    superseded)."""
    obj: dict[str, object] = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKeyError(f"key {quote(key)} appears twice in the JSON object")
        obj[key] = value
    return obj


class APIError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _request_id(presented: str | None) -> str:
    """The caller's X-Request-ID when it is a sane token, else a new one."""
    if presented is not None and _REQUEST_ID.fullmatch(presented):
        return presented
    return uuid.uuid4().hex


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers
    )


async def read_body(request: Request, limit: int) -> bytes:
    """Read at most ``limit`` bytes; refuse larger bodies before reading them whole."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "bad Content-Length")
        if int(declared) > limit:
            raise APIError(413, f"body larger than {limit} bytes")
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise APIError(413, f"body larger than {limit} bytes")
    return bytes(chunks)


@dataclass(frozen=True, slots=True)
class RevocationFields:
    issuer: str
    serial: str
    reason: object
    revoked_at: object


REVOCATION_FIELDS = ("issuer", "serial", "reason", "revoked_at")


def revocation_fields(payload: dict[str, Any]) -> RevocationFields:
    """The fields of a revocation request, checked for JSON type; ValueError otherwise.

    No ``str()`` coercion: a JSON number serial (12345) would be read as hex 0x12345, a
    number issuer could match an issuer named "1". An unknown key is refused too: a typo
    such as ``revokedAt`` would otherwise revoke silently at the current time.
    """
    unknown = sorted(set(payload) - set(REVOCATION_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(unknown)[:200]}: expected {', '.join(REVOCATION_FIELDS)}"
        )
    issuer = payload.get("issuer")
    if not isinstance(issuer, str):
        raise ValueError("issuer must be a string: the issuer's name from the configuration")
    serial = payload.get("serial")
    if not isinstance(serial, str):
        raise ValueError(
            'serial must be a string of hex digits (e.g. "0123abcd"), not a JSON '
            f"{'null' if serial is None else type(serial).__name__}"
        )
    return RevocationFields(
        issuer=issuer,
        serial=serial,
        reason=payload.get("reason", "unspecified"),
        revoked_at=payload.get("revoked_at"),
    )


def create_admin_app(
    *,
    token: str,
    registry: IssuerRegistry,
    recorder: CertificateRecorder,
    revoker: Revoker,
    cache: ResponseCache,
    readiness: Callable[[], Awaitable[Readiness]] | None = None,
) -> FastAPI:
    """Build the admin app around the shared recorder/revoker (the CLI uses the same)."""
    app = FastAPI(title="ocsp-responder admin API", docs_url=None, redoc_url=None, openapi_url=None)
    expected = token.encode()

    def token_ok(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        # compare_digest also runs for a wrong scheme, so timing tells nothing either way
        matches = hmac.compare_digest(presented.strip().encode(), expected)
        return scheme.lower() == "bearer" and matches

    async def require_token(request: Request) -> None:
        if not token_ok(request):
            raise APIError(401, "missing or wrong bearer token")

    @app.middleware("http")
    async def authenticate(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        open_path = request.method in ("GET", "HEAD") and request.url.path in OPEN_PATHS
        if open_path:
            return await call_next(request)
        started = time.perf_counter()
        request_id = _request_id(request.headers.get("x-request-id"))
        request.state.request_id = request_id  # for the handlers' own audit lines
        client = request.client.host if request.client else "?"
        if token_ok(request):
            response = await call_next(request)
        else:
            response = json_response(
                401, {"error": "missing or wrong bearer token"}, {"WWW-Authenticate": "Bearer"}
            )
        response.headers["X-Request-ID"] = request_id
        # the audit line: every admin call, its outcome and who made it
        log.log(
            logging.INFO if response.status_code < 400 else logging.WARNING,
            "admin %s %s -> %d",
            request.method,
            # the path is anyone's input (401s included): no control characters in the log
            request.url.path[:256].encode("unicode_escape").decode("ascii"),
            response.status_code,
            extra={
                "request_id": request_id,
                "client": client,
                "status": response.status_code,
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            },
        )
        return response

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> Response:
        return json_response(200, {"alive": True})

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz() -> Response:
        if readiness is None:
            return json_response(200, {"ready": True, "checks": {}})
        result = await readiness()
        return json_response(
            200 if result.ready else 503, {"ready": result.ready, "checks": result.checks}
        )

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics_endpoint() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return json_response(exc.status, {"error": exc.message}, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return json_response(exc.status_code, {"error": str(exc.detail)})

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> Response:
        # fail closed with JSON, never a traceback page; nothing was acknowledged
        log.error("admin API error: %s: %s", type(exc).__name__, exc)
        return json_response(500, {"error": f"internal error ({type(exc).__name__})"})

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return json_response(422, {"error": "invalid request", "detail": str(exc)})

    @app.post("/v1/certificates", dependencies=[Depends(require_token)])
    async def record_certificate(request: Request) -> Response:
        body = await read_body(request, MAX_CERTIFICATE_BODY)
        try:
            certs = load_certificates(body)
            if len(certs) != 1:
                raise CertificateRejected(
                    f"{len(certs)} certificates in one body: send one (or use the batch API)"
                )
            outcome = (await recorder.record(certs))[0]
        except SerialCollisionRejected as exc:
            serial = format_serial(certs[0].serial_number)
            return json_response(
                409,
                {"error": str(exc), "recorded": False, "issuer": exc.issuer, "serial": serial},
            )
        except CertificateRejected as exc:
            return json_response(exc.status, {"error": str(exc)})
        except Exception as exc:
            return not_recorded(exc)
        return json_response(201 if outcome.created else 200, outcome.as_json())

    @app.post("/v1/certificates:batch", dependencies=[Depends(require_token)])
    async def record_batch(request: Request) -> Response:
        """All or nothing: either every certificate is committed (200, one result per
        certificate, in order) or none is (4xx naming each refused one, or 503)."""
        body = await read_body(request, MAX_BATCH_BODY)
        try:
            # the limit applies while splitting: junk of many tiny elements is cut short
            certs = load_certificates(body, limit=MAX_BATCH_CERTIFICATES)
        except CertificateRejected as exc:
            return json_response(exc.status, {"error": str(exc)})
        try:
            prepared, rejected = await recorder.prepare_all(certs)
            if rejected:
                status = 422 if all(exc.status == 422 for _, exc in rejected) else 400
                return json_response(
                    status,
                    {
                        "error": f"{len(rejected)} of {len(certs)} certificates refused: "
                        "nothing recorded",
                        "rejected": [
                            {"index": i, "status": exc.status, "error": str(exc)}
                            for i, exc in rejected
                        ],
                    },
                )
            outcomes = await recorder.commit(prepared)
        except SerialCollisionRejected as exc:
            # nothing rejected before the commit: positions in ``prepared`` are indexes
            return json_response(
                409,
                {
                    "error": f"{len(exc.collisions)} of {len(certs)} certificates collide "
                    "with another certificate's serial: nothing recorded",
                    "rejected": [
                        {"index": i, "status": why.status, "error": str(why)}
                        for i, why in exc.collisions
                    ],
                },
            )
        except Exception as exc:
            return not_recorded(exc)
        created = sum(o.created for o in outcomes)
        return json_response(
            200,
            {
                "recorded": len(outcomes),
                "created": created,
                "existing": len(outcomes) - created,
                "results": [o.as_json() for o in outcomes],
            },
        )

    @app.post("/v1/revocations", dependencies=[Depends(require_token)])
    async def revoke(request: Request) -> Response:
        body = await read_body(request, MAX_JSON_BODY)
        try:
            payload = json.loads(body, object_pairs_hook=_unique_keys)
        except DuplicateKeyError as exc:
            return json_response(400, {"error": str(exc)})
        except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
            return json_response(400, {"error": f"body is not JSON: {exc}"})
        except RecursionError:  # "[[[[..." within the 16 kB: the decoder recurses per level
            return json_response(400, {"error": "body is not a revocation: JSON nested too deeply"})
        if not isinstance(payload, dict):
            return json_response(400, {"error": "body must be a JSON object"})
        try:
            request_fields = revocation_fields(payload)
        except ValueError as exc:
            return json_response(400, {"error": str(exc)})
        issuer = registry.by_name(request_fields.issuer)
        if issuer is None:
            names = ", ".join(i.name for i in registry.issuers)
            return json_response(422, {"error": f"unknown issuer; configured: {names}"})
        try:
            serial = parse_serial(request_fields.serial)
            reason = parse_reason(request_fields.reason)
            revoked_at = None
            if request_fields.revoked_at is not None:
                revoked_at = parse_revocation_time(request_fields.revoked_at)
            outcome = await revoker.revoke(issuer, serial, reason, revoked_at)
        except (ValueError, RevocationReasonError) as exc:
            return json_response(400, {"error": str(exc)})
        except RevocationConflict as exc:
            # nothing written: say so, and what stands (the CA must not think it applied)
            return json_response(
                409,
                {
                    "error": "not applied: " + str(exc),
                    "applied": False,
                    "issuer": issuer.name,
                    "serial": format_serial(serial),
                    "revoked_at": exc.stored.revoked_at.isoformat(),
                    "reason": reason_name(exc.stored.reason),
                },
            )
        except (StoreUnavailable, SigningError) as exc:
            return json_response(503, {"error": "not revoked: " + str(exc)}, {"Retry-After": "1"})
        cache.drop_serial(issuer.db_id, serial)
        # the audit line of the revocation itself (BR 5.4.1): the request line above it
        # says only "POST /v1/revocations -> 201"; the request id joins the two
        log.info(
            "revocation %s: issuer=%s serial=%s reason=%s revoked_at=%s known=%s",
            "recorded" if outcome.created else "updated" if outcome.updated else "repeated",
            issuer.name,
            format_serial(serial),
            reason_name(outcome.revocation.reason),
            outcome.revocation.revoked_at.isoformat(),
            outcome.known,
            extra={
                "request_id": getattr(request.state, "request_id", None),
                "issuer": issuer.name,
                "serial": format_serial(serial),
            },
        )
        answer: dict[str, object] = {
            "issuer": issuer.name,
            "serial": format_serial(serial),
            "revoked_at": outcome.revocation.revoked_at.isoformat(),
            "reason": reason_name(outcome.revocation.reason),
            "created": outcome.created,
            "updated": outcome.updated,
            "cdn_purge": outcome.cdn_purge,
            "known": outcome.known,
        }
        warning = outcome.warning(issuer.name)
        if warning is not None:
            answer["warning"] = warning
            answer["known_under"] = list(outcome.known_under)
        return json_response(201 if outcome.created else 200, answer)

    return app
