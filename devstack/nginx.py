"""Debian's nginx as a TLS terminator that requires a client certificate, on 127.0.0.1, for tests.

It stands where a site puts Cartd and Policy behind mutual TLS: ``ssl_verify_client on``
against a CA of the test's own, proxying every path to a plain-HTTP upstream. A request
without a certificate, or with one the CA did not sign, is answered ``400`` by nginx itself
("No required SSL certificate was sent", "The SSL certificate error"), as a real site's does.

Usage::

    with MutualTLSProxy(workdir, {"cartd": stack.cartd_url}, pki) as proxy:
        proxy.url("cartd")   # https://127.0.0.1:<port>

``pki`` has ``server_cert``, ``server_key`` (for 127.0.0.1) and ``ca`` (the client CA).
nginx runs in the foreground (``daemon off``) with a configuration and prefix of its own and
is stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Protocol, Self

HOST = "127.0.0.1"


class ServerPKI(Protocol):
    """The files nginx needs: its certificate and key, and the CA its clients' certificates chain to."""

    ca: Path
    server_cert: Path
    server_key: Path


def nginx_binary() -> str | None:
    """The nginx executable (Debian's is in /usr/sbin, which a user's PATH may lack), or None."""
    return shutil.which("nginx") or (
        str(Path("/usr/sbin/nginx")) if Path("/usr/sbin/nginx").exists() else None
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class MutualTLSProxy:
    """One nginx, one TLS port per upstream, each requiring a client certificate."""

    def __init__(self, workdir: Path, upstreams: dict[str, str], pki: ServerPKI) -> None:
        self.workdir = Path(workdir)
        self.upstreams = dict(upstreams)
        self.pki = pki
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, name: str) -> str:
        return f"https://{HOST}:{self.ports[name]}"

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"

    def _config(self) -> str:
        servers = []
        for name, upstream in self.upstreams.items():
            servers.append(
                f"""
    server {{
        listen {HOST}:{self.ports[name]} ssl;
        ssl_certificate {self.pki.server_cert};
        ssl_certificate_key {self.pki.server_key};
        ssl_client_certificate {self.pki.ca};
        ssl_verify_client on;
        location / {{
            proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}"""
            )
        temp = self.workdir / "temp"
        return f"""
# Written by devstack/nginx.py for one test run.
user root;
worker_processes 1;
daemon off;
pid {self.workdir}/nginx.pid;
error_log {self.error_log} info;
events {{ worker_connections 256; }}
http {{
    access_log {self.workdir}/access.log;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    client_max_body_size 0;
{"".join(servers)}
}}
"""

    def start(self, timeout: float = 20) -> Self:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed: run scripts/install-nginx.sh (scripts/test does)")
        (self.workdir / "temp").mkdir(parents=True, exist_ok=True)
        self.ports = {name: _free_port() for name in self.upstreams}
        config = self.workdir / "nginx.conf"
        config.write_text(self._config(), encoding="utf-8")
        with open(self.workdir / "nginx.out", "wb") as out:
            self.proc = subprocess.Popen(
                [binary, "-p", str(self.workdir), "-c", str(config), "-e", str(self.error_log)],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        for port in self.ports.values():
            while not _listening(port):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nginx did not start:\n{self._logs()}")
                time.sleep(0.05)
        return self

    def _logs(self) -> str:
        parts = []
        for name in ("nginx.out", "error.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self, timeout: float = 10) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # SIGQUIT: nginx's graceful stop; its workers are in its process group.
        os.killpg(proc.pid, signal.SIGQUIT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False
