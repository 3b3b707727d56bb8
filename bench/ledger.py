"""Ledger throughput, measured as ratios against a raw baseline in the same run.

For each database (SQLite, PostgreSQL), each shape (10,000 accounts, one hot account) and each
worker count (1, 8, 32 threads), it runs Tally's `debit` use case for a fixed time (the threads
share one group commit, as the threads of one Tally process do), and beside it
a raw baseline on the same database through the same driver: one UPDATE plus one INSERT per
transaction. Each figure is the median of paired rounds (Tally, then raw). It then reads the
balance of an account with 100,000 entries and of one with 10.

    .venv/bin/python bench/ledger.py [--seconds 2] [--rounds 3] [--only sqlite|postgresql]

Machines are noisy: compare the ratios, not the absolute rates.
"""

from __future__ import annotations

import sys
from pathlib import Path

if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: keep bench/ out of the module path (bench/http.py)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import itertools
import os
import random
import secrets
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tally.adapters.db.engine import Database, connect
from tally.adapters.db.schema import metadata
from tally.adapters.db.uow import SqlUnitOfWork
from tally.bootstrap import group_commit, system_clock
from tally.domain.model import Account, Origin
from tally.service import ledger
from tally.service.group_commit import GroupCommit

POSTGRES_URL = os.environ.get(
    "TALLY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
ACCOUNTS = 10_000
WORKERS = tuple(int(w) for w in os.environ.get("BENCH_WORKERS", "1,8,32").split(","))
STOCK = 10**12
SEED_BATCH = 1_000
HISTORY = 100_000
READS = 2_000
#: Issue 2's target for SQLite, 10,000 accounts, 1 worker: Tally at least this share of raw.
SQLITE_ONE_WORKER_TARGET = 0.30


# --- databases ------------------------------------------------------------------------------


@contextmanager
def sqlite_database(directory: str) -> Iterator[Database]:
    db = connect(f"sqlite:///{directory}/bench.db", pool_size=max(WORKERS) + 4)
    metadata.create_all(db.engine)
    try:
        yield db
    finally:
        db.dispose()


@contextmanager
def postgres_database() -> Iterator[Database]:
    schema = f"tally_bench_{secrets.token_hex(4)}"
    admin = create_engine(make_url(POSTGRES_URL).set(drivername="postgresql+psycopg"))
    with admin.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    db = connect(url.render_as_string(hide_password=False), pool_size=max(WORKERS) + 4)
    try:
        metadata.create_all(db.engine)
        yield db
    finally:
        db.dispose()
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def grant_stock(account: Account, now: datetime, origin: Origin) -> None:
    """A lot large enough that no benchmark runs it dry."""
    account.grant(
        amount=STOCK, source="promotional", expires_at=None, priority=0, now=now, origin=origin
    )


def seed(db: Database, names: list[str]) -> None:
    """Grant every account a large lot, a thousand accounts per transaction."""
    uow = SqlUnitOfWork(db, system_clock)
    origin = Origin("seed")
    for start in range(0, len(names), SEED_BATCH):
        with uow:
            now = uow.clock()
            for name in names[start : start + SEED_BATCH]:
                account = uow.accounts.get_for_update(name, create_at=now)
                assert account is not None
                grant_stock(account, now, origin)
                uow.accounts.save(account)
            uow.commit()


# --- the raw baseline: one UPDATE and one INSERT per transaction ------------------------------


def create_raw(db: Database, names: list[str]) -> None:
    with db.engine.begin() as connection:
        connection.execute(
            text("CREATE TABLE raw_balances (account_id VARCHAR(128) PRIMARY KEY, balance BIGINT)")
        )
        connection.execute(
            text(
                "CREATE TABLE raw_entries (entry_id VARCHAR(40) PRIMARY KEY, "
                "account_id VARCHAR(128), amount BIGINT)"
            )
        )
        connection.execute(
            text("INSERT INTO raw_balances VALUES (:a, :b)"),
            [{"a": name, "b": STOCK} for name in names],
        )


def settle(db: Database) -> None:
    """Vacuum and analyse the freshly seeded tables, as pgbench does before it measures: without
    it, whichever side runs first pays for the seeding's dead rows, hint bits and missing
    statistics."""
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE" if db.dialect == "postgresql" else "ANALYZE"))


Worker = tuple[Callable[[str], None], Callable[[], None]]


def unique_strings() -> Iterator[str]:
    """Entry ids and idempotency keys for one worker: a random prefix and a counter. The
    load must cost both sides little, and the same: drawing each from the OS is a system
    call, and in a threaded process every system call hands the GIL to another thread."""
    prefix = secrets.token_hex(8)
    return (f"{prefix}-{n}" for n in itertools.count())


def raw_worker(db: Database) -> Worker:
    """A driver connection of the same engine (same pragmas), used with no ORM or Core."""
    raw = db.engine.raw_connection()
    cursor = raw.cursor()
    sqlite = db.dialect == "sqlite"
    mark = "?" if sqlite else "%s"
    update = f"UPDATE raw_balances SET balance = balance - 1 WHERE account_id = {mark}"
    insert = f"INSERT INTO raw_entries VALUES ({mark}, {mark}, 1)"
    lock = db.write_lock  # the same one-writer rule Tally's SQLite adapter follows

    entry_ids = unique_strings()

    def debit(account: str) -> None:
        if lock is not None:
            lock.acquire()
        try:
            if sqlite:
                cursor.execute("BEGIN IMMEDIATE")
            cursor.execute(update, (account,))
            cursor.execute(insert, (next(entry_ids), account))
            if sqlite:
                cursor.execute("COMMIT")
            else:
                raw.commit()
        finally:
            if lock is not None:
                lock.release()

    return debit, raw.close


def tally_workers(db: Database) -> Callable[[Database], Worker]:
    """Workers sharing one group commit, as the threads of one Tally process do."""
    group = group_commit(db, system_clock)
    return lambda db: tally_worker(db, group)


def tally_worker(db: Database, group: GroupCommit | None = None) -> Worker:
    uow = SqlUnitOfWork(db, system_clock, group)
    keys = unique_strings()

    def debit(account: str) -> None:
        ledger.debit(
            ledger.DebitCredits(account_id=account, amount=1, idempotency_key=next(keys)),
            uow,
        )

    return debit, lambda: None


# --- running ----------------------------------------------------------------------------------


def rate(
    make_worker: Callable[[Database], Worker],
    db: Database,
    names: list[str],
    workers: int,
    seconds: float,
) -> float:
    """Debits per second with `workers` threads, each picking accounts from `names`."""
    done = [0] * workers
    errors: list[BaseException] = []
    start = threading.Barrier(workers + 1)
    stop = threading.Event()

    def run(index: int) -> None:
        debit, close = make_worker(db)
        choose = random.Random(secrets.randbits(64)).choice
        start.wait()
        try:
            while not stop.is_set():
                debit(choose(names))
                done[index] += 1
        except BaseException as error:
            errors.append(error)
        finally:
            close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    return sum(done) / elapsed


def history(db: Database, account: str, entries: int) -> None:
    """Give `account` a journal of `entries` debits, written through the domain in batches."""
    uow = SqlUnitOfWork(db, system_clock)
    origin = Origin("history")
    written = 0
    while written < entries:
        with uow:
            now = uow.clock()
            loaded = uow.accounts.get_for_update(account, create_at=now)
            assert loaded is not None
            if written == 0:
                grant_stock(loaded, now, origin)
                written += 1
            for _ in range(min(10_000, entries - written)):
                loaded.debit(amount=1, now=now, origin=origin)
                written += 1
            uow.accounts.save(loaded)
            uow.commit()


def balance_p50s(db: Database, accounts: tuple[str, ...]) -> list[float]:
    """The p50 read time of each account's balance. The reads take turns, one of each account
    per round, so that a noisy moment on the machine slows every account alike."""
    uow = SqlUnitOfWork(db, system_clock)
    timings: list[list[float]] = [[] for _ in accounts]
    for _ in range(READS):
        for account, taken in zip(accounts, timings, strict=True):
            began = time.perf_counter()
            ledger.get_balance(account, uow)
            taken.append(time.perf_counter() - began)
    return [statistics.median(taken) for taken in timings]


@dataclass
class Row:
    database: str
    shape: str
    workers: int
    tally: float
    raw: float

    @property
    def ratio(self) -> float:
        return self.tally / self.raw


def bench(
    kind: str, db: Database, seconds: float, rounds_each: int
) -> tuple[list[Row], dict[str, float]]:
    names = [f"user-{n:05d}" for n in range(ACCOUNTS)]
    hot = ["hot-account"]
    print(f"[{kind}] seeding {ACCOUNTS} accounts ...", flush=True)
    seed(db, names + hot)
    create_raw(db, names + hot)
    settle(db)
    rows = []
    for shape, pool in (("10,000 accounts", names), ("one hot account", hot)):
        for workers in WORKERS:
            # Paired rounds, Tally then raw, so that a noisy moment hits both sides of one
            # round; the figure is the median round.
            rounds = []
            for _ in range(rounds_each):
                tally = rate(tally_workers(db), db, pool, workers, seconds)
                raw = rate(raw_worker, db, pool, workers, seconds)
                rounds.append(Row(kind, shape, workers, tally, raw))
            row = sorted(rounds, key=lambda r: r.ratio)[len(rounds) // 2]
            rows.append(row)
            print(
                f"[{kind}] {shape:<16} {workers:>2} workers: tally {row.tally:8.0f}/s  "
                f"raw {row.raw:8.0f}/s  ratio {row.ratio:5.0%}  "
                f"(rounds: {', '.join(f'{r.ratio:.0%}' for r in rounds)})",
                flush=True,
            )
    print(f"[{kind}] writing a {HISTORY:,}-entry journal ...", flush=True)
    history(db, "long-history", HISTORY)
    history(db, "short-history", 10)
    long_p50, short_p50 = balance_p50s(db, ("long-history", "short-history"))
    reads = {"long_ms": long_p50 * 1000, "short_ms": short_p50 * 1000}
    print(
        f"[{kind}] balance p50: {HISTORY:,} entries {long_p50 * 1000:.3f} ms, 10 entries "
        f"{short_p50 * 1000:.3f} ms, ratio {long_p50 / short_p50:.2f}x",
        flush=True,
    )
    return rows, reads


def verdict(label: str, value: float, target: float, higher: bool = True) -> str:
    ok = value >= target if higher else value <= target
    sign = ">=" if higher else "<="
    return f"{'PASS' if ok else 'MISS'}  {label}: {value:.2f} (target {sign} {target})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds per figure")
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    results: dict[str, tuple[list[Row], dict[str, float]]] = {}
    if args.only in (None, "sqlite"):
        with tempfile.TemporaryDirectory() as directory, sqlite_database(directory) as db:
            results["sqlite"] = bench("sqlite", db, args.seconds, args.rounds)
    if args.only in (None, "postgresql"):
        with postgres_database() as db:
            results["postgresql"] = bench("postgresql", db, args.seconds, args.rounds)

    print("\n| database | shape | workers | Tally debits/s | raw debits/s | Tally / raw |")
    print("|---|---|---:|---:|---:|---:|")
    for rows, _ in results.values():
        for row in rows:
            print(
                f"| {row.database} | {row.shape} | {row.workers} | {row.tally:,.0f} | "
                f"{row.raw:,.0f} | {row.ratio:.0%} |"
            )
    print()
    for kind, (_, reads) in results.items():
        print(
            f"| {kind} balance read p50 | 100,000 entries {reads['long_ms']:.3f} ms | "
            f"10 entries {reads['short_ms']:.3f} ms | {reads['long_ms'] / reads['short_ms']:.2f}x |"
        )
    print()

    def find(kind: str, shape: str, workers: int) -> Row:
        return next(
            r for r in results[kind][0] if r.shape.startswith(shape) and r.workers == workers
        )

    if "sqlite" in results:
        print(
            verdict(
                "SQLite, 10,000 accounts, 1 worker, Tally/raw",
                find("sqlite", "10", 1).ratio,
                SQLITE_ONE_WORKER_TARGET,
            )
        )
        reads = results["sqlite"][1]
        print(
            verdict(
                "SQLite balance p50, 100k/10 entries",
                reads["long_ms"] / reads["short_ms"],
                1.5,
                higher=False,
            )
        )
    if "postgresql" in results:
        many = find("postgresql", "10", 8)
        hot = find("postgresql", "one", 8)
        print(verdict("PostgreSQL, 10,000 accounts, 8 workers, Tally/raw", many.ratio, 0.40))
        print(verdict("PostgreSQL, hot/many accounts, 8 workers", hot.tally / many.tally, 0.50))
        reads = results["postgresql"][1]
        print(
            verdict(
                "PostgreSQL balance p50, 100k/10 entries",
                reads["long_ms"] / reads["short_ms"],
                1.5,
                higher=False,
            )
        )


if __name__ == "__main__":
    main()
