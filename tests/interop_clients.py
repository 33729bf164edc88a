"""Independent judges of our OCSP responses besides cryptography and `openssl ocsp`.

- pkilint (DigiCert's linter): the RFC 6960 OCSP response linter, the CA/B Forum TLS
  BR linters for the delegated responder and demo CA certificates, and its issuer/subject
  chain linter.
- GnuTLS `ocsptool`: parses and verifies a response as GnuTLS clients do.
- Go `golang.org/x/crypto/ocsp.ParseResponseForCert` (tests/go_ocsp/main.go), built once
  per session offline from Debian's golang-golang-x-crypto-dev.

Each returns what it found, so a test can assert on it and print it when it fails.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pkilint import finding_filter, loader, pkix
from pkilint.bin import lint_pkix_signer_signee_cert_chain as signer_signee_linter
from pkilint.cabf import serverauth
from pkilint.cabf.serverauth.serverauth_constants import CertificateType
from pkilint.pkix import certificate, extension, name
from pkilint.pkix import ocsp as pkilint_ocsp
from pkilint.validation import ValidationFindingSeverity

GO_SOURCE = Path(__file__).resolve().parent / "go_ocsp" / "main.go"
#: Debian's golang-golang-x-crypto-dev installs x/crypto here (GOPATH mode, no network)
GO_PATH = "/usr/share/gocode"


@dataclass(frozen=True)
class Finding:
    severity: str  # FATAL, ERROR, WARNING, NOTICE, INFO
    code: str
    path: str

    def __str__(self) -> str:
        return f"{self.severity} {self.code} @ {self.path}"


def _findings(results: list, at_least: ValidationFindingSeverity) -> list[Finding]:  # type: ignore[type-arg]
    return [
        Finding(str(fd.finding.severity), fd.finding.code, str(result.node.path))
        for result in results
        for fd in result.finding_descriptions
        if fd.finding.severity <= at_least
    ]


_OCSP_LINTER = pkilint_ocsp.create_pkix_ocsp_response_validator_container(
    [
        pkilint_ocsp.create_response_decoder(),
        pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
        pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
    ],
    [],
)


def lint_ocsp_response(
    der: bytes, at_least: ValidationFindingSeverity = ValidationFindingSeverity.WARNING
) -> list[Finding]:
    """pkilint's `lint_ocsp_response` (RFC 6960 profile) findings of at least ``at_least``."""
    document = loader.load_der_ocsp_response(der, "response")
    return _findings(_OCSP_LINTER.validate(document.root), at_least)


def lint_certificate(
    cert: x509.Certificate,
    at_least: ValidationFindingSeverity = ValidationFindingSeverity.WARNING,
    *,
    as_type: CertificateType | None = None,
) -> tuple[CertificateType, list[Finding]]:
    """`lint_cabf_serverauth_cert lint --detect` (or `--type`, given ``as_type``): the BR
    profile linted and the findings of at least ``at_least`` (PKIX findings the BRs
    supersede filtered, as the CLI does)."""
    document = loader.load_der_certificate(cert.public_bytes(Encoding.DER), "certificate")
    kind = as_type or serverauth.determine_certificate_type(document)
    validator = certificate.create_pkix_certificate_validator_container(
        serverauth.create_decoding_validators(), serverauth.create_validators(kind)
    )
    results, _ = finding_filter.filter_results(
        serverauth.create_serverauth_finding_filters(kind), validator.validate(document.root)
    )
    return kind, _findings(results, at_least)


def lint_issued_by(issuer_pem: Path, subject_pem: Path) -> str:
    """`lint_pkix_signer_signee_cert_chain lint ISSUER SUBJECT`: name chaining, AKI =
    issuer's SKI, policy chaining and the signature. Returns its report ("" when clean)."""
    out = io.StringIO()
    with redirect_stdout(out):
        code = signer_signee_linter.main(["lint", str(issuer_pem), str(subject_pem)])
    return out.getvalue().strip() or ("" if code == 0 else f"exit {code}")


# --- GnuTLS ocsptool ----------------------------------------------------------------------


@dataclass(frozen=True)
class GnutlsView:
    """What `ocsptool --verify-response` printed about one response."""

    verified: bool
    response_status: str
    cert_status: str | None
    serial: int | None
    hash_algorithm: str | None
    nonce: bytes | None
    output: str


def _field(output: str, label: str) -> str | None:
    match = re.search(rf"^\s*{label}: (.*)$", output, re.MULTILINE)
    return match.group(1).strip() if match else None


