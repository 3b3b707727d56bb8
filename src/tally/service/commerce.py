"""Commerce use cases: fulfil a sale (order, code and email in one transaction), redeem a code
(atomically, rate limited), and deliver the outbox."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Final

import structlog

from tally.domain import codes, values
from tally.domain.commerce import (
    Code,
    CodeStatus,
    Order,
    OrderStatus,
    Sale,
    credits_expire_at,
    draw_credits,
)
from tally.domain.errors import (
    CodeInvalidOrUsed,
    CodeNotFound,
    IdempotencyKeyReused,
    RateLimited,
    TallyError,
)
from tally.domain.model import Lot, Origin
from tally.domain.values import ClientAddress
from tally.service import limits, refunds
from tally.service.changes import LOCAL_SCOPE, Command, adapter, fingerprint
from tally.service.issuing import Links, issue_code
from tally.service.ports import (
    DuplicateSale,
    Email,
    Mailer,
    MailRefused,
    MailTemporary,
    Renderer,
    UnitOfWork,
)

#: Rule 11's default: 10 failed attempts per hour, per account and per client address.
FAILURES_PER_WINDOW: Final = limits.FAILURES_PER_WINDOW
#: Outbox retries: backoff doubles from 30 s up to an hour; after this many tries the message
#: is marked failed for support to resend.
MAIL_MAX_ATTEMPTS: Final = 12
MAIL_FIRST_BACKOFF: Final = timedelta(seconds=30)
MAIL_MAX_BACKOFF: Final = timedelta(hours=1)
MAIL_BATCH_MAX: Final = 100
#: A claimed message is not due again for this long: longer than a send can take (each SMTP
#: step times out after 30 s), so no other worker sends it meanwhile. A worker stopped while
#: sending leaves the message to be tried again then, as its next attempt.
MAIL_CLAIM: Final = timedelta(minutes=10)

log = structlog.get_logger("tally.mail")


@dataclass(frozen=True)
class Fulfilment:
    order: Order
    created: bool  # False: the sale had an order already and nothing changed


def fulfil(sale: Sale, uow: UnitOfWork, *, pepper: bytes, links: Links) -> Fulfilment:
    """One order per sale however often it is reported: the order, its code and the email
    that delivers the code are written in one transaction (rules 5, 10, 12)."""
    with uow:
        now = uow.clock()
        package = sale.package
        order = Order(
            id=values.new_id("ord", now),
            processor=sale.processor,
            sale_id=sale.sale_id,
            order_number=sale.order_number or sale.sale_id,
            package_id=package.id,
            quantity=sale.quantity,
            credits=draw_credits(package, sale.quantity),
            price=sale.price,
            currency=sale.currency,
            validity=package.validity,
            expires_at=credits_expire_at(package, sale.purchased_at),
            email=sale.email,
            gifter_email=sale.gifter_email,
            is_test=sale.is_test,
            status=OrderStatus.FULFILLED,
            purchased_at=sale.purchased_at,
            created_at=now,
            payment_ref=sale.payment_ref,
        )
        try:
            uow.commerce.add_order(order)
        except DuplicateSale:
            found = uow.commerce.order_by_sale(sale.processor, sale.sale_id)
            assert found is not None, "the sale that won the race is committed"
            return Fulfilment(found, created=False)
        # Refunds and disputes reported before the sale apply now; a refunded or disputed
        # order's code is never emailed (see service/refunds.py).
        order = refunds.apply_pending(
            order, uow, pepper=pepper, links=links, package_name=package.name, now=now
        )
        template = "gift_code" if sale.is_gift else "purchase_code"
        with uow.batch():  # the code and its email: one statement on PostgreSQL
            if refunds.needs_code(order):
                issue_code(order, template, package.name, uow, pepper=pepper, links=links, now=now)
            uow.commit()
    return Fulfilment(order, created=True)


def record_unmatched(
    processor: str, sale_id: str | None, reason: str, payload: object, uow: UnitOfWork
) -> bool:
    """A ping Tally will not fulfil by guess (an unknown product, an unusable address): kept
    for support once per sale, however often the processor repeats it, and not at all when
    the sale has an order already. True when it was kept now."""
    with uow:
        if sale_id is not None:
            # What the store keeps of the id: PostgreSQL holds no NUL, the column 128 chars.
            kept_id = sale_id.replace("\x00", "\ufffd")[:128]
            uow.commerce.lock_sale(processor, f"unmatched:{kept_id}")  # one of two repeats
            if uow.commerce.order_by_sale(processor, kept_id) is not None:
                return False
            if uow.commerce.unmatched_recorded(processor, kept_id):
                return False
        uow.commerce.add_unmatched(processor, sale_id, reason, payload, uow.clock())
        uow.commit()
    return True


@dataclass(frozen=True)
class CodeInfo:
    code: Code
    order: Order


def look_up_code(
    text: str,
    uow: UnitOfWork,
    *,
    pepper: bytes,
    platform_id: str | None = None,
    client_address: ClientAddress | None = None,
    allowance: limits.Allowance = limits.Allowance(),  # noqa: B008 - frozen
) -> CodeInfo:
    """Support's view of a code: its state, its order and who redeemed it. A miss counts as
    a failed redemption through the platform (service/limits.py): look-ups are no oracle."""
    normalised = codes.normalise(text)
    checked = limits.for_look_up(platform_id or LOCAL_SCOPE, client_address, allowance)
    with uow:
        now = uow.clock()
        limits.enforce(uow, checked, now)
        code = None if normalised is None else uow.commerce.code(codes.digest(normalised, pepper))
        order = None if code is None else uow.commerce.order(code.order_id)
        if code is None or order is None:
            limits.record(uow, checked, now)
            uow.commit()
            raise CodeNotFound("no code matches")
    return CodeInfo(code, order)


@dataclass(frozen=True, kw_only=True)
class Redeem(Command):
    code: str
    account_id: str
    #: Normalised (values.client_address); None when the caller does not know it.
    client_address: ClientAddress | None = None


def redeem(
    cmd: Redeem,
    uow: UnitOfWork,
    *,
    pepper: bytes,
    allowance: limits.Allowance = limits.Allowance(),  # noqa: B008 - frozen
) -> Lot:
    """Turn a code into a lot on the account, once (rule 11). Wrong, voided and used codes get
    one answer. Failures count as service/limits.py says: through a platform per account, per
    client address and per platform; without one (the public page) per address and for the
    page, never against the account. The count is checked and the failure recorded in the
    one transaction that holds the limits' locks, so parallel guesses cannot outrun it."""
    values.account_id(cmd.account_id)
    key = values.idempotency_key(cmd.idempotency_key)
    scope = cmd.platform_id or LOCAL_SCOPE
    # The request is the code as a code and the account, however it was typed or from where.
    request_hash = fingerprint(
        replace(cmd, code=codes.normalise(cmd.code) or cmd.code, client_address=None)
    )
    checked = limits.for_redemption(cmd.platform_id, cmd.account_id, cmd.client_address, allowance)
    refused: RateLimited | CodeInvalidOrUsed | None = None
    with uow:
        now = uow.clock()
        replayed = _stored_redemption(uow, scope, key, request_hash)
        if replayed is not None:
            return replayed
        try:
            limits.enforce(uow, checked, now)
        except RateLimited as error:
            refused = error
        if refused is None:
            normalised = codes.normalise(cmd.code)
            code = (
                None
                if normalised is None
                else uow.commerce.code_for_update(codes.digest(normalised, pepper))
            )
            order = None if code is None else uow.commerce.order(code.order_id)
            # The same request, sent again while the first held the code's lock, finds the
            # code redeemed: the first one's stored answer, committed meanwhile, is its answer.
            # Only a code already taken needs the second look, so a redemption costs no read.
            taken = code is not None and code.status is not CodeStatus.ISSUED
            again = _stored_redemption(uow, scope, key, request_hash) if taken else None
            if again is not None:
                return again
            if (
                code is None
                or order is None
                or code.status is not CodeStatus.ISSUED
                or (order.expires_at is not None and order.expires_at <= now)
            ):
                limits.record(uow, checked, now)
                uow.commit()
                refused = CodeInvalidOrUsed("this code is not valid or was used already")
            else:
                lot = _credit(cmd, code, order, uow, now=now, key=key)
                uow.idempotency.add(
                    scope,
                    key,
                    request_hash=request_hash,
                    response=adapter(Lot).dump_python(lot, mode="json"),
                    account_id=cmd.account_id,
                    now=now,
                )
                uow.commit()
                uow.replayed = False
                return lot
    assert refused is not None
    raise refused


