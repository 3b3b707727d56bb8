"""SQL repositories: load an account with its lock held, save exactly what changed.

Statements per change are few and fixed: lock the account, read its open lots and pending
holds, then one batched write per table. Nothing here reads the journal on the hot path, so a
change costs the same on an account with ten entries as on one with a million.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, bindparam, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from tally.adapters.db.schema import (
    accounts,
    entries,
    hold_allocations,
    holds,
    idempotency_keys,
    lots,
)
from tally.domain.model import (
    Account,
    Allocation,
    Entry,
    EntryType,
    Hold,
    HoldStatus,
    Lot,
)
from tally.service.ports import History, IdempotencyRace, StoredResult


def _lot(row: Row[Any]) -> Lot:
    return Lot(
        id=row.lot_id,
        account_id=row.account_id,
        source=row.source,
        amount=row.amount,
        remaining=row.remaining,
        expires_at=row.expires_at,
        priority=row.priority,
        created_at=row.created_at,
        voided_at=row.voided_at,
        reason=row.reason,
        metadata=row.metadata,
    )


def _entry(row: Row[Any]) -> Entry:
    return Entry(
        id=row.entry_id,
        account_id=row.account_id,
        seq=row.seq,
        type=EntryType(row.type),
        amount=row.amount,
        lot_id=row.lot_id,
        hold_id=row.hold_id,
        created_at=row.created_at,
        idempotency_key=row.idempotency_key,
        platform_id=row.platform_id,
        reason=row.reason,
        metadata=row.metadata,
    )


_HOLD_COLUMNS = (
    holds.c.hold_id,
    holds.c.account_id,
    holds.c.amount,
    holds.c.captured,
    holds.c.status,
    holds.c.expires_at,
    holds.c.created_at,
    holds.c.metadata,
    hold_allocations.c.lot_id,
    hold_allocations.c.amount.label("allocated"),
)


def _holds(rows: Sequence[Row[Any]]) -> list[Hold]:
    """Fold hold rows joined with their allocations (ordered by hold, position)."""
    found: dict[str, Hold] = {}
    for row in rows:
        hold = found.get(row.hold_id)
        if hold is None:
            hold = found[row.hold_id] = Hold(
                id=row.hold_id,
                account_id=row.account_id,
                amount=row.amount,
                status=HoldStatus(row.status),
                expires_at=row.expires_at,
                created_at=row.created_at,
                allocations=[],
                captured=row.captured,
                metadata=row.metadata,
            )
        hold.allocations.append(Allocation(row.lot_id, row.allocated))
    return list(found.values())


def _hold_query() -> Any:
    return (
        select(*_HOLD_COLUMNS)
        .join(hold_allocations, hold_allocations.c.hold_id == holds.c.hold_id)
        .order_by(holds.c.hold_id, hold_allocations.c.position)
    )


class SqlAccounts:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.dialect = connection.dialect.name

    def get_for_update(
        self,
        account_id: str,
        *,
        create_at: datetime | None = None,
        lot_ids: Sequence[str] = (),
        hold_ids: Sequence[str] = (),
    ) -> Account | None:
        return self._load(
            account_id, lock=True, create_at=create_at, lot_ids=lot_ids, hold_ids=hold_ids
        )

    def get(self, account_id: str) -> Account | None:
        return self._load(account_id, lock=False, create_at=None, lot_ids=(), hold_ids=())

    def _load(
        self,
        account_id: str,
        *,
        lock: bool,
        create_at: datetime | None,
        lot_ids: Sequence[str],
        hold_ids: Sequence[str],
    ) -> Account | None:
        query = select(accounts).where(accounts.c.account_id == account_id)
        if lock:
            query = query.with_for_update()
        row = self.connection.execute(query).one_or_none()
        is_new = False
        if row is None and create_at is not None:
            self._insert_account(account_id, create_at)
            row = self.connection.execute(query).one()
            is_new = True
        if row is None:
            return None
        account = Account(
            account_id=row.account_id,
            email=row.email,
            debt=row.debt,
            entry_seq=row.entry_seq,
            created_at=row.created_at,
            is_new=is_new,
        )
        if is_new:
            return account
        pending = self.connection.execute(
            _hold_query().where(
                holds.c.account_id == account_id, holds.c.status == HoldStatus.PENDING.value
            )
        ).all()
        loaded_holds = _holds(pending)
        wanted_holds = [h for h in hold_ids if h not in {x.id for x in loaded_holds}]
        if wanted_holds:
            loaded_holds += _holds(
                self.connection.execute(
                    _hold_query().where(
                        holds.c.account_id == account_id, holds.c.hold_id.in_(wanted_holds)
                    )
                ).all()
            )
        account.holds = {hold.id: hold for hold in loaded_holds}
        open_lots = self.connection.execute(
            select(lots).where(lots.c.account_id == account_id, lots.c.remaining > 0)
        ).all()
        account.lots = {row.lot_id: _lot(row) for row in open_lots}
        referenced = {a.lot_id for hold in loaded_holds for a in hold.allocations}
        missing = (referenced | set(lot_ids)) - account.lots.keys()
        if missing:
            for row in self.connection.execute(
                select(lots).where(lots.c.account_id == account_id, lots.c.lot_id.in_(missing))
            ):
                account.lots[row.lot_id] = _lot(row)
        return account

    def _insert_account(self, account_id: str, now: datetime) -> None:
        values = {"account_id": account_id, "created_at": now, "debt": 0, "entry_seq": 0}
        if self.dialect == "postgresql":
            statement: Any = pg_insert(accounts).values(values).on_conflict_do_nothing()
        else:
            statement = sqlite_insert(accounts).values(values).on_conflict_do_nothing()
        self.connection.execute(statement)

    def save(self, account: Account) -> None:
        connection = self.connection
        if account.new_entries or account.email_changed:
            connection.execute(
                update(accounts)
                .where(accounts.c.account_id == account.account_id)
                .values(debt=account.debt, entry_seq=account.entry_seq, email=account.email)
            )
        new_lot_ids = {lot.id for lot in account.new_lots}
        if account.new_lots:
            connection.execute(
                insert(lots),
                [
                    {
                        "lot_id": lot.id,
                        "account_id": lot.account_id,
                        "source": lot.source,
                        "amount": lot.amount,
                        "remaining": lot.remaining,
                        "expires_at": lot.expires_at,
                        "priority": lot.priority,
                        "created_at": lot.created_at,
                        "voided_at": lot.voided_at,
                        "reason": lot.reason,
                        "metadata": lot.metadata,
                    }
                    for lot in account.new_lots
                ],
            )
        changed_lots = [account.lots[lot_id] for lot_id in account.changed_lot_ids - new_lot_ids]
        if changed_lots:
            connection.execute(
                update(lots)
                .where(lots.c.lot_id == bindparam("b_lot_id"))
                .values(remaining=bindparam("b_remaining"), voided_at=bindparam("b_voided_at")),
                [
                    {"b_lot_id": lot.id, "b_remaining": lot.remaining, "b_voided_at": lot.voided_at}
                    for lot in changed_lots
                ],
            )
        new_hold_ids = {hold.id for hold in account.new_holds}
        if account.new_holds:
            connection.execute(
                insert(holds),
                [
                    {
                        "hold_id": hold.id,
                        "account_id": hold.account_id,
                        "amount": hold.amount,
                        "captured": hold.captured,
                        "status": hold.status.value,
                        "expires_at": hold.expires_at,
                        "created_at": hold.created_at,
                        "metadata": hold.metadata,
                    }
                    for hold in account.new_holds
                ],
            )
            connection.execute(
                insert(hold_allocations),
                [
                    {
                        "hold_id": hold.id,
                        "position": position,
                        "lot_id": allocation.lot_id,
                        "account_id": hold.account_id,
                        "amount": allocation.amount,
                    }
                    for hold in account.new_holds
                    for position, allocation in enumerate(hold.allocations)
                ],
            )
        changed_holds = [
            account.holds[hold_id] for hold_id in account.changed_hold_ids - new_hold_ids
        ]
        if changed_holds:
            connection.execute(
                update(holds)
                .where(holds.c.hold_id == bindparam("b_hold_id"))
                .values(status=bindparam("b_status"), captured=bindparam("b_captured")),
                [
                    {"b_hold_id": h.id, "b_status": h.status.value, "b_captured": h.captured}
                    for h in changed_holds
                ],
            )
        if account.new_entries:
            connection.execute(
                insert(entries),
                [
                    {
                        "entry_id": e.id,
                        "account_id": e.account_id,
                        "seq": e.seq,
                        "type": e.type.value,
                        "amount": e.amount,
                        "lot_id": e.lot_id,
                        "hold_id": e.hold_id,
                        "created_at": e.created_at,
                        "idempotency_key": e.idempotency_key,
                        "platform_id": e.platform_id,
                        "reason": e.reason,
                        "metadata": e.metadata,
                    }
                    for e in account.new_entries
                ],
            )

    def account_of_lot(self, lot_id: str) -> str | None:
        found: str | None = self.connection.execute(
            select(lots.c.account_id).where(lots.c.lot_id == lot_id)
        ).scalar_one_or_none()
        return found

    def account_of_hold(self, hold_id: str) -> str | None:
        found: str | None = self.connection.execute(
            select(holds.c.account_id).where(holds.c.hold_id == hold_id)
        ).scalar_one_or_none()
        return found

    def due(self, now: datetime, limit: int) -> list[str]:
        due_lots = select(lots.c.account_id).where(lots.c.remaining > 0, lots.c.expires_at <= now)
        due_holds = select(holds.c.account_id).where(
            holds.c.status == HoldStatus.PENDING.value, holds.c.expires_at <= now
        )
        found = self.connection.execute(
            due_lots.union(due_holds).order_by("account_id").limit(limit)
        ).scalars()
        return list(found)


class SqlJournal:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def entries(self, account_id: str, *, limit: int, before_seq: int | None) -> list[Entry]:
        query = select(entries).where(entries.c.account_id == account_id)
        if before_seq is not None:
            query = query.where(entries.c.seq < before_seq)
        rows = self.connection.execute(query.order_by(entries.c.seq.desc()).limit(limit))
        return [_entry(row) for row in rows]

    def history(self, account_id: str, until: datetime) -> History:
        lot_rows = self.connection.execute(
            select(lots).where(lots.c.account_id == account_id, lots.c.created_at <= until)
        ).all()
        hold_rows = self.connection.execute(
            _hold_query().where(holds.c.account_id == account_id, holds.c.created_at <= until)
        ).all()
        entry_rows = self.connection.execute(
            select(entries)
            .where(entries.c.account_id == account_id, entries.c.created_at <= until)
            .order_by(entries.c.seq)
        ).all()
        return History(
            lots=[_lot(row) for row in lot_rows],
            holds=_holds(hold_rows),
            entries=[_entry(row) for row in entry_rows],
        )


class SqlIdempotencyStore:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def get(self, scope: str, key: str) -> StoredResult | None:
        row = self.connection.execute(
            select(idempotency_keys.c.request_hash, idempotency_keys.c.response).where(
                idempotency_keys.c.scope == scope, idempotency_keys.c.key == key
            )
        ).one_or_none()
        return None if row is None else StoredResult(row.request_hash, row.response)

    def add(
        self,
        scope: str,
        key: str,
        *,
        request_hash: str,
        response: Any,
        account_id: str | None,
        now: datetime,
    ) -> None:
        try:
            self.connection.execute(
                insert(idempotency_keys).values(
                    scope=scope,
                    key=key,
                    request_hash=request_hash,
                    response=response,
                    account_id=account_id,
                    created_at=now,
                )
            )
        except IntegrityError as error:
            raise IdempotencyRace(key) from error
