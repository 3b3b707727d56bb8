"""Commerce throughput: fulfilments from webhook to outbox row, and redemptions, beside the
in-process debit rate of bench/ledger.py measured in the same run.

For each database (SQLite, PostgreSQL) it measures, for a fixed time each:
- `debit`: bench/ledger.py's Tally path (8 threads, one group commit): the ledger's own pace;
- `fulfil in-process`: 8 threads calling the `fulfil` use case with fresh sale ids (an order,
  a code and an outbox row per sale, one transaction each);
- `fulfil over HTTP`: Gumroad-format pings (as JSON, which the webhook takes beside the form
  encoding Gumroad uses) from 8 keep-alive connections of bench/http.py's raw client to a real
  `tally serve` (on PostgreSQL one process per core, the documented production command, as
  in bench/http.py; 1 on SQLite), counted from the first byte sent to the 200 that follows
  the committed outbox row;
- `redeem in-process`: 8 threads redeeming codes made beforehand (each a lot on a new account).

    .venv/bin/python bench/commerce.py [--seconds 5] [--only sqlite|postgresql]

Target: at least 300 fulfilments/s over HTTP on PostgreSQL. Machines are noisy: the
ratios to the debit rate of the same run say more than the absolute rates.
"""

from __future__ import annotations

import sys
from pathlib import Path

if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: keep bench/ out of the module path (bench/http.py)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import itertools
import json
import os
import secrets
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from bench.http import (
    PRODUCTION_WORKERS,
    Post,
    Server,
    _healthy,
    _stop,
    free_port,
    postgres_schema_url,
    raw_clients,
    tally,
)
from bench.ledger import postgres_database, rate, seed, settle, sqlite_database, tally_workers
from sqlalchemy import select

from tally.adapters.catalog_file import builtin
from tally.adapters.db.engine import Database
from tally.adapters.db.schema import outbox
from tally.adapters.db.uow import SqlUnitOfWork
from tally.bootstrap import system_clock
from tally.domain import codes
from tally.domain.commerce import Sale
from tally.service import commerce, issuing

THREADS = 8
HTTP_CLIENTS = 8
ACCOUNTS = 1_000
CODES_STOCK = 20_000
TARGET_FULFILMENTS = 300.0
TOKEN = "bench-token"
SELLER = "bench-seller"
PEPPER = codes.pepper("bench secret")
LINKS = issuing.Links("http://bench/redeem", "http://bench/lost-code", "bench@bench", "bench")
PACKAGE = builtin().packages["pro"]
TALLY_CMD = str(Path(sys.executable).with_name("tally"))


def _sale(sale_id: str) -> Sale:
    return Sale(
        processor="gumroad",
        sale_id=sale_id,
        package=PACKAGE,
        email=f"{sale_id}@example.com",
        purchased_at=datetime.now(UTC),
        price=2000,
    )


def threads_rate(work: Callable[[int], None], seconds: float) -> float:
    """Calls per second of `work(n)` from THREADS threads, n unique across them."""
    counter = itertools.count()
    done = [0] * THREADS
    stop = threading.Event()
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            while not stop.is_set():
                work(next(counter))
                done[index] += 1
        except BaseException as error:  # reported after the run
            errors.append(error)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    began = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return sum(done) / (time.perf_counter() - began)


def fulfil_rate(db: Database, seconds: float) -> float:
    prefix = secrets.token_hex(4)

    def fulfil(n: int) -> None:
        done = commerce.fulfil(
            _sale(f"{prefix}-{n}"), SqlUnitOfWork(db, system_clock), pepper=PEPPER, links=LINKS
        )
        assert done.created

    return threads_rate(fulfil, seconds)


def redeem_rate(db: Database, seconds: float, stock: int) -> float:
    """Codes are made first (their plaintext read from the outbox rows), then redeemed."""
    prefix = secrets.token_hex(4)
    uow = SqlUnitOfWork(db, system_clock)
    for n in range(stock):
        commerce.fulfil(_sale(f"stock-{prefix}-{n}"), uow, pepper=PEPPER, links=LINKS)
    with db.engine.connect() as connection:
        found = [row[0]["code"] for row in connection.execute(select(outbox.c.context))]
    plaintexts = found[-stock:]

    def redeem(n: int) -> None:
        commerce.redeem(
            commerce.Redeem(
                code=plaintexts[n],
                account_id=f"r-{prefix}-{n}",
                idempotency_key=f"{prefix}{n}",
                platform_id="plt_bench",  # as a tool site redeems (see service/limits.py)
            ),
            SqlUnitOfWork(db, system_clock),
            pepper=PEPPER,
        )

    return threads_rate(redeem, seconds)