def gnutls_verify(der: bytes, issuer_pem: Path, *, delegated: bool) -> GnutlsView:
    """`ocsptool -e`: a delegated response is verified against the issuing CA as trust
    anchor (GnuTLS then checks the embedded responder certificate: signed by the CA,
    id-kp-OCSPSigning); a CA-signed one against the CA as the known signer."""
    with tempfile.NamedTemporaryFile(suffix=".der") as f:
        f.write(der)
        f.flush()
        trust = "--load-trust" if delegated else "--load-signer"
        result = subprocess.run(
            ["ocsptool", "--verify-response", trust, str(issuer_pem), "--infile", f.name],
            capture_output=True,
            text=True,
            timeout=30,
        )
    return _gnutls_view(result)


def _gnutls_view(result: subprocess.CompletedProcess[str]) -> GnutlsView:
    output = result.stdout + result.stderr
    serial = _field(output, "Serial Number")
    nonce = _field(output, "Nonce")
    return GnutlsView(
        verified=result.returncode == 0 and "Verifying OCSP Response: Success." in output,
        response_status=_field(output, "Response Status") or "",
        cert_status=_field(output, "Certificate Status"),
        serial=int(serial, 16) if serial else None,
        hash_algorithm=_field(output, "Hash Algorithm"),
        nonce=bytes.fromhex(nonce) if nonce else None,
        output=output,
    )


def gnutls_ask(
    url: str, leaf_pem: Path, issuer_pem: Path, *, delegated: bool, nonce: bool = False
) -> GnutlsView:
    """`ocsptool --ask`: GnuTLS builds the request (SHA-1 CertID, a nonce if asked), POSTs
    it over its own HTTP/1.0 client and verifies the answer, as in ``gnutls_verify``."""
    trust = "--load-trust" if delegated else "--load-signer"
    command = ["ocsptool", f"--ask={url}", "--load-cert", str(leaf_pem)]
    command += ["--load-issuer", str(issuer_pem), trust, str(issuer_pem)]
    result = subprocess.run(
        [*command, "--nonce" if nonce else "--no-nonce"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return _gnutls_view(result)


def gnutls_response_status(der: bytes) -> str:
    """`ocsptool --response-info`'s Response Status line (for unsigned error answers)."""
    with tempfile.NamedTemporaryFile(suffix=".der") as f:
        f.write(der)
        f.flush()
        result = subprocess.run(
            ["ocsptool", "--response-info", "--infile", f.name],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    return _field(result.stdout, "Response Status") or ""


# --- Go x/crypto/ocsp ---------------------------------------------------------------------


def build_go_checker(directory: Path) -> Path:
    """Compile tests/go_ocsp/main.go in GOPATH mode against Debian's x/crypto (offline,
    under a second with the packaged standard library)."""
    if shutil.which("go") is None or not Path(GO_PATH, "src/golang.org/x/crypto/ocsp").is_dir():
        raise AssertionError(
            "Go and golang.org/x/crypto are needed: apt-get install golang-go "
            "golang-golang-x-crypto-dev (.ci/run installs them)"
        )
    binary = directory / "ocsp_check"
    env = {
        **os.environ,
        "GOPATH": GO_PATH,
        "GO111MODULE": "off",
        "GOFLAGS": "",
        "GOCACHE": str(directory / "gocache"),
        "GOPROXY": "off",
    }
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        # no C compiler (golang-go installed without Recommends): pure-Go net, ~5 s more
        env["CGO_ENABLED"] = "0"
    result = subprocess.run(
        ["go", "build", "-o", str(binary), str(GO_SOURCE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return binary


@dataclass(frozen=True)
class GoView:
    """What ocsp.ParseResponseForCert made of one response."""

    accepted: bool
    fields: dict[str, str]
    output: str


def _go_view(command: list[str]) -> GoView:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    output = (result.stdout + result.stderr).strip()
    fields = dict(part.split("=", 1) for part in output.split() if "=" in part)
    return GoView(result.returncode == 0, fields, output)


def go_parse(binary: Path, der: bytes, issuer_pem: Path) -> GoView:
    """ParseResponseForCert on a response we saved."""
    with tempfile.NamedTemporaryFile(suffix=".der") as f:
        f.write(der)
        f.flush()
        return _go_view([str(binary), "parse", f.name, str(issuer_pem)])


def go_ask(
    binary: Path, method: str, url: str, leaf_pem: Path, issuer_pem: Path, alg: str = "sha1"
) -> GoView:
    """Go as the whole client: ocsp.CreateRequest, POST (or GET with the base64 appended
    unescaped), then ParseResponseForCert for that leaf."""
    return _go_view([str(binary), "ask", method, url, str(leaf_pem), str(issuer_pem), alg])
