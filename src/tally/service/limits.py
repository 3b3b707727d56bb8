"""Rate limits on failed attempts (rule 11), counted atomically in the database.

A `Limit` allows `allowed` failures of one subject per `window`. `enforce`, inside the caller's
transaction, locks every subject it names (PostgreSQL: one advisory lock per subject, in a fixed
order; SQLite: its single writer) and counts them all in one query; the caller records a
failure with `record` in the same transaction. Parallel attempts on one subject are therefore
counted one after another: with 10 allowed, exactly 10 are ever evaluated, on any number of
processes. Ceilings over many people (a platform's, the page's) are counted without their lock
(`exact=False`), so that one person's redemption never waits for another's; they may be passed
by the few attempts in flight at once. Only evaluated failures are recorded, never refusals, so
the table stays bounded.

Who counts against what, so that a stranger can never spend a person's allowance:

- Through a platform (`POST /v1/redemptions`, `GET /v1/codes/{code}`): per account and per
  client address (`X-Client-Address`), both within that platform, and a ceiling on the
  platform's failures however many accounts and addresses it rotates. A platform names the
  accounts of its own signed-in people, so only that person, or the platform, can use up an
  account's allowance. A code look-up names no account: its misses count per address and
  against the ceiling.
- On the public `/redeem` page, where anyone may type any account id: per client address and
  against a ceiling for the whole page; never per account. The ceiling, once used up, holds
  the addresses that failed this hour and spares one that has not (`spares_clean`): strangers
  who fill it shut out only themselves, never a buyer, and the account's redemptions through
  its platform are counted apart.
- The `/lost-code` form and staff sign-in use the same mechanism with their own subjects.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from tally.domain.errors import RateLimited
from tally.domain.values import ClientAddress
from tally.service.ports import UnitOfWork

#: Rule 11's window and default: 10 failed attempts per hour, per account and per address.
FAILURE_WINDOW: Final = timedelta(hours=1)
FAILURES_PER_WINDOW: Final = 10
#: Failed redemptions and look-ups per platform, and on the public page, per hour.
PLATFORM_FAILURES_PER_WINDOW: Final = 1000
PAGE_FAILURES_PER_WINDOW: Final = 1000
#: What a redemption or a look-up on the page names when the server saw no peer address.
UNKNOWN_ADDRESS: Final = "unknown"
SUBJECT_MAX_LENGTH: Final = 200  # the failures table's column
#: Every limit's window is at most this long (checked on each Limit), so older failures count
#: against nothing and the sweep deletes them: the table holds about one window of failures.
LONGEST_WINDOW: Final = timedelta(hours=1)
#: Failures deleted per transaction by `prune`, so no lock is held for long.
PRUNE_BATCH: Final = 1000
#: Transactions per `prune`: a backlog is worked off over several sweeps, never in one go.
PRUNE_MAX_BATCHES: Final = 100


@dataclass(frozen=True)
class Limit:
    #: What tripped, for the operator (a metric label): never an account or an address.
    name: str
    #: What is counted: `redeem:<platform>:account:<id>`, `redeem-page`, ...
    subject: str
    allowed: int
    window: timedelta
    #: Counted under the subject's lock, so never passed. A ceiling over many people is not
    #: locked: it may be passed by as many attempts as run at that instant, and in exchange
    #: different people's redemptions never wait for each other.
    exact: bool = True
    #: The subject of the attempt's own client (its address), or None. A limit shared by
    #: many people (the page's ceiling, a staff email) lets through a client with no failure
    #: of its own in the window even when used up: strangers who fill it shut out only
    #: themselves, and a person who has not failed is never locked out by them.
    spares_clean: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "subject", fitted(self.subject))
        if self.spares_clean is not None:
            object.__setattr__(self, "spares_clean", fitted(self.spares_clean))
        assert self.allowed >= 0  # 0: closed, every attempt refused
        assert timedelta(0) < self.window <= LONGEST_WINDOW, "prune keeps one longest window"


def fitted(subject: str) -> str:
    """A subject names what people typed (an email of up to 254 characters): one too long for
    its column keeps a readable head and a digest of the whole, still one per input."""
    if len(subject) > SUBJECT_MAX_LENGTH:
        digest = hashlib.sha256(subject.encode()).hexdigest()
        subject = f"{subject[: SUBJECT_MAX_LENGTH - len(digest) - 1]}#{digest}"
    assert len(subject) <= SUBJECT_MAX_LENGTH, "a subject fits its column"
    return subject


@dataclass(frozen=True)
class Allowance:
    """How many failed redemptions and look-ups each subject may have per hour."""

    #: Per account and per client address (TALLY_REDEEM_FAILURES_PER_HOUR).
    per_subject: int = FAILURES_PER_WINDOW
    #: Per platform, all its accounts and addresses together.
    per_platform: int = PLATFORM_FAILURES_PER_WINDOW
    #: The public /redeem page, all its visitors together.
    page: int = PAGE_FAILURES_PER_WINDOW


def for_redemption(
    platform_id: str | None,
    account_id: str,
    address: ClientAddress | None,
    allowance: Allowance,
) -> list[Limit]:
    """A redemption through a platform counts per account, per address and per platform; one
    without a platform is the public page's and counts per address and for the page."""
    if platform_id is None:
        return _page(address, allowance)
    scope = f"redeem:{platform_id}"
    made = [
        Limit(
            "redeem_account", f"{scope}:account:{account_id}", allowance.per_subject, FAILURE_WINDOW
        )
    ]
    return made + _platform(scope, address, allowance)


