"""SQL repositories: load an account with its lock held, save exactly what changed.

Statements per change are few and fixed: lock the account, read its open lots and pending
holds, then one batched write per table. Nothing here reads the journal on the hot path, so a
change costs the same on an account with ten entries as on one with a million.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    Connection,
    Row,
    and_,
    bindparam,
    func,
    insert,
    literal,
    literal_column,
    select,
    true,
    tuple_,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from tally.adapters.db.audit import exact_sum, summed
from tally.adapters.db.fast import (
    FastStatement,
    Json,
    decode_json,
    decode_time,
    json_or_null,
    update_by_key,
)
from tally.adapters.db.schema import (
    UTCDateTime,
    accounts,
    entries,
    hold_allocations,
    holds,
    idempotency_keys,
    lots,
)
from tally.domain.errors import LotNotFound
from tally.domain.model import (
    Account,
    Allocation,
    Entry,
    EntryType,
    Hold,
    HoldStatus,
    Lot,
)
from tally.service.ports import History, IdempotencyRace, KeyRecord, StoredResult


def _lot(row: Any, prefix: str = "") -> Lot:
    """A lot from a row of `lots`, or from a joined row whose lot columns carry `prefix`."""

    def column(name: str) -> Any:
        return getattr(row, prefix + name)

    return Lot(
        id=column("lot_id"),
        account_id=column("account_id"),
        source=column("source"),
        amount=column("amount"),
        remaining=column("remaining"),
        expires_at=decode_time(column("expires_at")),
        priority=column("priority"),
        created_at=decode_time(column("created_at")),
        voided_at=decode_time(column("voided_at")),
        reason=column("reason"),
        metadata=decode_json(column("metadata")),
        platform_id=column("platform_id"),
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
    holds.c.tool,
    holds.c.quantity,
    holds.c.platform_id,
    hold_allocations.c.lot_id,
    hold_allocations.c.amount.label("allocated"),
)


def _holds(rows: Sequence[Any]) -> list[Hold]:
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
                expires_at=decode_time(row.expires_at),
                created_at=decode_time(row.created_at),
                allocations=[],
                captured=row.captured,
                metadata=decode_json(row.metadata),
                tool=row.tool,
                quantity=row.quantity,
                platform_id=row.platform_id,
            )
        hold.allocations.append(Allocation(row.lot_id, row.allocated))
    return list(found.values())


def _hold_query() -> Any:
    return (
        select(*_HOLD_COLUMNS)
        .join(hold_allocations, hold_allocations.c.hold_id == holds.c.hold_id)
        .order_by(holds.c.hold_id, hold_allocations.c.position)
    )


# Statements are built once: building a Core expression costs more than running it on SQLite.
def _account_query(where: Any) -> Any:
    """Accounts with their open lots in one statement; lot columns are prefixed `lot_`."""
    return (
        select(accounts, *[column.label(f"lot_{column.name}") for column in lots.c])
        .select_from(
            accounts.outerjoin(
                lots, and_(lots.c.account_id == accounts.c.account_id, lots.c.is_open == true())
            )
        )
        .where(where)
    )


_ACCOUNT_QUERY = _account_query(accounts.c.account_id == bindparam("account_id"))
_ACCOUNT = FastStatement(_ACCOUNT_QUERY)
#: PostgreSQL: a read of several accounts lists them as parameters, as many as the next of
#: these lengths, the last account repeated to fill. For a list of known length PostgreSQL
#: keeps one generic plan; for an array of unknown length (`= ANY($1)`) it chose to plan each
#: call anew, and planning (220 µs) took longer than the read.
ACCOUNT_LIST_LENGTHS: Final = (2, 4, 8, 16, 32, 64)
_ACCOUNTS_LISTED = {
    length: FastStatement(
        _account_query(accounts.c.account_id.in_([bindparam(f"a{n}") for n in range(length)]))
    )
    for length in ACCOUNT_LIST_LENGTHS
}


def _locked(query: Any) -> Any:
    """PostgreSQL: the query that locks the accounts it reads, in account order (so batches
    of several accounts never deadlock), and says per row whether what it read is `fresh`.

    After waiting for a lock, PostgreSQL answers the newest version of the locked account row
    but the lots joined to it as of the statement's start. Every change to an account's lots
    also updates its row, so the row's version (xmin) in the statement's snapshot differs from
    the locked one exactly when the lots may be stale; then the caller reads again, holding
    the lock. Uncontended (nearly always), the lock and the read take one statement.
    """
    snapshot = accounts.alias("snapshot")
    version: Any = literal_column("snapshot.xmin")
    as_read = (
        select(version).where(snapshot.c.account_id == accounts.c.account_id).scalar_subquery()
    )
    fresh = (literal_column("accounts.xmin") == as_read).label("fresh")
    return query.add_columns(fresh).order_by(accounts.c.account_id).with_for_update(of=accounts)


_LOCK_ACCOUNT = FastStatement(_locked(_ACCOUNT_QUERY))
_LOCK_ACCOUNTS_LISTED = {
    length: FastStatement(_locked(read.statement)) for length, read in _ACCOUNTS_LISTED.items()
}
_PENDING_HOLDS = FastStatement(
    _hold_query().where(
        holds.c.account_id == bindparam("account_id"),
        holds.c.status == HoldStatus.PENDING.value,
    )
)
_HOLDS_BY_ID = _hold_query().where(
    holds.c.account_id == bindparam("account_id"),
    holds.c.hold_id.in_(bindparam("hold_ids", expanding=True)),
)
_LOTS_BY_ID = select(lots).where(
    lots.c.account_id == bindparam("account_id"),
    lots.c.lot_id.in_(bindparam("lot_ids", expanding=True)),
)
_UPDATE_ACCOUNT = update_by_key(
    accounts, "account_id", ("debt", "entry_seq", "pending_holds", "email")
)
# The common case, a change that only added entries (a debit, a grant with no debt to repay):
# on PostgreSQL a batch of eight such rows fits in the one statement its other writes make
# (`fast.CACHED_QUERY_PARAMS_MAX`), one round trip fewer before its COMMIT.
_UPDATE_ACCOUNT_SEQ = update_by_key(accounts, "account_id", ("entry_seq",))
_UPDATE_LOT = update_by_key(lots, "lot_id", ("remaining", "is_open", "voided_at"))
# The common case, a spend that leaves the lot open: touches no index.
_UPDATE_LOT_REMAINING = update_by_key(lots, "lot_id", ("remaining",))
_UPDATE_HOLD = update_by_key(holds, "hold_id", ("status", "captured"))
_INSERT_LOTS = FastStatement(insert(lots))
_INSERT_HOLDS = FastStatement(insert(holds))
_INSERT_ALLOCATIONS = FastStatement(insert(hold_allocations))
_INSERT_ENTRIES = FastStatement(insert(entries))
_ACCOUNT_OF_LOT = FastStatement(
    select(lots.c.account_id).where(lots.c.lot_id == bindparam("lot_id"))
)
_ACCOUNT_OF_HOLD = FastStatement(
    select(holds.c.account_id).where(holds.c.hold_id == bindparam("hold_id"))
)
_IDEMPOTENCY_GET = FastStatement(
    select(idempotency_keys.c.request_hash, idempotency_keys.c.response).where(
        idempotency_keys.c.scope == bindparam("scope"),
        idempotency_keys.c.key == bindparam("key"),
    )
)
_IDEMPOTENCY_ADD = FastStatement(insert(idempotency_keys))


#: Rule 3 as a sort key: soonest expiry first (never last), then priority, then oldest.
_NEVER = datetime(9999, 12, 31, tzinfo=UTC)
_SPENDING_ORDER = (
    func.coalesce(lots.c.expires_at, literal(_NEVER, UTCDateTime)).label("expiry"),
    lots.c.priority,
    lots.c.created_at,
    lots.c.lot_id,
)

#: Per loaded lot: (open, voided_at) as read, to tell a remaining-only update from a full one.
LoadedLots = dict[str, tuple[bool, datetime | None]]
#: Per loaded account: (debt, pending_holds, email) as read, to tell an update of `entry_seq`
#: alone from a full one.
LoadedAccounts = dict[str, tuple[int, int, str | None]]


def _rows_of(
    account: Account,
    rows: dict[FastStatement, list[dict[str, Any]]],
    loaded: LoadedLots,
    loaded_accounts: LoadedAccounts,
) -> None:
    touched = account.new_lots or account.changed_lot_ids or account.new_holds
    # Any change to lots or holds rewrites the account row too: a new row version is how a
    # locking read tells that the lots it joined may be stale (see `_locked`).
    if account.new_entries or account.email_changed or touched or account.changed_hold_ids:
        as_read = (account.debt, account.pending_holds, account.email)
        if loaded_accounts.get(account.account_id) == as_read:
            rows[_UPDATE_ACCOUNT_SEQ].append(
                {"b_account_id": account.account_id, "b_entry_seq": account.entry_seq}
            )
        else:
            rows[_UPDATE_ACCOUNT].append(
                {
                    "b_account_id": account.account_id,
                    "b_debt": account.debt,
                    "b_entry_seq": account.entry_seq,
                    "b_pending_holds": account.pending_holds,
                    "b_email": account.email,
                }
            )
    new_lot_ids = {lot.id for lot in account.new_lots}
    rows[_INSERT_LOTS] += [
        {
            "lot_id": lot.id,
            "account_id": lot.account_id,
            "source": lot.source,
            "amount": lot.amount,
            "remaining": lot.remaining,
            "is_open": lot.remaining > 0,
            "expires_at": lot.expires_at,
            "priority": lot.priority,
            "created_at": lot.created_at,
            "voided_at": lot.voided_at,
            "reason": lot.reason,
            "metadata": json_or_null(lot.metadata),
            "platform_id": lot.platform_id,
        }
        for lot in account.new_lots
    ]
    for lot_id in sorted(account.changed_lot_ids - new_lot_ids):
        lot = account.lots[lot_id]
        state = (lot.remaining > 0, lot.voided_at)
        if loaded.get(lot_id) == state:
            rows[_UPDATE_LOT_REMAINING].append({"b_lot_id": lot_id, "b_remaining": lot.remaining})
        else:
            rows[_UPDATE_LOT].append(
                {
                    "b_lot_id": lot_id,
                    "b_remaining": lot.remaining,
                    "b_is_open": state[0],
                    "b_voided_at": lot.voided_at,
                }
            )
    new_hold_ids = {hold.id for hold in account.new_holds}
    rows[_INSERT_HOLDS] += [
        {
            "hold_id": hold.id,
            "account_id": hold.account_id,
            "amount": hold.amount,
            "captured": hold.captured,
            "status": hold.status.value,
            "expires_at": hold.expires_at,
            "created_at": hold.created_at,
            "metadata": json_or_null(hold.metadata),
            "tool": hold.tool,
            "quantity": hold.quantity,
            "platform_id": hold.platform_id,
        }
        for hold in account.new_holds
    ]
    rows[_INSERT_ALLOCATIONS] += [
        {
            "hold_id": hold.id,
            "position": position,
            "lot_id": allocation.lot_id,
            "account_id": hold.account_id,
            "amount": allocation.amount,
        }
        for hold in account.new_holds
        for position, allocation in enumerate(hold.allocations)
    ]
    rows[_UPDATE_HOLD] += [
        {
            "b_hold_id": hold_id,
            "b_status": account.holds[hold_id].status.value,
            "b_captured": account.holds[hold_id].captured,
        }
        for hold_id in sorted(account.changed_hold_ids - new_hold_ids)
    ]
    rows[_INSERT_ENTRIES] += [
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
            "metadata": json_or_null(e.metadata),
        }
        for e in account.new_entries
    ]


class SqlAccounts:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.dialect = connection.dialect.name
        self._loaded_lots: LoadedLots = {}
        self._loaded_accounts: LoadedAccounts = {}

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
        key = {"account_id": account_id}
        # SQLite's write transaction (BEGIN IMMEDIATE) is the lock there.
        locks = lock and self.dialect == "postgresql"
        found = self._lock(key) if locks else _ACCOUNT.rows(self.connection, key)
        is_new = False
        if not found and create_at is not None:
            self._insert_account(account_id, create_at)
            found = self._lock(key) if locks else _ACCOUNT.rows(self.connection, key)
            is_new = True
        if not found:
            return None
        return self._complete(found, is_new=is_new, lot_ids=lot_ids, hold_ids=hold_ids)

    def _lock(self, key: dict[str, Any]) -> list[Any]:
        found = _LOCK_ACCOUNT.rows(self.connection, key)
        if all(row.fresh for row in found):
            return found
        return _ACCOUNT.rows(self.connection, key)  # the lock is held: this read is current

    def get_many_for_update(
        self,
        account_ids: Sequence[str],
        *,
        lot_ids: Sequence[str] = (),
        hold_ids: Sequence[str] = (),
    ) -> dict[str, Account]:
        """Lock and load several accounts, in sorted order. On PostgreSQL the lock and the
        read of all of them take one round trip; SQLite reads in-process, one by one."""
        ordered = sorted(set(account_ids))
        loaded: dict[str, Account] = {}
        if self.dialect == "postgresql" and len(ordered) > 1:
            rows = self._listed(_LOCK_ACCOUNTS_LISTED, ordered)
            stale = sorted({row.account_id for row in rows if not row.fresh})
            if stale:  # the locks are held: this read is current
                rows = [row for row in rows if row.account_id not in stale]
                rows += self._listed(_ACCOUNTS_LISTED, stale)
            by_account: dict[str, list[Any]] = {}
            for row in rows:
                by_account.setdefault(row.account_id, []).append(row)
            for account_id, found in by_account.items():
                loaded[account_id] = self._complete(
                    found, is_new=False, lot_ids=lot_ids, hold_ids=hold_ids
                )
        for account_id in ordered:  # SQLite, and a single account
            if account_id not in loaded:
                account = self.get_for_update(account_id, lot_ids=lot_ids, hold_ids=hold_ids)
                if account is not None:
                    loaded[account_id] = account
        return loaded

    def _listed(self, reads: dict[int, FastStatement], ordered: list[str]) -> list[Any]:
        """Run a read of accounts, `ordered` by id, in lists of `ACCOUNT_LIST_LENGTHS`. The
        lists go in order, a locking read locks each in order: the lock order stays the
        accounts' order."""
        rows: list[Any] = []
        longest = ACCOUNT_LIST_LENGTHS[-1]
        for start in range(0, len(ordered), longest):
            part = ordered[start : start + longest]
            length = next(n for n in ACCOUNT_LIST_LENGTHS if n >= len(part))
            listed = part + part[-1:] * (length - len(part))
            params = {f"a{n}": account_id for n, account_id in enumerate(listed)}
            rows += reads[length].rows(self.connection, params)
        return rows

    def _complete(
        self,
        found: list[Any],
        *,
        is_new: bool,
        lot_ids: Sequence[str],
        hold_ids: Sequence[str],
    ) -> Account:
        """An account from its rows joined with its open lots, plus its pending holds and the
        named lots and holds."""
        row = found[0]
        account_id = row.account_id
        key = {"account_id": account_id}
        account = Account(
            account_id=row.account_id,
            email=row.email,
            debt=row.debt,
            entry_seq=row.entry_seq,
            pending_holds=row.pending_holds,
            created_at=decode_time(row.created_at),
            is_new=is_new,
        )
        self._loaded_accounts[account_id] = (account.debt, account.pending_holds, account.email)
        if is_new:
            return account
        loaded_holds = []
        if account.pending_holds:
            loaded_holds = _holds(_PENDING_HOLDS.rows(self.connection, key))
            assert len(loaded_holds) == account.pending_holds, "pending_holds drifted"
        wanted_holds = [h for h in hold_ids if h not in {x.id for x in loaded_holds}]
        if wanted_holds:
            loaded_holds += _holds(
                self.connection.execute(
                    _HOLDS_BY_ID, {"account_id": account_id, "hold_ids": wanted_holds}
                ).all()
            )
        account.holds = {hold.id: hold for hold in loaded_holds}
        account.lots = {
            lot_row.lot_lot_id: _lot(lot_row, "lot_") for lot_row in found if lot_row.lot_lot_id
        }
        referenced = {a.lot_id for hold in loaded_holds for a in hold.allocations}
        missing = (referenced | set(lot_ids)) - account.lots.keys()
        if missing:
            for row in self.connection.execute(
                _LOTS_BY_ID, {"account_id": account_id, "lot_ids": sorted(missing)}
            ):
                account.lots[row.lot_id] = _lot(row)
        for lot in account.lots.values():
            self._loaded_lots[lot.id] = (lot.remaining > 0, lot.voided_at)
        return account

    def _insert_account(self, account_id: str, now: datetime) -> None:
        values = {
            "account_id": account_id,
            "created_at": now,
            "debt": 0,
            "entry_seq": 0,
            "pending_holds": 0,
        }
        if self.dialect == "postgresql":
            statement: Any = pg_insert(accounts).values(values).on_conflict_do_nothing()
        else:
            statement = sqlite_insert(accounts).values(values).on_conflict_do_nothing()
        self.connection.execute(statement)

    def save(self, account: Account) -> None:
        self.save_many([account])

    def save_many(self, changed: Sequence[Account]) -> None:
        """Write what changed in these accounts: one batched statement per kind of row."""
        rows: dict[FastStatement, list[dict[str, Any]]] = {
            statement: []
            for statement in (
                _UPDATE_ACCOUNT,
                _UPDATE_ACCOUNT_SEQ,
                _INSERT_LOTS,
                _UPDATE_LOT,
                _UPDATE_LOT_REMAINING,
                _INSERT_HOLDS,
                _INSERT_ALLOCATIONS,
                _UPDATE_HOLD,
                _INSERT_ENTRIES,
            )
        }
        for account in changed:
            _rows_of(account, rows, self._loaded_lots, self._loaded_accounts)
        # Parents before children: lots and holds before the entries that name them.
        for statement, batch in rows.items():
            if batch:
                statement.execute_many(self.connection, batch)

    def account_of_lot(self, lot_id: str) -> str | None:
        found = _ACCOUNT_OF_LOT.rows(self.connection, {"lot_id": lot_id})
        return found[0].account_id if found else None

    def account_of_hold(self, hold_id: str) -> str | None:
        found = _ACCOUNT_OF_HOLD.rows(self.connection, {"hold_id": hold_id})
        return found[0].account_id if found else None

    def lots(self, account_id: str, *, limit: int, starting_after: str | None) -> list[Lot]:
        query = select(lots).where(lots.c.account_id == account_id)
        if starting_after is not None:
            after = self.connection.execute(
                select(*_SPENDING_ORDER).where(
                    lots.c.account_id == account_id, lots.c.lot_id == starting_after
                )
            ).first()
            if after is None:
                raise LotNotFound("starting_after names no lot of this account")
            cursor = [literal(v, c.type) for v, c in zip(after, _SPENDING_ORDER, strict=True)]
            query = query.where(tuple_(*_SPENDING_ORDER) > tuple_(*cursor))
        rows = self.connection.execute(query.order_by(*_SPENDING_ORDER).limit(limit))
        return [_lot(row) for row in rows]

    def due(self, now: datetime, limit: int) -> list[str]:
        due_lots = select(lots.c.account_id).where(
            lots.c.is_open == true(), lots.c.expires_at <= now
        )
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

    def totals(self) -> dict[str, int]:
        """Credits per entry type over the whole journal, exact however large it grows."""
        rows = self.connection.execute(
            select(entries.c.type, *exact_sum(entries.c.amount, "amount")).group_by(entries.c.type)
        )
        return {row.type: summed(row, "amount") for row in rows}

    def seq_of(self, account_id: str, entry_id: str) -> int | None:
        found: int | None = self.connection.execute(
            select(entries.c.seq).where(
                entries.c.account_id == account_id, entries.c.entry_id == entry_id
            )
        ).scalar()
        return found

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
        found = _IDEMPOTENCY_GET.rows(self.connection, {"scope": scope, "key": key})
        if not found:
            return None
        return StoredResult(found[0].request_hash, decode_json(found[0].response))

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
        self.add_many([KeyRecord(scope, key, request_hash, response, account_id)], now)

    def add_many(self, records: Sequence[KeyRecord], now: datetime) -> None:
        driver_error = self.connection.dialect.loaded_dbapi.IntegrityError
        try:
            _IDEMPOTENCY_ADD.execute_many(
                self.connection,
                [
                    {
                        "scope": record.scope,
                        "key": record.key,
                        "request_hash": record.request_hash,
                        "response": Json(record.response),
                        "account_id": record.account_id,
                        "created_at": now,
                    }
                    for record in records
                ],
            )
        except (IntegrityError, driver_error) as error:
            raise IdempotencyRace(str(error)[:200]) from error