@contextmanager
def shop(database_url: str, workers: int, directory: str) -> Iterator[Server]:
    """`tally serve` selling through Gumroad pings."""
    env = {
        **os.environ,
        "TALLY_DATABASE_URL": database_url,
        "TALLY_PAYMENTS": "gumroad",
        "TALLY_GUMROAD_WEBHOOK_TOKEN": TOKEN,
        "TALLY_GUMROAD_SELLER_ID": SELLER,
        "TALLY_SECRET_KEY": "bench secret",
        "TALLY_ENV": "production",
        "TALLY_WORKER": "off",  # the outbox row is the finish line; sending is another job
        "TALLY_SMTP_URL": "smtp://127.0.0.1:9",  # production needs one; nothing is sent
    }
    tally(env, directory, "migrate")
    port = free_port()
    log = Path(directory) / f"shop-{port}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [TALLY_CMD, "serve", "--port", str(port), "--workers", str(workers)],
            env=env,
            cwd=directory,
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while not _healthy(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tally serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield Server(process, f"http://127.0.0.1:{port}", "", workers, log)
    finally:
        _stop(process)


def webhook_rate(server: Server, seconds: float) -> float:
    """Pings (JSON, which the webhook takes beside Gumroad's form encoding) from HTTP_CLIENTS
    keep-alive connections of bench/http.py's raw client, which costs the server's cores less
    than httpx would."""
    prefix = secrets.token_hex(4)
    counter = itertools.count()
    path = f"/webhooks/gumroad/{TOKEN}"

    def ping(n: int) -> bytes:
        sale = f"{prefix}-{n}"
        fields = {
            "seller_id": SELLER,
            "sale_id": sale,
            "product_permalink": "https://bench.gumroad.com/l/pro",
            "email": f"{sale}@example.com",
            "price": "2000",
            "currency": "usd",
            "quantity": "1",
            "resource_name": "sale",
        }
        return json.dumps(fields).encode()

    async def run() -> float:
        async with raw_clients(server, HTTP_CLIENTS) as posts:
            for _ in range(20):  # warm up
                status, body = await posts[0](path, ping(next(counter)), "-")
                assert status == 200, body
            done = 0
            stop_at = time.perf_counter() + seconds

            async def one_client(post: Post) -> None:
                nonlocal done
                while time.perf_counter() < stop_at:
                    status, body = await post(path, ping(next(counter)), "-")
                    assert status == 200, body
                    done += 1

            began = time.perf_counter()
            await asyncio.gather(*(one_client(post) for post in posts))
            return done / (time.perf_counter() - began)

    return asyncio.run(run())


@dataclass
class Row:
    kind: str
    debit: float
    fulfil: float
    webhook: float
    redeem: float


def measure(
    kind: str,
    db: Database,
    shop_url: Callable[[], AbstractContextManager[str]],
    seconds: float,
    workers: int,
) -> Row:
    """In-process figures on `db`; the HTTP figure on a fresh, migrated database."""
    names = [f"user-{n:05d}" for n in range(ACCOUNTS)]
    seed(db, names)
    settle(db)
    debit = rate(tally_workers(db), db, names, THREADS, seconds)
    print(f"[{kind}] debit in-process          {debit:8.0f}/s", flush=True)
    fulfil = fulfil_rate(db, seconds)
    print(f"[{kind}] fulfil in-process         {fulfil:8.0f}/s", flush=True)
    redeem = redeem_rate(db, seconds, stock=min(CODES_STOCK, int(fulfil * seconds * 2) + 100))
    print(f"[{kind}] redeem in-process         {redeem:8.0f}/s", flush=True)
    with (
        shop_url() as url,
        tempfile.TemporaryDirectory() as directory,
        shop(url, workers, directory) as server,
    ):
        webhook = webhook_rate(server, seconds)
    print(f"[{kind}] fulfil over HTTP ({workers} proc) {webhook:8.0f}/s", flush=True)
    return Row(kind, debit, fulfil, webhook, redeem)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--only", choices=("sqlite", "postgresql"))
    options = parser.parse_args()
    rows = []
    if options.only in (None, "sqlite"):
        with tempfile.TemporaryDirectory() as directory, sqlite_database(directory) as db:

            @contextmanager
            def sqlite_url() -> Iterator[str]:
                yield f"sqlite:///{directory}/shop.db"

            rows.append(measure("sqlite", db, sqlite_url, options.seconds, 1))
    if options.only in (None, "postgresql"):
        with postgres_database() as db:
            rows.append(
                measure("postgresql", db, postgres_schema_url, options.seconds, PRODUCTION_WORKERS)
            )
    print()
    print(
        "| database | debits/s | fulfilments/s in-process | fulfilments/s over HTTP | "
        "redemptions/s | HTTP fulfilments / debits |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row.kind} | {row.debit:,.0f} | {row.fulfil:,.0f} | {row.webhook:,.0f} | "
            f"{row.redeem:,.0f} | {row.webhook / row.debit:.0%} |"
        )
    print()
    for row in rows:
        if row.kind == "postgresql":
            ok = row.webhook >= TARGET_FULFILMENTS
            print(
                f"{'PASS' if ok else 'MISS'}  PostgreSQL fulfilments over HTTP: "
                f"{row.webhook:.0f}/s (target >= {TARGET_FULFILMENTS:.0f}/s)"
            )


if __name__ == "__main__":
    main()
