"""Listeners and admin TLS files that cannot be used: one line naming the key, exit 1.

The admin port in use ended in uvicorn's sys.exit() inside a task: a SystemExit traceback
and exit status 3 (the code for "database unavailable"); a bad TLS file was reported as
"[SSL] PEM lib (_ssl.c:3905)" with no key named. Real `serve` subprocesses.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from responder.admin_tls import admin_ssl_options
from responder.config import ConfigError, load_config
from tests.support import VENV_BIN, IssuerFiles, write_config


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "ocsp-responder"), "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("key", ["listen", "admin_listen"])
def test_a_port_in_use_is_one_line_naming_the_key(
    module_database: str, p256_issuer: IssuerFiles, tmp_path: Path, taken_port: int, key: str
) -> None:
    ports = {"port": taken_port} if key == "listen" else {"admin_port": taken_port}
    proc = write_config(tmp_path, module_database, [p256_issuer], **ports)
    result = serve(proc.config_path)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ocsp-responder: error: {key} 127.0.0.1:{taken_port}: "), last
    assert "Traceback" not in result.stderr


def test_admin_tls_files_that_are_not_what_their_key_says(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    path = tmp_path / "c.toml"
    path.write_text(f'admin_tls_cert = "{garbage}"\nadmin_tls_key = "{garbage}"\n')
    with pytest.raises(ConfigError, match=r"^admin_tls_cert/admin_tls_key: .* are not a PEM"):
        admin_ssl_options(load_config(path, {}))


def test_admin_client_ca_that_holds_no_certificate(
    tmp_path: Path, p256_issuer: IssuerFiles
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    path = tmp_path / "c.toml"
    path.write_text(
        f'admin_tls_cert = "{p256_issuer.directory / "responder.pem"}"\n'
        f'admin_tls_key = "{p256_issuer.directory / "responder.key"}"\n'
        f'admin_client_ca = "{garbage}"\n'
    )
    with pytest.raises(ConfigError, match=r"^admin_client_ca: .* holds no PEM CA certificate"):
        admin_ssl_options(load_config(path, {}))


def test_workers_flag_has_the_config_keys_bound(
    module_database: str, p256_issuer: IssuerFiles, tmp_path: Path, taken_port: int
) -> None:
    """``serve --workers`` is refused beyond 256 as ``workers`` is (README), before any
    socket is bound or worker started: the flag bypassed the bound (the port here is taken
    only so that the old code failed on the bind instead of starting 257 processes)."""
    proc = write_config(tmp_path, module_database, [p256_issuer], port=taken_port)
    result = subprocess.run(
        [
            str(VENV_BIN / "ocsp-responder"),
            "serve",
            "--config",
            str(proc.config_path),
            "--workers",
            "257",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == "ocsp-responder: error: --workers must be between 1 and 256"
