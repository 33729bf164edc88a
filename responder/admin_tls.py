"""TLS for the admin listener: server certificate, and optionally client certificates (mTLS).

With ``admin_tls_cert``/``admin_tls_key`` the admin listener speaks HTTPS only. With
``admin_client_ca`` as well, the TLS handshake requires a client certificate issued by that
CA (``ssl.CERT_REQUIRED``): a client without one never gets to send a request, let alone a
token. The bearer token is still required on top (two independent credentials).
"""

from __future__ import annotations

import ssl
from typing import Any

from responder.config import Config, ConfigError


def admin_ssl_options(config: Config) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for the admin listener ({} for plain HTTP)."""
    if config.admin_tls_cert is None or config.admin_tls_key is None:
        return {}
    for key in ("admin_tls_cert", "admin_tls_key", "admin_client_ca"):
        path = getattr(config, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"{key}: {path} is not a readable file")
    # load them here, once, so that a file that is not what its key says is named (ssl
    # only says "[SSL] PEM lib (_ssl.c:3905)", from inside uvicorn)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.admin_tls_cert, config.admin_tls_key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"admin_tls_cert/admin_tls_key: {config.admin_tls_cert} and {config.admin_tls_key} "
            f"are not a PEM certificate chain and its private key: {exc.reason or exc}"
        ) from exc
    if config.admin_client_ca is not None:
        try:
            context.load_verify_locations(cafile=config.admin_client_ca)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"admin_client_ca: {config.admin_client_ca} holds no PEM CA certificate: "
                f"{exc.reason or exc}"
            ) from exc
    options: dict[str, Any] = {
        "ssl_certfile": str(config.admin_tls_cert),
        "ssl_keyfile": str(config.admin_tls_key),
    }
    if config.admin_client_ca is not None:
        options["ssl_ca_certs"] = str(config.admin_client_ca)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options
