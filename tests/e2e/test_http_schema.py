"""The API keeps the promises of its own /openapi.json: schemathesis generates requests from the
schema the running server publishes and sends them to it, with an admin key and a fresh
Idempotency-Key each. No answer may be a 5xx, use an undocumented status, or break its schema."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.server import Api, Server, ok

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 25
OPERATIONS = [
    "PUT /v1/accounts/{account_id}",
    "GET /v1/accounts/{account_id}/balance",
    "GET /v1/accounts/{account_id}/lots",
    "GET /v1/accounts/{account_id}/entries",
    "POST /v1/accounts/{account_id}/grants",
    "POST /v1/lots/{lot_id}/void",
    "POST /v1/accounts/{account_id}/holds",
    "POST /v1/holds/{hold_id}/capture",
    "POST /v1/holds/{hold_id}/release",
    "POST /v1/accounts/{account_id}/debits",
    "GET /v1/tools",
    "GET /v1/packages",
    "GET /v1/plans",
    "POST /v1/redemptions",
    "GET /v1/codes/{code}",
    "GET /v1/orders",
    "POST /v1/orders/{order_id}/refund",
    "POST /v1/orders/{order_id}/reissue",
    "POST /webhooks/gumroad/{token}",
    "POST /webhooks/stripe",
    "GET /healthz",
    "GET /metrics",
]


@pytest.fixture(scope="module")
def server(shared_server: Server) -> Server:
    return shared_server


@pytest.fixture(scope="module")
def admin_key(shared_admin_key: str) -> str:
    return shared_admin_key


@pytest.fixture(scope="module")
def schema(server: Server) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


@pytest.fixture(scope="module")
def known(server: Server, admin_key: str) -> dict[str, list[str]]:
    """Real ids to mix into the generated ones: random ids almost never exist, and then only
    the 404 answers would be checked. Several lots and pending holds, so that some voids,
    captures and releases succeed before the rest find them used."""
    api = Api(server, admin_key)
    try:
        account = f"schema-{secrets.token_hex(6)}"
        lots = [api.grant(account, 2**40)["id"] for _ in range(4)]
        holds = [
            ok(api.post(f"/v1/accounts/{account}/holds", {"amount": 1}), 201)["id"]
            for _ in range(12)
        ]
    finally:
        api.close()
    return {"account_id": [account], "lot_id": lots, "hold_id": holds}


def test_the_schema_lists_every_operation(schema: schemathesis.BaseSchema) -> None:
    found = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in found), found
    labels = [result.ok().label for result in found if isinstance(result, Ok)]
    assert sorted(labels) == sorted(OPERATIONS)


@pytest.mark.parametrize("label", OPERATIONS)
def test_each_operation_keeps_its_schema(
    schema: schemathesis.BaseSchema,
    server: Server,
    admin_key: str,
    known: dict[str, list[str]],
    label: str,
) -> None:
    method, path = label.split(" ", 1)
    operation = schema[path][method]
    strategy = operation.as_strategy()
    for name, ids in known.items():
        if f"{{{name}}}" not in path:
            continue
        # Captures and releases each get pending holds of their own.
        mine = ids if name != "hold_id" else ids[::2] if path.endswith("/capture") else ids[1::2]
        real = [operation.as_strategy(path_parameters={name: value}) for value in mine]
        strategy = st.one_of(strategy, *real)

    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def conforms(case: Case[Any]) -> None:
        for name in [h for h in case.headers if h.lower() in ("authorization", "idempotency-key")]:
            del case.headers[name]
        case.headers["Authorization"] = f"Bearer {admin_key}"
        case.headers["Idempotency-Key"] = secrets.token_hex(16)
        case.call_and_validate(
            base_url=server.base_url,
            checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
        )

    conforms()
