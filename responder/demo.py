"""``ocsp-responder demo``: a demo CA on an embedded PostgreSQL, answering OCSP.

Creates (once) a root, an issuing CA and a delegated responder under the data dir,
migrates the embedded database, records a few certificates (one precertificate, one
revoked) through the normal recording path, then serves and prints `openssl ocsp`
command lines that show verified answers.
"""

from __future__ import annotations

import secrets
import shlex
from pathlib import Path

from cryptography import x509

from responder import server
from responder.config import load_config
from responder.schema import migrate
from responder.service import ResponderService, resolve_database_url
from signer.demo_ca import create_ca, write_ca, write_pem_cert
from signer.response_builder import parse_reason

LEAVES = ("good.example", "revoked.example", "precert.example")


def _write_setup(data_dir: Path, listen: str, admin_listen: str) -> Path:
    ca_dir = data_dir / "ca"
    config_path = data_dir / "demo.toml"
    if not (ca_dir / "issuing-ca.pem").exists():
        ca = create_ca("p256", "Demo")
        write_ca(ca, ca_dir)
        for name in LEAVES:
            leaf = ca.issue_leaf(name, precertificate=name.startswith("precert"))
            write_pem_cert(data_dir / f"{name}.pem", leaf)
        write_pem_cert(ca_dir / "chain.pem", ca.ca_cert, ca.root_cert)
        token = data_dir / "admin-token"
        token.write_text(secrets.token_urlsafe(32) + "\n")
        token.chmod(0o600)
    config_path.write_text(
        "# Written by `ocsp-responder demo`; no database_url: embedded PostgreSQL.\n"
        f'data_dir = "."\nlisten = "{listen}"\nadmin_listen = "{admin_listen}"\n'
        'admin_token_file = "admin-token"\n\n'
        "[[issuers]]\n"
        'name = "demo"\n'
        'certificate = "ca/issuing-ca.pem"\n'
        'responder_certificate = "ca/responder.pem"\n'
        'responder_key = "ca/responder.key"\n'
    )
    return config_path


async def run_demo(data_dir: Path, listen: str, admin_listen: str, *, serve: bool = True) -> None:
    """Set everything up, print the openssl commands, then serve until interrupted."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = _write_setup(data_dir, listen, admin_listen)
    config = load_config(config_path)
    config.database_url = resolve_database_url(config)
    await migrate(config.database_url)

    service = ResponderService(config)
    await service.start(pool_size=2)
    try:
        certs = [
            x509.load_pem_x509_certificate((data_dir / f"{n}.pem").read_bytes()) for n in LEAVES
        ]
        outcomes = await service.recorder.record(certs)
        issuer = service.registry.issuers[0]
        await service.revoker.revoke(issuer, certs[1].serial_number, parse_reason("keyCompromise"))
    finally:
        await service.close()

    host, port = config.listen
    url = f"http://{host}:{port}/"
    ca = data_dir / "ca"
    print("\nDemo CA and responder are set up in", data_dir)
    for name, outcome in zip(LEAVES, outcomes, strict=True):
        kind = "precertificate" if outcome.precertificate else "certificate"
        print(f"  recorded {kind} {name} serial {outcome.serial:x}")
    print("\nAsk the responder (in another terminal) with:\n")
    for name in ("good.example", "revoked.example"):
        cmd = [
            "openssl",
            "ocsp",
            "-issuer",
            str(ca / "issuing-ca.pem"),
            "-cert",
            str(data_dir / f"{name}.pem"),
            "-url",
            url,
            "-CAfile",
            str(ca / "chain.pem"),
            "-resp_text",
        ]
        print("  " + shlex.join(cmd) + "\n")
    print("Expect 'Response verify OK' and the status (good / revoked).\n")
    if serve:
        await server.serve(config)
