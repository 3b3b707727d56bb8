"""The JSON shapes Tally answers with (docs/rules.md §3), shared by the CLI and the HTTP API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tally.domain.catalog import Package, Tool
from tally.domain.model import Account, Balance, Debit, Entry, Hold, Lot
from tally.domain.values import format_time


def lot_status(lot: Lot, now: datetime) -> str:
    if lot.voided_at is not None:
        return "void"
    if lot.is_expired(now):
        return "expired"
    return "active" if lot.remaining > 0 else "spent"


def shown_to(viewer: str | None, author: str | None) -> bool:
    """Whether `viewer` sees what `author` wrote into a row: its idempotency key and metadata.
    Accounts are shared, so every platform sees every entry's amount, type and time; a
    platform's own keys and metadata stay its own. `viewer` None is the operator or staff
    (the CLI, the console), who see everything; `author` None is Tally itself."""
    return viewer is None or author is None or author == viewer


def lot_view(lot: Lot, now: datetime, viewer: str | None = None) -> dict[str, Any]:
    return {
        "id": lot.id,
        "object": "lot",
        "account_id": lot.account_id,
        "source": lot.source,
        "amount": lot.amount,
        "remaining": 0 if lot.is_expired(now) else lot.remaining,
        "status": lot_status(lot, now),
        "expires_at": format_time(lot.expires_at),
        "priority": lot.priority,
        "created_at": format_time(lot.created_at),
        "voided_at": format_time(lot.voided_at),
        "reason": lot.reason,
        "metadata": (lot.metadata or {}) if shown_to(viewer, lot.platform_id) else {},
    }


def hold_view(hold: Hold, now: datetime) -> dict[str, Any]:
    return {
        "id": hold.id,
        "object": "hold",
        "account_id": hold.account_id,
        "amount": hold.amount,
        "captured": hold.captured,
        "status": hold.status_at(now).value,
        "expires_at": format_time(hold.expires_at),
        "created_at": format_time(hold.created_at),
        "tool": hold.tool,
        "quantity": hold.quantity,
        "allocations": [{"lot_id": a.lot_id, "amount": a.amount} for a in hold.allocations],
        "metadata": hold.metadata or {},
    }


def entry_view(entry: Entry, viewer: str | None = None) -> dict[str, Any]:
    shown = shown_to(viewer, entry.platform_id)
    return {
        "id": entry.id,
        "object": "entry",
        "account_id": entry.account_id,
        "seq": entry.seq,
        "type": entry.type.value,
        "amount": entry.amount,
        "lot_id": entry.lot_id,
        "hold_id": entry.hold_id,
        "created_at": format_time(entry.created_at),
        "idempotency_key": entry.idempotency_key if shown else None,
        "platform_id": entry.platform_id,
        "reason": entry.reason,
        "metadata": (entry.metadata or {}) if shown else {},
    }


def debit_view(debit: Debit) -> dict[str, Any]:
    return {
        "id": debit.id,
        "object": "entry",
        "type": "debit",
        "account_id": debit.account_id,
        "amount": debit.amount,
        "created_at": format_time(debit.created_at),
        "allocations": [{"lot_id": a.lot_id, "amount": a.amount} for a in debit.allocations],
        "entries": list(debit.entry_ids),
    }


def balance_view(balance: Balance) -> dict[str, Any]:
    return {
        "account_id": balance.account_id,
        "available": balance.available,
        "held": balance.held,
        "debt": balance.debt,
        "allowances": dict(balance.allowances),
        "next_expiry": None
        if balance.next_expiry is None
        else {"at": format_time(balance.next_expiry.at), "amount": balance.next_expiry.amount},
    }


def account_view(account: Account) -> dict[str, Any]:
    return {
        "object": "account",
        "account_id": account.account_id,
        "email": account.email,
        "created_at": format_time(account.created_at),
    }


def tool_view(tool: Tool) -> dict[str, Any]:
    return {
        "id": tool.id,
        "object": "tool",
        "name": tool.name,
        "credits_per_unit": tool.credits_per_unit,
        "unit": tool.unit,
    }


def package_view(package: Package) -> dict[str, Any]:
    surprise = package.surprise
    return {
        "id": package.id,
        "object": "package",
        "name": package.name,
        "credits": package.credits,
        "surprise": None if surprise is None else {"min": surprise.min, "max": surprise.max},
        "price": package.price,
        "currency": package.currency,
        "validity": package.validity,
    }


def wait_in_words(seconds: int) -> str:
    """A `Retry-After` as a person reads it: "1 minute", "42 minutes", "1 hour"; rounded up,
    so trying again then always works."""
    minutes = max(1, -(-seconds // 60))
    if minutes < 60:
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    hours = -(-minutes // 60)
    return f"{hours} hour{'s' if hours != 1 else ''}"


def date_in_words(when: datetime | None) -> str | None:
    """A UTC day as people write it ("7 December 2028"); None for credits that never expire."""
    if when is None:
        return None
    day = when.astimezone(UTC)
    return f"{day.day} {day:%B %Y}"


def time_in_words(when: datetime) -> str:
    """A UTC instant to the minute, its day in words: "7 December 2026, 06:27 UTC"."""
    return f"{date_in_words(when)}, {when.astimezone(UTC):%H:%M} UTC"


def as_sentence(detail: str) -> str:
    """An error's detail shown on a page: a capital first letter and a full stop."""
    text = detail.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else f"{text}."
