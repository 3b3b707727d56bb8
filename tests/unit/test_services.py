"""When a service the tests need (PostgreSQL, Chromium) is missing: CI fails, a developer's
run skips and says so in one line at the end; PostgreSQL that answers but refuses the tests
(a wrong database name, a refused login) is an error everywhere."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy.engine import make_url

from tests import support
from tests.conftest import skipped_services_line
from tests.support import ServiceMisconfigured, free_port, is_ci, postgres_missing, require_service

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "value", ["1", "true", "TRUE", "True", "yes", "YES", "on", "On", " true ", "github-actions"]
)
def test_any_true_ci_value_requires_every_service(value: str) -> None:
    assert is_ci({"CI": value})
    with pytest.raises(pytest.fail.Exception, match="Frobnicator is missing, and CI="):
        require_service("Frobnicator is missing", environ={"CI": value})


@pytest.mark.parametrize("environ", [{}, {"CI": ""}, {"CI": "0"}, {"CI": "false"}, {"CI": "No"}])
def test_outside_ci_a_missing_service_skips_and_is_remembered(
    environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    remembered: dict[str, None] = {}
    monkeypatch.setattr(support, "SKIPPED_SERVICES", remembered)
    assert not is_ci(environ)
    with pytest.raises(pytest.skip.Exception, match="Frobnicator is missing"):
        require_service("Frobnicator is missing", environ=environ)
    assert list(remembered) == ["Frobnicator is missing"]
    require_service(None, environ=environ)  # present: nothing happens
    require_service(None, environ={"CI": "true"})
    assert list(remembered) == ["Frobnicator is missing"]


def test_the_end_of_run_line_counts_the_skips_per_reason() -> None:
    def skip(message: str) -> SimpleNamespace:
        return SimpleNamespace(longrepr=("tests/x.py", 1, f"Skipped: {message}"))

    reports = [skip("PostgreSQL is down"), skip("PostgreSQL is down"), skip("no Chromium")]
    reports.append(skip("an unrelated skip"))
    assert skipped_services_line([], reports) is None
    assert skipped_services_line(["no Chromium"], reports) == (
        "SKIPPED 1 test for want of a service: no Chromium. With CI=1 they fail instead."
    )
    assert skipped_services_line(["PostgreSQL is down", "no Chromium"], reports) == (
        "SKIPPED 3 tests for want of a service: PostgreSQL is down (2 tests); "
        "no Chromium (1 test). With CI=1 they fail instead."
    )


@pytest.mark.parametrize(("ci", "status"), [(None, 0), ("1", 1)])
def test_a_real_run_ends_with_the_line_or_fails_in_ci(
    tmp_path: Path, ci: str | None, status: int
) -> None:
    (tmp_path / "test_needs.py").write_text(
        "from tests.support import require_service\n\n\n"
        "def test_needs_a_frobnicator() -> None:\n"
        '    require_service("Frobnicator is not installed")\n'
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-rs", str(tmp_path)],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == status, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    if status == 0:
        # The line, then only pytest's final count.
        assert lines[-2] == (
            "SKIPPED 1 test for want of a service: Frobnicator is not installed. "
            "With CI=1 they fail instead."
        )
        assert "1 skipped" in lines[-1]
    else:
        assert f"Frobnicator is not installed, and CI={ci!r} requires it" in done.stdout
        assert "for want of a service" not in done.stdout
        assert "1 failed" in lines[-1]


# --- is PostgreSQL there? ---------------------------------------------------------------------


@contextmanager
def _refusing_postgres(sqlstate: str, message: str) -> Iterator[int]:
    """A server that speaks just enough of PostgreSQL's protocol to refuse every start-up with
    an ErrorResponse: what a wrong database name (3D000) or a refused password (28P01) is."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                while True:
                    head = connection.recv(8, socket.MSG_WAITALL)
                    if len(head) < 8:
                        break
                    length, code = struct.unpack("!ii", head)
                    connection.recv(length - 8, socket.MSG_WAITALL)
                    if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest: no
                        connection.sendall(b"N")
                        continue
                    fields = b"".join(
                        kind + value.encode() + b"\0"
                        for kind, value in ((b"S", "FATAL"), (b"C", sqlstate), (b"M", message))
                    )
                    body = fields + b"\0"
                    connection.sendall(b"E" + struct.pack("!i", len(body) + 4) + body)
                    break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        listener.close()
        thread.join(5)


def test_only_a_refused_connection_means_postgresql_is_not_running() -> None:
    port = free_port()
    missing = postgres_missing(f"postgresql://postgres:secret@127.0.0.1:{port}/test")
    assert missing == (
        f"PostgreSQL is not running at postgresql://postgres:***@127.0.0.1:{port}/test "
        "(connection refused)"
    )


@pytest.mark.parametrize(
    ("sqlstate", "message"),
    [
        ("3D000", 'database "tset" does not exist'),
        ("28P01", 'password authentication failed for user "postgres"'),
    ],
)
def test_a_postgresql_that_refuses_the_tests_is_an_error(sqlstate: str, message: str) -> None:
    with (
        _refusing_postgres(sqlstate, message) as port,
        pytest.raises(ServiceMisconfigured) as refused,
    ):
        postgres_missing(f"postgresql://postgres:secret@127.0.0.1:{port}/tset", timeout=2)
    assert message in str(refused.value)
    assert "secret" not in str(refused.value)


@pytest.mark.postgres
def test_a_wrong_database_name_on_the_real_server_is_an_error() -> None:
    support.require_postgres()
    wrong = make_url(support.POSTGRES_URL).set(database="tally_no_such_database")
    with pytest.raises(ServiceMisconfigured, match="does not exist"):
        postgres_missing(wrong.render_as_string(hide_password=False))
    assert postgres_missing(support.POSTGRES_URL) is None
