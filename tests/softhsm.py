"""A throwaway SoftHSM2 token for tests: its own config and token directory under a temp dir.

The test process and the responder subprocesses find it through ``SOFTHSM2_CONF``.
Keys are imported from PKCS#8 PEM with ``softhsm2-util --import`` (the demo CA made them);
after that the responder only ever sees the token.
"""

from __future__ import annotations

import glob
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

USER_PIN = "24681357"
SO_PIN = "13572468"


def softhsm_module() -> Path | None:
    """The SoftHSM2 PKCS#11 module Debian installs (package softhsm2), if present."""
    for pattern in ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/*/softhsm/libsofthsm2.so"):
        found = glob.glob(pattern)
        if found:
            return Path(found[0])
    return None


@dataclass
class SoftHSMToken:
    directory: Path
    label: str
    module: Path

    @property
    def conf(self) -> Path:
        return self.directory / "softhsm2.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    @property
    def pin_file(self) -> Path:
        return self.directory / "pin"

    @classmethod
    def create(cls, directory: Path, label: str = "ocsp-test") -> SoftHSMToken:
        module = softhsm_module()
        if module is None:
            raise RuntimeError("SoftHSM2 is not installed (apt-get install softhsm2)")
        tokens = directory / "tokens"
        tokens.mkdir(parents=True, exist_ok=True)
        token = cls(directory, label, module)
        token.conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )
        fd = os.open(token.pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(USER_PIN + "\n")
        token._util(
            "--init-token", "--free", "--label", label, "--pin", USER_PIN, "--so-pin", SO_PIN
        )
        return token

    def _util(self, *args: str) -> str:
        result = subprocess.run(
            ["softhsm2-util", *args],
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"softhsm2-util {args[0]} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def import_key(self, pem_pkcs8: Path, key_label: str, key_id: str) -> None:
        """Put a private key into the token (it is non-extractable from then on)."""
        self._util(
            "--import",
            str(pem_pkcs8),
            "--token",
            self.label,
            "--label",
            key_label,
            "--id",
            key_id,
            "--pin",
            USER_PIN,
        )

    def uri(self, key_label: str) -> str:
        return (
            f"pkcs11:token={self.label};object={key_label}"
            f"?module-path={self.module}&pin-source=file:{self.pin_file}"
        )

    def table(self, key_label: str) -> str:
        return (
            f'{{ pkcs11_module = "{self.module}", token = "{self.label}", '
            f'label = "{key_label}", pin_file = "{self.pin_file}" }}'
        )
