"""nginx as a CDN edge for tests: the shipped docs/deploy/nginx-cdn.conf, templated with
loopback ports and temporary directories, run in the foreground as a subprocess."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support import REPO

SHIPPED_CONFIG = REPO / "docs" / "deploy" / "nginx-cdn.conf"


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        raise RuntimeError("nginx is not installed (CI installs nginx-light: see .ci/run)")
    return found


class NginxEdge:
    def __init__(self, listen_port: int, upstream: str) -> None:
        self.port = listen_port
        self.root = Path(tempfile.mkdtemp(prefix="ocsp-edge-"))
        self.runtime = self.root / "run"
        self.cache = self.root / "cache"
        self.runtime.mkdir()
        self.cache.mkdir()
        text = SHIPPED_CONFIG.read_text()
        for name, value in {
            "LISTEN": f"127.0.0.1:{listen_port}",
            "UPSTREAM": upstream,
            "RUNTIME_DIR": str(self.runtime),
            "CACHE_DIR": str(self.cache),
        }.items():
            text = text.replace(f"@@{name}@@", value)
        directives = [line.split("#", 1)[0] for line in text.splitlines()]
        assert not any("@@" in d for d in directives), "a placeholder was not filled in"
        self.config = self.root / "nginx.conf"
        self.config.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15) -> NginxEdge:
        directives = "daemon off;"
        if os.geteuid() == 0:
            directives += " user root;"  # workers must write the cache we own
        cmd = [nginx_binary(), "-p", str(self.root), "-e", "stderr", "-c", str(self.config)]
        check = subprocess.run([*cmd, "-g", directives, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(
            [*cmd, "-g", directives],
            stdout=open(self.runtime / "stdout.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nginx did not start: {self.log()}")

    def log(self) -> str:
        parts = [p.read_text() for p in self.runtime.glob("*.log") if p.exists()]
        return "\n".join(parts)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