def _stored_redemption(uow: UnitOfWork, scope: str, key: str, request_hash: str) -> Lot | None:
    """The answer stored under this key, replayed; IdempotencyKeyReused for another request."""
    stored = uow.idempotency.get(scope, key)
    if stored is None:
        return None
    if stored.request_hash != request_hash:
        raise IdempotencyKeyReused
    uow.replayed = True
    replayed: Lot = adapter(Lot).validate_python(stored.response)
    return replayed


def _credit(
    cmd: Redeem, code: Code, order: Order, uow: UnitOfWork, *, now: datetime, key: str
) -> Lot:
    """The order's credits as a lot on the account, and the code marked redeemed."""
    account = uow.accounts.get_for_update(cmd.account_id, create_at=now)
    assert account is not None
    account.settle(now)
    lot = account.grant(
        amount=order.credits_left,  # a partial refund before redemption took its share
        source=order.source,
        expires_at=order.expires_at,
        priority=0,
        now=now,
        origin=Origin(key, cmd.platform_id, f"code ...{code.last4} of order {order.order_number}"),
        metadata={"order_id": order.id, "code_id": code.id},
    )
    uow.accounts.save(account)
    uow.commerce.mark_redeemed(code.id, account.account_id, lot.id, now)
    return lot


@dataclass(frozen=True)
class Delivery:
    sent: int = 0
    retried: int = 0
    failed: int = 0


