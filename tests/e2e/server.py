"""A real `tally serve` process on a free port, over SQLite or PostgreSQL, with platform keys
made by the real CLI. Shared by the HTTP, SDK and schema tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support import postgres_schema

TALLY = str(Path(sys.executable).parent / "tally")
ALL_SCOPES = "read,spend,grant,support,admin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """`tally serve` as a child process. `restart()` stops it and starts it again on the same
    port and database, as an operator's deploy would."""

    def __init__(self, url: str, directory: Path, *, workers: int = 1) -> None:
        self.url = url
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.directory = directory
        self.workers = workers
        self.env = {**os.environ, "TALLY_DATABASE_URL": url, "TALLY_WORKER": "off"}
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / f"serve-{self.port}.log"

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [TALLY, *args], capture_output=True, text=True, env=self.env, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def key(self, platform: str, scopes: str = ALL_SCOPES) -> str:
        """A new platform (or a new key of an existing one) with `scopes`: the plaintext key."""
        listed = self.cli("keys", "list")
        verb = ("keys", "create") if f"  {platform}  " in listed else ("platforms", "create")
        return self.cli(*verb, platform, "--scopes", scopes).strip().splitlines()[-1]

    def start(self) -> None:
        assert self.process is None
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [TALLY, "serve", "--port", str(self.port), "--workers", str(self.workers)],
                env=self.env,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"tally serve did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@contextmanager
def running(kind: str, directory: Path, *, workers: int = 1) -> Iterator[Server]:
    with _database_url(kind, directory) as url:
        server = Server(url, directory, workers=workers)
        server.cli("migrate")
        server.start()
        try:
            yield server
        finally:
            server.stop()


@contextmanager
def _database_url(kind: str, directory: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{directory}/http.db"
    else:
        with postgres_schema() as url:
            yield url
