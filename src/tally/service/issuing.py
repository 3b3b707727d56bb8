"""A code and the email that delivers it: what a sale, a replacement and a won dispute all
make, inside their caller's transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

from tally.domain import codes, values
from tally.domain.commerce import Code, CodeStatus, Message, Order
from tally.service.ports import UnitOfWork

_SUBJECTS: Final = {
    "purchase_code": "Your {package} credits: {credits} credits",
    "gift_code": "A gift for you: {credits} credits",
    "replacement_code": "Your new code for {package}",
}


@dataclass(frozen=True)
class Links:
    """Where emails send people."""

    redeem_url: str
    lost_code_url: str
    mail_from: str
    mail_domain: str


def issue_code(
    order: Order,
    template: str,
    package_name: str,
    uow: UnitOfWork,
    *,
    pepper: bytes,
    links: Links,
    now: datetime,
    note: dict[str, object] | None = None,
) -> Code:
    """A new issued code for the order and the email that delivers it, inside the caller's
    transaction. `note` (who asked for a replacement, and why) is kept with the email."""
    plaintext = codes.new_code()
    code = Code(
        id=values.new_id("code", now),
        order_id=order.id,
        last4=codes.last4(plaintext),
        status=CodeStatus.ISSUED,
        created_at=now,
    )
    uow.commerce.add_code(code, codes.digest(plaintext, pepper))
    context: dict[str, object] = {
        "package_name": package_name,
        "credits": order.credits_left,  # what the code grants after any partial refund
        "expires_at": None if order.expires_at is None else order.expires_at.date().isoformat(),
        "code": codes.display(plaintext),
        "redeem_url": links.redeem_url,
        "lost_code_url": links.lost_code_url,
        "order_number": order.order_number,
        "gifter_email": order.gifter_email,
    }
    if note:
        context.update(note)
    subject = _SUBJECTS[template].format(package=package_name, credits=order.credits_left)
    uow.commerce.add_message(
        Message(
            id=values.new_id("msg", now),
            cause=f"code:{code.id}",
            template=template,
            to_email=order.email,
            subject=subject,
            context=context,
            order_id=order.id,
            attempts=0,
            created_at=now,
        ),
        now,
    )
    return code


__all__ = ["Links", "issue_code"]
