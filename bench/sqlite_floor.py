"""Where a one-worker SQLite debit's time goes: Tally, its own SQL by hand, and the raw baseline.

bench/ledger.py compares Tally's `debit` with one UPDATE plus one INSERT per transaction. On
SQLite with one worker that ratio moves from machine to machine more than with the code: the
raw transaction costs little CPU and mostly waits for its fsync, while Tally's costs mostly CPU.
This script splits the gap, on one database, in paired rounds (these machines are noisy):

- Tally: the `debit` use case, as bench/ledger.py runs it;
- by hand: the statements Tally sends for a debit (the very texts its repositories compile:
  the read of the account with its open lots, the account and lot updates, the journal entry,
  the idempotency key) with their arguments built directly, through the same connection,
  lock and pragmas. No implementation on this schema can cost less;
- raw: bench/ledger.py's baseline.

For each it prints the time per debit and the WAL frames (pages) each commit writes: with
`synchronous=FULL` a commit waits for its frames to reach the disk.
"""

from __future__ import annotations

import sys
from pathlib import Path

if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: keep bench/ out of the module path (bench/http.py)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import hashlib
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

from bench.ledger import (
    ACCOUNTS,
    SQLITE_ONE_WORKER_TARGET,
    Worker,
    create_raw,
    raw_worker,
    seed,
    settle,
    sqlite_database,
    tally_workers,
    unique_strings,
)

from tally.adapters.db import repository
from tally.adapters.db.engine import Database
from tally.adapters.db.fast import FastStatement
from tally.domain.values import new_id

#: Debits per WAL count: few enough that no automatic checkpoint (at 1,000 frames) runs.
FRAME_SAMPLE = 100
WARM_UP = 3_000


def by_hand(db: Database) -> Worker:
    """Tally's debit statements with arguments built directly: one lot per account (as seeded),
    one entry, one idempotency key, on the connection Tally writes through."""
    assert db.write_lock is not None, "SQLite only"
    with db.write_lock:
        writer = db.writer()
    driver = writer.connection.driver_connection
    assert driver is not None

    def compiled(statement: FastStatement) -> tuple[str, Callable[[dict[str, Any]], Any]]:
        # The text Tally runs, and its parameters in order; the values here come already in
        # the driver's forms, so none of Tally's own encoding (`FastStatement._arguments`) runs.
        found = statement._compiled(writer)
        assert found.positions is not None
        defaults, positions = found.defaults, found.positions
        if len(positions) == 1:  # itemgetter of one name answers the value, not a tuple
            return found.sql, lambda values: ({**defaults, **values}[positions[0]],)
        order = itemgetter(*positions)
        return found.sql, lambda values: order({**defaults, **values})

    read, read_arguments = compiled(repository._ACCOUNT)
    account_sql, account_arguments = compiled(repository._UPDATE_ACCOUNT_SEQ)
    lot_sql, lot_arguments = compiled(repository._UPDATE_LOT_REMAINING)
    entry_sql, entry_arguments = compiled(repository._INSERT_ENTRIES)
    key_sql, key_arguments = compiled(repository._IDEMPOTENCY_ADD)
    columns = [c[0] for c in driver.execute(read, read_arguments({"account_id": ""})).description]
    entry_seq, lot_lot_id, lot_remaining = (
        columns.index(name) for name in ("entry_seq", "lot_lot_id", "lot_remaining")
    )
    keys = unique_strings()
    lock = db.write_lock

    def debit(account_id: str) -> None:
        now = datetime.now(UTC)
        stamp = now.replace(tzinfo=None).isoformat(" ", "microseconds")  # as Tally writes it
        key = next(keys)
        with lock:
            driver.execute("BEGIN IMMEDIATE")
            row = driver.execute(read, read_arguments({"account_id": account_id})).fetchone()
            seq, lot_id, remaining = row[entry_seq] + 1, row[lot_lot_id], row[lot_remaining] - 1
            entry_id = new_id("ent", now)
            driver.execute(
                account_sql,
                account_arguments({"b_account_id": account_id, "b_entry_seq": seq}),
            )
            driver.execute(lot_sql, lot_arguments({"b_lot_id": lot_id, "b_remaining": remaining}))
            driver.execute(
                entry_sql,
                entry_arguments(
                    {
                        "entry_id": entry_id,
                        "account_id": account_id,
                        "seq": seq,
                        "type": "debit",
                        "amount": 1,
                        "lot_id": lot_id,
                        "hold_id": None,
                        "created_at": stamp,
                        "idempotency_key": key,
                        "platform_id": None,
                        "reason": None,
                        "metadata": None,
                    }
                ),
            )
            response = {
                "id": entry_id,
                "account_id": account_id,
                "amount": 1,
                "created_at": now.isoformat().replace("+00:00", "Z"),
                "allocations": [{"lot_id": lot_id, "amount": 1}],
                "entry_ids": [entry_id],
            }
            driver.execute(
                key_sql,
                key_arguments(
                    {
                        "scope": "local",
                        "key": key,
                        "request_hash": hashlib.sha256(key.encode()).hexdigest(),
                        "response": json.dumps(response, separators=(",", ":")),
                        "account_id": account_id,
                        "created_at": stamp,
                    }
                ),
            )
            driver.execute("COMMIT")

    return debit, lambda: None


