"""A real `tally serve` process on a free port, over SQLite or PostgreSQL, with platform keys
made by the real CLI. Shared by the HTTP, SDK and schema tests."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy
from prometheus_client.parser import text_string_to_metric_families

from tally.adapters.db.engine import normalise_url
from tests.support import free_port, postgres_schema

TALLY = str(Path(sys.executable).parent / "tally")
ALL_SCOPES = "read,spend,grant,support,admin"

#: A code as an email shows it (rule 11).
CODE = re.compile(r"\b[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}\b")


#: Runs several `tally` commands (a JSON list of argument lists) in one process.
_CLI_BATCH = """
import json, sys
from tally import logs
from tally.entrypoints.cli import app
logs.configure()
for args in json.loads(sys.argv[1]):
    code = app(args, prog_name="tally", standalone_mode=False)
    if code:
        sys.exit(code)
"""


class Server:
    """`tally serve` as a child process. `restart()` stops it and starts it again on the same
    port and database, as an operator's deploy would."""

    def __init__(
        self,
        url: str,
        directory: Path,
        *,
        workers: int = 1,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.url = url
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.directory = directory
        self.workers = workers
        self.env = {
            **os.environ,
            "TALLY_DATABASE_URL": url,
            "TALLY_WORKER": "off",
            "TALLY_PUBLIC_URL": self.base_url,
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / f"serve-{self.port}.log"
        self.platform_ids: dict[str, str] = {}  # name -> plt_... of the platforms made here

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        # In the test's own directory, so a ./tally.toml where pytest runs cannot change the
        # catalog the tests expect (the built-in one).
        return subprocess.run(
            [TALLY, *args],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.directory,
            timeout=60,
            check=False,
        )

    def cli(self, *args: str) -> str:
        done = self._run(*args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def key(self, platform: str, scopes: str = ALL_SCOPES) -> str:
        """A new platform (or a new key of an existing one) with `scopes`: the plaintext key.
        One CLI run per key (each costs about a second): create the platform, and only if it
        exists already add a key to it."""
        done = None
        if platform not in self.platform_ids:
            done = self._run("platforms", "create", platform, "--scopes", scopes)
            assert done.returncode == 0 or "platform_exists" in done.stderr, done.stderr
        if done is None or done.returncode != 0:
            done = self._run("keys", "create", platform, "--scopes", scopes)
            assert done.returncode == 0, done.stderr
        lines = done.stdout.strip().splitlines()
        # "platform NAME (plt_...)" first, the plaintext key alone on the last line.
        self.platform_ids[platform] = lines[0].rsplit("(", 1)[1].rstrip(")")
        return lines[-1]

    def keys(self, platform: str, *scopes: str) -> list[str]:
        """One key per entry of `scopes`, all of one platform, made by the CLI's own commands in
        one process: the CLI's start-up is most of what a key costs."""
        commands = [["keys", "create", platform, "--scopes", wanted] for wanted in scopes]
        if platform not in self.platform_ids:
            commands[0][:2] = ["platforms", "create"]
        done = subprocess.run(
            [sys.executable, "-c", _CLI_BATCH, json.dumps(commands)],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.directory,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        self.platform_ids[platform] = lines[0].rsplit("(", 1)[1].rstrip(")")
        made = [line for line in lines if re.fullmatch(r"tly_[0-9a-z]{10}_[0-9a-z]{32}", line)]
        assert len(made) == len(scopes), done.stdout
        return made

    def revoke(self, key: str) -> None:
        """Revoke a key through the CLI, by its visible prefix (`tly_xxxxxxxxxx`)."""
        self.cli("keys", "revoke", key.rsplit("_", 1)[0])

    def start(self) -> None:
        assert self.process is None
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [TALLY, "serve", "--port", str(self.port), "--workers", str(self.workers)],
                env=self.env,
                cwd=self.directory,
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

    def rows(self, sql: str, **params: Any) -> list[Any]:
        """The rows a query finds in the server's own database, read beside it (for what the
        API does not show, such as a forged ping that must have left no row)."""
        engine = sqlalchemy.create_engine(normalise_url(self.url))
        try:
            with engine.connect() as connection:
                return list(connection.execute(sqlalchemy.text(sql), params))
        finally:
            engine.dispose()

    def count(self, sql: str, **params: Any) -> int:
        """`SELECT count(*) ...`'s answer."""
        [(found,)] = self.rows(sql, **params)
        return int(found)

    def outbox(self, emails: set[str]) -> dict[str, list[str]]:
        """address -> the statuses of the outbox rows to it, oldest first."""
        found: dict[str, list[str]] = {email: [] for email in emails}
        for to, status in self.rows("SELECT to_email, status FROM outbox ORDER BY created_at"):
            if to in found:
                found[to].append(status)
        return found

    def wait_until_sent(self, emails: set[str], timeout: float = 20.0) -> dict[str, list[str]]:
        """Until no outbox row to these addresses is pending: the worker sends only pending
        rows, so from then on nothing more can go to them (no sleeping against its cycle)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.outbox(emails)
            if all(statuses and "pending" not in statuses for statuses in found.values()):
                return found
            assert time.monotonic() < deadline, f"still pending: {found}"
            time.sleep(0.1)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    # --- the worker's signals (TALLY_WORKER=inline, one process) ---------------------------

    def metric(self, name: str, **labels: str) -> float:
        """A sample from /metrics (0 when the series does not exist yet)."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    def worker_runs(self, job: str) -> int:
        """Completed runs of the in-process worker's `job` (succeeded or failed)."""
        return int(
            sum(
                self.metric("tally_worker_cycles_total", job=job, outcome=outcome)
                for outcome in ("ok", "failed")
            )
        )

    def wait_for_worker(self, job: str = "mail", timeout: float = 30) -> None:
        """Until a run of `job` that started after this call has completed: whatever was due
        before the call has been handled (for mail: sent, or its failure recorded), so a test
        can check that nothing more was sent without sleeping on the worker's period."""
        # Runs of a job follow one another: once as many have completed as had begun, plus
        # one, a run that began after this call has completed.
        wanted = int(self.metric("tally_worker_starts_total", job=job)) + 1
        deadline = time.monotonic() + timeout
        while self.worker_runs(job) < wanted:
            assert time.monotonic() < deadline, f"the worker's {job} job did not run"
            time.sleep(0.05)


@contextmanager
def running(
    kind: str,
    directory: Path,
    *,
    workers: int = 1,
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> Iterator[Server]:
    with _database_url(kind, directory) as url:
        server = Server(url, directory, workers=workers, env=env, port=port)
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


# --- talking to it ----------------------------------------------------------------------------


class Api:
    """One key's view of a server over httpx: every POST carries a fresh Idempotency-Key unless
    the test names one (or, with `idempotency_key=""`, sends none)."""

    def __init__(self, server: Server, key: str) -> None:
        self.http = httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def close(self) -> None:
        self.http.close()

    def get(self, path: str, **params: str | int) -> httpx.Response:
        return self.http.get(path, params=params)

    def put(self, path: str, body: Any = None) -> httpx.Response:
        return self.http.put(path, json=body)

    def post(
        self, path: str, body: Any = None, *, idempotency_key: str | None = None
    ) -> httpx.Response:
        key = secrets.token_hex(12) if idempotency_key is None else idempotency_key
        headers = {"Idempotency-Key": key} if key else {}
        return self.http.post(path, json=body, headers=headers)

    def grant(self, account: str, amount: int, **fields: Any) -> dict[str, Any]:
        body = {"amount": amount, "reason": "test stock", **fields}
        return ok(self.post(f"/v1/accounts/{account}/grants", body), 201)

    def balance(self, account: str, **params: str) -> dict[str, Any]:
        return ok(self.get(f"/v1/accounts/{account}/balance", **params))


def ok(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    """The JSON body of a success with exactly `status`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    return body


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The RFC 9457 body of a refusal with exactly `status` and Tally's `code`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    assert body["status"] == status
    assert body["type"] == "about:blank"
    assert isinstance(body["title"], str)
    assert body["title"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body
