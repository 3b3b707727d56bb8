"""One idempotent change to one account (rule 5), run alone or inside a group commit."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Generic, TypeVar

from pydantic import TypeAdapter

from tally.domain import values
from tally.domain.errors import AccountNotFound, ApiKeyInvalid, IdempotencyKeyReused, TallyError
from tally.domain.model import Account, Origin
from tally.service.ports import IdempotencyRace, UnitOfWork

LOCAL_SCOPE: Final = "local"

R = TypeVar("R")


@dataclass(frozen=True, kw_only=True)
class Command:
    idempotency_key: str
    platform_id: str | None = None

    def origin(self, reason: str | None = None) -> Origin:
        return Origin(self.idempotency_key, self.platform_id, reason)


class Change(Generic[R]):
    """What one use case asks: which account, what to do to it, and how to remember it."""

    __slots__ = (
        "account",
        "action",
        "adapter",
        "cmd",
        "create",
        "credential",
        "hold_ids",
        "key",
        "lot_ids",
        "request_hash",
        "scope",
    )

    def __init__(
        self,
        cmd: Command,
        account: str | Callable[[UnitOfWork], str],
        action: Callable[[Account, datetime], R],
        result_type: Any,
        *,
        create: bool = False,
        lot_ids: Sequence[str] = (),
        hold_ids: Sequence[str] = (),
    ) -> None:
        self.cmd = cmd
        self.key = values.idempotency_key(cmd.idempotency_key)
        self.scope = cmd.platform_id or LOCAL_SCOPE
        self.request_hash = fingerprint(cmd)
        self.adapter: TypeAdapter[R] = adapter(result_type)
        self.account = account
        self.action = action
        self.create = create
        self.lot_ids = lot_ids
        self.hold_ids = hold_ids
        self.credential: str | None = None  # see UnitOfWork.credential

    def account_id(self, uow: UnitOfWork) -> str:
        return self.account if isinstance(self.account, str) else self.account(uow)

    def replay(self, stored_hash: str, response: Any) -> R:
        if stored_hash != self.request_hash:
            raise IdempotencyKeyReused
        return self.adapter.validate_python(response)


def run(uow: UnitOfWork, change: Change[R]) -> R:
    """Run a change in the unit of work's commit group if it has one, else alone; record on
    the unit of work whether the answer was a replay."""
    change.credential = uow.credential
    group = uow.group
    result, uow.replayed = group.submit(change) if group is not None else run_alone(uow, change)
    return result


async def run_async(uow: UnitOfWork, change: Change[R]) -> R:
    """`run` for code on an event loop (the HTTP spend routes). In a commit group the change
    waits without holding a thread: only a batch's leader, and a change that must run alone,
    take one of the loop's executor threads, so a request costs no thread hand-off of its own."""
    change.credential = uow.credential
    group = uow.group
    if group is None:
        result, uow.replayed = await asyncio.to_thread(run_alone, uow, change)
    else:
        result, uow.replayed = await group.submit_async(change)
    return result


def run_alone(
    uow: UnitOfWork, change: Change[R], before_commit: Callable[[], None] | None = None
) -> tuple[R, bool]:
    """Run `change` on its locked account once per idempotency key (rule 5).

    The key's unique constraint decides: the first transaction to commit it wins. A duplicate
    (sequential, or concurrent and waiting on the account lock or the key) fails to store its
    key, rolls back, and answers the winner's stored result. A refusal looks the key up too,
    so replaying a request that once succeeded never answers a newer refusal. Not reading the
    key first spares every first-time request a query. Answers the result and whether it
    was a replay.
    """
    with uow:
        now = uow.clock()
        check_credential(uow, change)
        try:
            account_id = change.account_id(uow)
            locked = uow.accounts.get_for_update(
                account_id,
                create_at=now if change.create else None,
                lot_ids=change.lot_ids,
                hold_ids=change.hold_ids,
            )
            if locked is None:
                raise AccountNotFound(account_id=account_id)
            locked.settle(now)
            result = change.action(locked, now)
        except TallyError:
            stored = uow.idempotency.get(change.scope, change.key)
            if stored is None:
                raise
            return change.replay(stored.request_hash, stored.response), True
        response = change.adapter.dump_python(result, mode="json")
        if before_commit is not None:
            before_commit()
        try:
            with uow.batch():
                uow.accounts.save(locked)
                uow.idempotency.add(
                    change.scope,
                    change.key,
                    request_hash=change.request_hash,
                    response=response,
                    account_id=account_id,
                    now=now,
                )
                uow.commit()
        except IdempotencyRace:
            pass
        else:
            return result, False
    with uow.read_only():
        stored = uow.idempotency.get(change.scope, change.key)
    assert stored is not None, "a key that lost a race has a stored winner"
    return change.replay(stored.request_hash, stored.response), True


def check_credential(uow: UnitOfWork, change: Change[Any]) -> None:
    """A change made under a cached API key fails unless the key is still in force: checked
    in the change's own transaction, so a revoked key stops working at once (before any
    replay)."""
    if change.credential is not None and not uow.platforms.in_force(change.credential):
        raise ApiKeyInvalid


_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def adapter(kind: Any) -> TypeAdapter[Any]:
    """TypeAdapters are costly to build and safe to share: one per type, built on first use."""
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    return adapter


def fingerprint(cmd: Command) -> str:
    kind = type(cmd)
    body = adapter(kind).dump_python(cmd, mode="json", exclude={"idempotency_key"})
    canonical = json.dumps([kind.__name__, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