def per_debit(debit: Callable[[str], None], names: list[str], count: int, seed: int) -> float:
    choose = random.Random(seed).choice
    began = time.perf_counter()
    for _ in range(count):
        debit(choose(names))
    return (time.perf_counter() - began) / count


def frames_per_commit(db: Database, debit: Callable[[str], None], names: list[str]) -> float:
    """WAL frames per debit: the WAL emptied, then grown by `FRAME_SAMPLE` debits."""
    wal = Path(str(db.engine.url.database) + "-wal")
    with db.engine.connect() as connection:
        driver = connection.connection.driver_connection
        assert driver is not None
        busy, _, _ = driver.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0, "no reader held the WAL"
        page: int = driver.execute("PRAGMA page_size").fetchone()[0]
    assert wal.stat().st_size == 0, "the checkpoint emptied the WAL"
    per_debit(debit, names, FRAME_SAMPLE, seed=0)
    frames = (wal.stat().st_size - 32) / (page + 24)  # a WAL header, then a header per frame
    return frames / FRAME_SAMPLE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--debits", type=int, default=3_000, help="per side per round")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds")
    args = parser.parse_args()
    names = [f"user-{n:05d}" for n in range(ACCOUNTS)]
    with tempfile.TemporaryDirectory() as directory, sqlite_database(directory) as db:
        print(f"seeding {ACCOUNTS} accounts ...", flush=True)
        seed(db, names)
        create_raw(db, names)
        settle(db)
        sides: dict[str, Callable[[Database], Worker]] = {
            "Tally": tally_workers(db),
            "by hand": by_hand,
            "raw": raw_worker,
        }
        workers = {label: make(db) for label, make in sides.items()}
        for debit, _ in workers.values():  # every page the rounds touch, in the cache
            per_debit(debit, names, WARM_UP, seed=1)
        frames = {
            label: frames_per_commit(db, debit, names) for label, (debit, _) in workers.items()
        }
        times: dict[str, list[float]] = {label: [] for label in workers}
        for round_ in range(args.rounds):
            for label, (debit, _) in workers.items():
                times[label].append(per_debit(debit, names, args.debits, seed=round_))
            print(
                f"round {round_ + 1}: "
                + "  ".join(f"{label} {times[label][-1] * 1e6:6.1f} µs" for label in workers),
                flush=True,
            )
        for _, close in workers.values():
            close()
    median = {label: statistics.median(taken) for label, taken in times.items()}
    raw = median["raw"]
    print(
        "\n| one worker, 10,000 accounts | µs per debit | of raw's rate | WAL frames per commit |"
    )
    print("|---|---:|---:|---:|")
    for label in workers:
        print(
            f"| {label} | {median[label] * 1e6:.0f} | {raw / median[label]:.0%} | "
            f"{frames[label]:.1f} |"
        )
    python = median["Tally"] - median["by hand"]
    target = SQLITE_ONE_WORKER_TARGET
    print(
        f"\nTally's own work beyond its SQL: {python * 1e6:.0f} µs per debit "
        f"({python / median['Tally']:.0%} of its time). At {target:.0%} of raw's rate a debit "
        f"may take {raw / target * 1e6:.0f} µs, of which its SQL by hand takes "
        f"{median['by hand'] * 1e6:.0f}."
    )


if __name__ == "__main__":
    main()
