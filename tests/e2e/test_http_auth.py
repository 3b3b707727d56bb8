"""Who may call what (docs/rules.md §3): every /v1 endpoint against no key, bad keys, a revoked key
and a key of each scope, on a real server over SQLite and PostgreSQL."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.e2e.server import Api, Server, ok, problem

SCOPES = ("read", "spend", "grant", "support")
UNKNOWN_HOLD = "hold_00000000000000000000000000"
UNKNOWN_LOT = "lot_00000000000000000000000000"


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # {account} is a funded account
    scope: str
    status: int  # what a key with the scope gets: past the gate, the request is served
    body: dict[str, Any] | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


ENDPOINTS = [
    Endpoint("PUT", "/v1/accounts/{account}", "grant", 200, {"email": "ana@example.com"}),
    Endpoint("GET", "/v1/accounts/{account}/balance", "read", 200),
    Endpoint("GET", "/v1/accounts/{account}/lots", "read", 200),
    Endpoint("GET", "/v1/accounts/{account}/entries", "read", 200),
    Endpoint("POST", "/v1/accounts/{account}/grants", "grant", 201, {"amount": 1, "reason": "r"}),
    Endpoint("POST", f"/v1/lots/{UNKNOWN_LOT}/void", "support", 404, {"reason": "r"}),
    Endpoint("POST", "/v1/accounts/{account}/holds", "spend", 201, {"amount": 1}),
    Endpoint("POST", f"/v1/holds/{UNKNOWN_HOLD}/capture", "spend", 404),
    Endpoint("POST", f"/v1/holds/{UNKNOWN_HOLD}/release", "spend", 404),
    Endpoint("POST", "/v1/accounts/{account}/debits", "spend", 201, {"amount": 1}),
    Endpoint("GET", "/v1/tools", "read", 200),
    Endpoint("GET", "/v1/packages", "read", 200),
    Endpoint("GET", "/v1/plans", "read", 200),
]

# What each kind of credential gets, whatever the endpoint: None means "decided by scope".
CREDENTIALS: dict[str, tuple[int, str] | None] = {
    "none": (401, "api_key_required"),
    "empty": (401, "api_key_required"),
    "malformed": (401, "api_key_invalid"),
    "not-bearer": (401, "api_key_invalid"),
    "bearer-without-key": (401, "api_key_invalid"),
    "unknown": (401, "api_key_invalid"),
    "wrong-secret": (401, "api_key_invalid"),
    "revoked": (401, "api_key_invalid"),
    **dict.fromkeys(SCOPES),
    "admin": None,
    "admin-lowercase-scheme": None,
}


@pytest.fixture(scope="module")
def server(shared_server: Server) -> Server:
    return shared_server


@pytest.fixture(scope="module")
def admin_key(shared_admin_key: str) -> str:
    return shared_admin_key


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    """No key of its own: each request names its credential."""
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield client


def _random_key() -> str:
    alphabet = "0123456789abcdefghjkmnpqrstvwxyz"
    return "tly_{}_{}".format(
        *("".join(secrets.choice(alphabet) for _ in range(n)) for n in (10, 32))
    )


@pytest.fixture(scope="module")
def account(server: Server, admin_key: str) -> str:
    """One account with credits for every spend the matrix lets through."""
    name = f"auth-{secrets.token_hex(6)}"
    api = Api(server, admin_key)
    try:
        api.grant(name, 10_000)
    finally:
        api.close()
    return name


@pytest.fixture(scope="module")
def revoked(server: Server, http: httpx.Client, account: str) -> str:
    """A key that worked until `tally keys revoke`; its sibling key is spared."""
    key, sibling = server.keys("auth-revoked", "read,spend,grant,support", "read")

    def tools(with_key: str) -> httpx.Response:
        return http.get("/v1/tools", headers={"Authorization": f"Bearer {with_key}"})

    ok(tools(key))
    ok(tools(sibling))
    # The spending and granting routes remember a key once it worked (the change re-checks
    # it in its own transaction): use it there first, so the matrix tests that path too.
    headers = {"Authorization": f"Bearer {key}"}
    for path, body in (
        (f"/v1/accounts/{account}/grants", {"amount": 5, "source": "promotional", "reason": "t"}),
        (f"/v1/accounts/{account}/debits", {"amount": 1}),
        (f"/v1/accounts/{account}/holds", {"amount": 1}),
    ):
        ok(
            http.post(
                path, json=body, headers={**headers, "Idempotency-Key": secrets.token_hex(8)}
            ),
            201,
        )
    server.revoke(key)
    # At once: the very next request with it is refused; the sibling still works.
    problem(tools(key), 401, "api_key_invalid")
    ok(tools(sibling))
    return key


@pytest.fixture(scope="module")
def authorization(server: Server, admin_key: str, revoked: str) -> dict[str, str | None]:
    """The Authorization header each kind of credential sends (None: no header at all)."""
    prefix, secret = admin_key.rsplit("_", 1)
    wrong = secret[:-1] + ("0" if secret[-1] != "0" else "1")
    scoped = dict(zip(SCOPES, server.keys("auth-scopes", *SCOPES), strict=True))
    return {
        "none": None,
        "empty": "",
        "malformed": "Bearer not-a-tally-key",
        "not-bearer": f"Basic {admin_key}",
        "bearer-without-key": "Bearer",
        "unknown": f"Bearer {_random_key()}",
        "wrong-secret": f"Bearer {prefix}_{wrong}",
        "revoked": f"Bearer {revoked}",
        **{scope: f"Bearer {key}" for scope, key in scoped.items()},
        "admin": f"Bearer {admin_key}",
        "admin-lowercase-scheme": f"bearer {admin_key}",
    }


@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_auth_matrix(
    http: httpx.Client,
    account: str,
    authorization: dict[str, str | None],
    endpoint: Endpoint,
    credential: str,
) -> None:
    header = authorization[credential]
    headers = {"Idempotency-Key": secrets.token_hex(8)}
    if header is not None:
        headers["Authorization"] = header
    path = endpoint.path.format(account=account)
    answer = http.request(endpoint.method, path, json=endpoint.body, headers=headers)
    fixed = CREDENTIALS[credential]
    if fixed is not None:
        problem(answer, *fixed)
        assert answer.headers["www-authenticate"] == "Bearer"
    elif credential.startswith("admin") or credential == endpoint.scope:
        assert answer.status_code == endpoint.status, answer.text
    else:
        refused = problem(answer, 403, "scope_missing")
        assert refused["scope"] == endpoint.scope


def test_refused_callers_change_nothing(
    http: httpx.Client, account: str, authorization: dict[str, str | None]
) -> None:
    admin = {"Authorization": authorization["admin"] or ""}

    def state() -> tuple[Any, ...]:
        balance = ok(http.get(f"/v1/accounts/{account}/balance", headers=admin))
        newest = ok(http.get(f"/v1/accounts/{account}/entries", params={"limit": 1}, headers=admin))
        return balance["available"], balance["held"], newest["data"][0]["id"]

    before = state()
    for endpoint in ENDPOINTS:
        if endpoint.method == "GET":
            continue
        for credential, header in authorization.items():
            if credential.startswith("admin") or credential == endpoint.scope:
                continue
            headers = {"Idempotency-Key": secrets.token_hex(8), "Authorization": header or ""}
            path = endpoint.path.format(account=account)
            answer = http.request(endpoint.method, path, json=endpoint.body, headers=headers)
            assert answer.status_code in (401, 403), answer.text
    assert state() == before


def test_the_journal_names_the_platform_of_each_key(
    server: Server, http: httpx.Client, account: str, authorization: dict[str, str | None]
) -> None:
    for scope in ("grant", "admin"):
        headers = {"Authorization": authorization[scope] or "", "Idempotency-Key": "same-key"}
        body = {"amount": 2, "reason": "r"}
        ok(http.post(f"/v1/accounts/{account}/grants", json=body, headers=headers), 201)
    admin = {"Authorization": authorization["admin"] or ""}
    entries = ok(http.get(f"/v1/accounts/{account}/entries", params={"limit": 2}, headers=admin))
    # Two platforms, one key string: two grants, each under its own platform; a platform sees
    # its own idempotency key, never another's.
    assert [(e["type"], e["idempotency_key"], e["platform_id"]) for e in entries["data"]] == [
        ("grant", "same-key", server.platform_ids["e2e-admin"]),
        ("grant", None, server.platform_ids["auth-scopes"]),
    ]


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/openapi.json", "/docs"])
def test_operations_endpoints_need_no_key(http: httpx.Client, path: str) -> None:
    assert http.get(path).status_code == 200
