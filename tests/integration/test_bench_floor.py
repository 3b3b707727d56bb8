"""bench/sqlite_floor.py sends Tally's debit statements by hand, as the least a debit on this
schema can cost. They must write what Tally's debit writes, or the figure measures something
else: checked here by the conservation audit and the stored answers."""

from __future__ import annotations

from pathlib import Path

from bench.ledger import STOCK, seed
from bench.sqlite_floor import by_hand
from sqlalchemy import select

from tally.adapters.db.schema import idempotency_keys
from tally.adapters.db.uow import SqlUnitOfWork
from tally.domain.model import Debit, EntryType
from tally.service import ledger
from tally.service.changes import adapter
from tests.support import FakeClock, database


def test_debits_by_hand_write_what_tallys_debit_writes(tmp_path: Path, clock: FakeClock) -> None:
    with database("sqlite", str(tmp_path)) as db:
        seed(db, ["floor-a", "floor-b"])
        debit, close = by_hand(db)
        for account in ("floor-a", "floor-b", "floor-a"):
            debit(account)
        close()
        uow = SqlUnitOfWork(db, clock)
        assert ledger.get_balance("floor-a", uow).available == STOCK - 2
        assert ledger.get_balance("floor-b", uow).available == STOCK - 1
        journal = sorted(ledger.list_entries("floor-a", uow, limit=10).items, key=lambda e: e.seq)
        assert [(entry.seq, entry.type) for entry in journal] == [
            (1, EntryType.GRANT),
            (2, EntryType.DEBIT),
            (3, EntryType.DEBIT),
        ]
        assert ledger.check(uow).violations == []
        with uow.read_only():
            stored = uow.accounts.connection.execute(
                select(idempotency_keys.c.account_id, idempotency_keys.c.response)
            ).all()
        debits = [adapter(Debit).validate_python(response) for _, response in stored]
        assert sorted(d.account_id for d in debits) == ["floor-a", "floor-a", "floor-b"]
        assert sorted(d.id for d in debits if d.account_id == "floor-a") == sorted(
            entry.id for entry in journal[1:]
        )
