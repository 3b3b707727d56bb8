"""The abuse suite: Tally attacked at its edges, in-process on both databases.

`shop` is the whole HTTP app over a fresh ledger with an admin platform key; `make_shop`
builds one with other settings (production, another processor, other limits)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
import stripe

from tally.adapters.catalog_file import builtin
from tally.adapters.db.engine import Database
from tally.adapters.mail import Templates
from tally.bootstrap import Tally, group_commit
from tally.config import Settings
from tally.domain import codes
from tally.domain.commerce import Sale
from tally.entrypoints.http.app import create_app
from tally.service import commerce, platforms
from tests.support import FakeClock, Outbox

SECRET = "abuse suite secret"


class Client:
    """httpx's API, synchronously, over the app in this process (one event loop per client)."""

    def __init__(self, app: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
            base_url="http://tally.test",
        )
        self.headers = self.http.headers

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.loop.run_until_complete(self.http.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", url, **kwargs)

    def close(self) -> None:
        self.loop.run_until_complete(self.http.aclose())
        self.loop.close()


@dataclass
class Shop:
    tally: Tally
    client: Client
    #: An admin platform's key, already in `client`'s Authorization header.
    key: str

    def platform_key(self, name: str, role: str = "admin") -> str:
        return platforms.create_platform(name, role, self.tally.uow()).plaintext

    def as_platform(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def code(self, sale_id: str | None = None) -> str:
        """A fresh code for a Pro package (25 credits), as its email carries it."""
        tally = self.tally
        sale = Sale(
            processor="gumroad",
            sale_id=sale_id or f"sale-{secrets.token_hex(4)}",
            package=tally.catalog.packages["pro"],
            email="buyer@example.com",
            purchased_at=tally.clock(),
            price=2000,
        )
        commerce.fulfil(sale, tally.uow(), pepper=tally.pepper, links=tally.links)
        mail = Outbox()
        commerce.deliver_mail(tally.uow(), mail, Templates(), tally.links)
        (email,) = mail.sent
        return next(word for word in email.text.split() if codes.normalise(word) is not None)

    def stripe_event(self, payload: object, secret: str) -> httpx.Response:
        """`payload` (JSON, or text sent as it is) posted to the Stripe webhook, signed as
        Stripe signs it, by Stripe's own library."""
        body = payload if isinstance(payload, str) else json.dumps(payload)
        header = stripe.WebhookSignature.generate_signature_header(body, secret)
        return self.client.post(
            "/webhooks/stripe",
            content=body,
            headers={"Stripe-Signature": header, "Content-Type": "application/json"},
        )


MakeShop = Callable[..., Shop]


@pytest.fixture
def make_shop(db: Database, clock: FakeClock, tmp_path: Any) -> Iterator[MakeShop]:
    clients: list[Client] = []

    def make(**settings: Any) -> Shop:
        base = Settings(database_url="unused", mailbox_dir=tmp_path / "mailbox")
        tally = Tally(
            replace(base, **settings), db, clock, group_commit(db, clock), builtin(), SECRET
        )
        key = platforms.create_platform(f"shop{len(clients)}", "admin", tally.uow()).plaintext
        client = Client(create_app(tally))
        client.headers["Authorization"] = f"Bearer {key}"
        clients.append(client)
        return Shop(tally, client, key)

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def shop(make_shop: MakeShop) -> Shop:
    return make_shop()
