"""The `tally` command as an operator runs it: a real process on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tally.adapters.db.engine import normalise_url
from tests.conftest import DATABASES
from tests.support import free_port, postgres_schema

ROOT = Path(__file__).resolve().parents[2]
TALLY = str(Path(sys.executable).parent / "tally")


class Cli:
    def __init__(self, url: str) -> None:
        self.url = url

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TALLY_DATABASE_URL": self.url}
        done = subprocess.run(  # noqa: PLW1510 - the caller asserts on the code
            [TALLY, *args], capture_output=True, text=True, env=env, timeout=60
        )
        if ok:
            assert done.returncode == 0, done.stderr
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args).stdout)


def _cli(kind: str, directory: Path) -> Iterator[Cli]:
    if kind == "sqlite":
        yield Cli(f"sqlite:///{directory}/cli.db")
    else:
        with postgres_schema() as url:
            yield Cli(url)


@pytest.fixture(params=DATABASES)
def cli(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cli]:
    yield from _cli(request.param, tmp_path)


@pytest.fixture(scope="module", params=DATABASES)
def ana(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    """One migrated database per backend where `ana` has 5 credits, shared by refusal tests."""
    for cli in _cli(request.param, tmp_path_factory.mktemp("ana")):
        cli.run("migrate")
        cli.run("grant", "ana", "5")
        yield cli


def test_operator_session(cli: Cli) -> None:
    assert "revision 0007" in cli.run("migrate").stdout
    lot = cli.json("grant", "ana", "25", "--source", "purchase", "--reason", "Pro package")
    assert lot["amount"] == 25
    assert lot["source"] == "purchase"
    assert lot["id"].startswith("lot_")
    assert lot["expires_at"][:4] == str(int(lot["created_at"][:4]) + 2)  # P2Y by default
    promo = cli.json("grant", "ana", "5", "--valid-for", "P7D", "--idempotency-key", "promo-1")
    assert (
        cli.json("grant", "ana", "5", "--valid-for", "P7D", "--idempotency-key", "promo-1") == promo
    )
    hold = cli.json("hold", "ana", "4")
    assert hold["allocations"] == [{"lot_id": promo["id"], "amount": 4}]
    captured = cli.json("capture", hold["id"], "--amount", "3")
    assert captured["status"] == "captured"
    assert captured["captured"] == 3
    debit = cli.json("debit", "ana", "2")
    assert debit["amount"] == 2
    balance = cli.json("balance", "ana")
    # 30 granted, 3 captured, 2 debited: the promo lot is spent first, so Pro is next.
    assert balance == {
        "account_id": "ana",
        "available": 25,
        "held": 0,
        "debt": 0,
        "allowances": {},
        "next_expiry": {"at": lot["expires_at"], "amount": 25},
    }
    past = cli.json("balance", "ana", "--at", lot["created_at"])
    assert past["available"] == 25
    assert cli.run("check").stdout.startswith("ok: conservation holds")
    assert "swept 0 accounts" in cli.run("sweep").stdout
    kinds = [e["type"] for e in cli.json("entries", "ana", "--limit", "500")]
    assert kinds == ["debit", "release", "capture", "hold", "grant", "grant"]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("grant", "ana", "5.0"), "invalid_amount"),
        (("grant", "ana", "--", "-3"), "invalid_amount"),
        (("grant", "ana", "9007199254740993"), "invalid_amount"),
        (("grant", "ana", "1", "--valid-for", "two years"), "invalid_duration"),
        (("grant", "ana", "1", "--expires-at", "2030-01-01"), "invalid_time"),
        (("grant", "bad id!", "1"), "invalid_account_id"),
        (("debit", "ghost", "1"), "account_not_found"),
        (("debit", "ana", "1000"), "insufficient_credits"),
        (("capture", "hold_00000000000000000000000000"), "hold_not_found"),
        (("balance", "ana", "--at", "yesterday"), "invalid_time"),
    ],
)
def test_refusals_print_a_problem_and_exit_1_and_change_nothing(
    ana: Cli, args: tuple[str, ...], code: str
) -> None:
    assert _ledger(ana) == ANA
    done = ana.run(*args, ok=False)
    assert done.returncode == 1
    assert json.loads(done.stderr.strip().splitlines()[-1])["code"] == code
    assert _ledger(ana) == ANA  # each refusal, whichever ran before it


#: ana's 5 credits, as the shared database holds them: every refusal must leave exactly this.
ANA = {"accounts": ["ana"], "entries": [("ana", "grant", 5)], "lots": [("ana", 5, 5)], "holds": 0}


def _ledger(cli: Cli) -> dict[str, Any]:
    """Everything a refusal could have written, read from the database beside the CLI."""
    engine = create_engine(normalise_url(cli.url))
    try:
        with engine.connect() as connection:

            def rows(sql: str) -> list[Any]:
                return [tuple(row) for row in connection.execute(text(sql))]

            return {
                "accounts": [a for (a,) in rows("SELECT account_id FROM accounts")],
                "entries": rows("SELECT account_id, type, amount FROM entries ORDER BY seq"),
                "lots": rows("SELECT account_id, amount, remaining FROM lots"),
                "holds": rows("SELECT count(*) FROM holds")[0][0],
            }
    finally:
        engine.dispose()


def test_check_exits_1_and_lists_violations(cli: Cli) -> None:
    cli.run("migrate")
    lot = cli.json("grant", "bo", "5")
    engine = create_engine(normalise_url(cli.url))
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE lots SET remaining = 4 WHERE lot_id = :id"), {"id": lot["id"]}
        )
    engine.dispose()
    done = cli.run("check", ok=False)
    assert done.returncode == 1
    assert f"violation: lot {lot['id']}: rule 6" in done.stdout
    assert "FAILED: 1 violations" in done.stdout


def test_make_run_tour_works_on_a_fresh_sqlite_database(tmp_path: Path) -> None:
    env = {**os.environ, "TALLY_DATABASE_URL": f"sqlite:///{tmp_path}/tour.db"}
    subprocess.run([TALLY, "migrate"], check=True, env=env, capture_output=True)
    done = subprocess.run(
        ["bash", "scripts/tour.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert '"available": 26' in done.stdout
    assert "ok: conservation holds" in done.stdout


def test_platforms_and_keys_from_the_command_line(cli: Cli) -> None:
    cli.run("migrate")
    made = cli.run("platforms", "create", "portraits", "--scopes", "read,spend").stdout
    key = made.strip().splitlines()[-1]
    prefix = key.rsplit("_", 1)[0]
    assert key.startswith("tly_")
    assert "read,spend" in made
    again = cli.run("platforms", "create", "portraits", ok=False)
    assert again.returncode == 1
    assert json.loads(again.stderr)["code"] == "platform_exists"
    second = cli.run("keys", "create", "portraits", "--scopes", "grant").stdout
    assert second.strip().splitlines()[-1] != key
    missing = cli.run("keys", "create", "nobody", ok=False)
    assert json.loads(missing.stderr)["code"] == "platform_not_found"
    bad_scope = cli.run("keys", "create", "portraits", "--scopes", "write", ok=False)
    assert json.loads(bad_scope.stderr)["code"] == "invalid_input"

    listed = cli.run("keys", "list").stdout
    assert prefix in listed
    assert key not in listed  # the secret is shown once, at creation
    assert listed.count("active") == 2
    assert cli.run("keys", "revoke", prefix).stdout.startswith(f"revoked {prefix}")
    assert f"{prefix}  portraits  read,spend" in cli.run("keys", "list").stdout
    assert cli.run("keys", "list").stdout.count("revoked") == 1
    unknown = cli.run("keys", "revoke", "tly_0000000000", ok=False)
    assert json.loads(unknown.stderr)["code"] == "api_key_not_found"


def test_make_run_serves_the_api_with_a_demo_key(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "TALLY_DATABASE_URL": f"sqlite:///{tmp_path}/run.db",
        "TALLY_PORT": str(port),
    }
    work = tmp_path / "work"
    (work / "scripts").mkdir(parents=True)
    (work / "scripts" / "run.sh").write_text((ROOT / "scripts" / "run.sh").read_text())
    (work / ".venv").symlink_to(ROOT / ".venv")
    process = subprocess.Popen(
        ["bash", "scripts/run.sh"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline, "make run never answered"
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        key = (work / "var" / "demo.key").read_text().strip()
        headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "tour"}
        lot = httpx.post(
            f"{base}/v1/accounts/alice/grants",
            json={"amount": 10, "reason": "welcome"},
            headers=headers,
        )
        assert lot.status_code == 201, lot.text
        balance = httpx.get(f"{base}/v1/accounts/alice/balance", headers=headers).json()
        assert balance["available"] == 10
    finally:
        process.terminate()
        output = process.communicate(timeout=15)[0].decode()
    assert f"http://127.0.0.1:{port}/docs" in output
    assert key in output