def for_look_up(
    platform_id: str, address: ClientAddress | None, allowance: Allowance
) -> list[Limit]:
    """A code look-up counts as a redemption through the same platform that names no
    account: a miss tells a guesser as much as a failed redemption."""
    return _platform(f"redeem:{platform_id}", address, allowance)


def _platform(scope: str, address: ClientAddress | None, allowance: Allowance) -> list[Limit]:
    made = [Limit("redeem_platform", scope, allowance.per_platform, FAILURE_WINDOW, exact=False)]
    if address is not None:
        made.append(
            Limit(
                "redeem_address",
                f"{scope}:address:{address}",
                allowance.per_subject,
                FAILURE_WINDOW,
            )
        )
    return made


def _page(address: ClientAddress | None, allowance: Allowance) -> list[Limit]:
    own = f"redeem-page:address:{address or UNKNOWN_ADDRESS}"
    return [
        Limit("page_address", own, allowance.per_subject, FAILURE_WINDOW),
        # Used up, the ceiling still lets through addresses with no failure this hour, so a
        # stranger who fills it cannot close the page to buyers; every address that guessed
        # gets no more (visitors without a known address share one and are spared nothing).
        Limit(
            "page",
            "redeem-page",
            allowance.page,
            FAILURE_WINDOW,
            exact=False,
            spares_clean=own if address is not None else None,
        ),
    ]


def enforce(
    uow: UnitOfWork,
    limits: Sequence[Limit],
    now: datetime,
    *,
    detail: str = "too many failed attempts: try again later",
) -> None:
    """Inside the caller's open transaction: lock the limits' subjects until it ends, and
    raise RateLimited if any of them has used its allowance; `retry_after` is when all of
    them allow another attempt."""
    if not limits:
        return
    uow.commerce.lock_subjects([limit.subject for limit in limits if limit.exact])
    counts = uow.commerce.failures_within({limit.subject: now - limit.window for limit in limits})
    named = {limit.subject for limit in limits}
    tripped: list[tuple[timedelta, str]] = []
    for limit in limits:
        count, oldest = counts.get(limit.subject, (0, now))
        if count < limit.allowed:
            continue
        if limit.spares_clean is not None:
            assert limit.spares_clean in named, "the client's own limit is counted alongside"
            if limit.spares_clean not in counts:
                continue  # this client has not failed in its window
        tripped.append((oldest + limit.window - now, limit.name))
    if tripped:
        wait, name = max(tripped)
        raise RateLimited(detail, retry_after=max(1, math.ceil(wait.total_seconds())), limit=name)


def record(uow: UnitOfWork, limits: Sequence[Limit], now: datetime) -> None:
    """One failure against each limit, in the transaction `enforce` locked them in."""
    uow.commerce.add_failures([limit.subject for limit in limits], now)


def prune(uow: UnitOfWork) -> int:
    """Delete the failures no window can count any more (older than LONGEST_WINDOW), a batch
    per transaction; how many went. The worker's sweep runs it."""
    removed = 0
    for _ in range(PRUNE_MAX_BATCHES):
        with uow:
            done = uow.commerce.remove_failures_before(uow.clock() - LONGEST_WINDOW, PRUNE_BATCH)
            uow.commit()
        removed += done
        if done < PRUNE_BATCH:
            break
    return removed