def deliver_mail(
    uow: UnitOfWork,
    sender: Mailer,
    templates: Renderer,
    links: Links,
    *,
    batch: int = MAIL_BATCH_MAX,
) -> Delivery:
    """Send due outbox messages, each on its own: claimed in one short transaction (its
    attempt counted, not due again for MAIL_CLAIM, so no other worker sends it meanwhile),
    prepared and sent with no transaction open (a slow mail server holds no lock), and its
    outcome recorded in another. Whatever goes wrong with one message, its data, its template
    or the server's answer, is recorded on that message and the others go on: no row can
    block the queue. Once sent, its plaintext code is erased (rule 10)."""
    assert 1 <= batch <= MAIL_BATCH_MAX
    sent = retried = failed = 0
    for _ in range(batch):
        with uow:
            now = uow.clock()
            claimed = uow.commerce.claim_message(now, until=now + MAIL_CLAIM)
            uow.commit()
        if claimed is None:
            break
        message_id, attempts = claimed
        error, final = _attempt(
            uow, message_id, attempts, sender=sender, templates=templates, links=links
        )
        if error is None:
            sent += 1
            continue
        with uow:
            now = uow.clock()
            retry_at = None
            if not final and attempts < MAIL_MAX_ATTEMPTS:
                retry_at = now + min(MAIL_MAX_BACKOFF, MAIL_FIRST_BACKOFF * 2 ** (attempts - 1))
            # The claim holds unless support requeued the message meanwhile: then its fresh
            # start stands.
            uow.commerce.message_failed(
                message_id, attempts=attempts, retry_at=retry_at, error=error
            )
            uow.commit()
        retried += retry_at is not None
        failed += retry_at is None
        log.warning(
            "mail_not_sent",
            message_id=message_id,
            attempts=attempts,
            retry_at=None if retry_at is None else retry_at.isoformat(),
            error=error,
        )
    return Delivery(sent, retried, failed)


def _attempt(
    uow: UnitOfWork,
    message_id: str,
    attempts: int,
    *,
    sender: Mailer,
    templates: Renderer,
    links: Links,
) -> tuple[str | None, bool]:
    """Prepare and send one claimed message; on success record it sent. Answers (None,
    True) when sent, else (the error for support, whether it is final)."""
    if attempts > MAIL_MAX_ATTEMPTS:  # claimed that often, never recorded: sending it kills
        return f"not sent in {MAIL_MAX_ATTEMPTS} attempts: the worker stopped while sending", True
    try:
        with uow.read_only():
            message = uow.commerce.message(message_id)
        assert message is not None, "a claimed message stays"
        text, html = templates.render(message.template, message.subject, message.context)
        email = Email(
            message_id=f"<{message.id}@{links.mail_domain}>",
            sender=links.mail_from,
            to=message.to_email,
            subject=message.subject,
            text=text,
            html=html,
        )
    except TallyError:
        raise  # the database is down: the job fails, the claim lapses, the message waits
    except Exception as error:  # its data or its template: the same every time, so final
        log.warning("mail_unprepared", message_id=message_id, exc_info=True)
        return f"could not prepare the message: {type(error).__name__}: {error}", True
    try:
        sender.send(email, uow.clock())
    except MailTemporary as error:
        return str(error) or "the mail server did not take it", False
    except MailRefused as error:
        return str(error) or "the mail server refused it", True
    except Exception as error:  # a bug in sending, or an outage nobody classified: retried
        log.warning("mail_send_crashed", message_id=message_id, exc_info=True)
        return f"{type(error).__name__}: {error}", False
    scrubbed = dict(message.context)
    if isinstance(scrubbed.get("code"), str):
        scrubbed["code"] = f"XXXX-XXXX-XXXX-{str(scrubbed['code'])[-4:]}"
    with uow:
        uow.commerce.message_sent(message_id, scrubbed, uow.clock(), attempts=attempts)
        uow.commit()
    return None, True
