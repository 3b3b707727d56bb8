"""The API keeps the promises of its own /openapi.json: schemathesis generates requests from
the schema the running server publishes and sends them to it. `schemathesis run` with every
check (tests/e2e/schemathesis.toml: bounded and seeded) must find nothing; so must a run per
operation that mixes real ids into the generated ones. The document itself says what the API
takes and answers: problem+json refusals with their codes, a required Idempotency-Key,
integers that are integers."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
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

from tally.domain.errors import by_code
from tests.e2e.server import Api, Server, ok

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")

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


def test_schemathesis_with_every_check_finds_nothing(server: Server, admin_key: str) -> None:
    """The run tests/e2e/schemathesis.toml describes (every check, the hooks of
    tests/e2e/schemathesis_hooks.py), on an account with credits so that spending succeeds."""
    api = Api(server, admin_key)
    try:
        account = f"schemathesis-{secrets.token_hex(6)}"
        api.grant(account, 2**40)
    finally:
        api.close()
    env = {**os.environ, "TALLY_SCHEMA_KEY": admin_key, "TALLY_SCHEMA_ACCOUNT": account}
    done = subprocess.run(
        [
            SCHEMATHESIS,
            "--config-file",
            str(ROOT / "tests" / "e2e" / "schemathesis.toml"),
            "run",
            f"{server.base_url}/openapi.json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-30_000:]
    assert " passed" in report
    assert "failure" not in report.split("SUMMARY")[-1].lower()


@pytest.fixture(scope="module")
def document(server: Server) -> dict[str, Any]:
    found: dict[str, Any] = httpx.get(f"{server.base_url}/openapi.json").json()
    return found


def _operations(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{method.upper()} {path}": operation
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    }


def test_every_refusal_is_documented_as_problem_json_with_its_codes(
    document: dict[str, Any],
) -> None:
    codes: dict[int, set[str]] = {}
    for code, kind in by_code().items():
        codes.setdefault(kind.status, set()).add(code)
    schemas = document["components"]["schemas"]
    for label, operation in _operations(document).items():
        for status, answer in operation["responses"].items():
            if int(status) < 400:
                assert list(answer.get("content", {"application/json": 1})) != [
                    "application/problem+json"
                ], label
                continue
            assert list(answer["content"]) == ["application/problem+json"], (label, status)
            ref = answer["content"]["application/problem+json"]["schema"]["$ref"]
            problem = schemas[ref.rsplit("/", 1)[1]]
            assert set(problem["properties"]["code"]["enum"]) == codes[int(status)], label
            assert problem["properties"]["status"]["enum"] == [int(status)]
        assert {"413", "500", "503"} <= set(operation["responses"]), label
    assert "HTTPValidationError" not in schemas
    assert codes[400] >= {"event_malformed", "idempotency_key_required", "invalid_json"}
    spending = _operations(document)["POST /v1/accounts/{account_id}/debits"]["responses"]
    assert "402" in spending
    assert "insufficient_credits" in spending["402"]["description"]


def test_the_document_says_what_requests_the_api_takes(document: dict[str, Any]) -> None:
    # OpenAPI 3.0: JSON Schema draft 4, where 5.0 is not an integer (rule 1 refuses it).
    assert document["openapi"] == "3.0.3"
    assert document["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer", "description": "an API key, `tly_...`"}
    }
    operations = _operations(document)
    keyed = [
        label
        for label, operation in operations.items()
        if any(p["name"] == "Idempotency-Key" for p in operation.get("parameters", []))
    ]
    assert sorted(keyed) == sorted(label for label in OPERATIONS if label.startswith("POST /v1/"))
    for label in keyed:
        [key] = [p for p in operations[label]["parameters"] if p["name"] == "Idempotency-Key"]
        assert key["required"] is True
        assert key["schema"]["maxLength"] == 255
    for label, operation in operations.items():
        names = [p["name"].lower() for p in operation.get("parameters", [])]
        assert "authorization" not in names, label
        assert (operation.get("security") == [{"bearer": []}]) == label.startswith(
            ("GET /v1/", "POST /v1/", "PUT /v1/")
        ), label
    schemas = document["components"]["schemas"]
    hold = schemas["HoldIn"]
    assert [option["required"] for option in hold["oneOf"]] == [["tool", "quantity"], ["amount"]]
    assert hold["properties"]["tool"]["enum"][:2] == ["ai_model", "background"]
    assert schemas["GrantIn"]["not"]["required"] == ["expires_at", "valid_for"]
    assert schemas["CaptureIn"]["not"]["required"] == ["quantity", "amount"]
    [filters, *_] = operations["GET /v1/orders"]["parameters"]
    assert (filters["in"], filters["style"], filters["explode"]) == ("query", "form", True)
    assert [option["required"] for option in filters["schema"]["anyOf"]] == [
        ["email"],
        ["order_number"],
    ]


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("HoldIn", {}),
        ("DebitIn", {}),
        ("DebitIn", {"amount": 2010335.0}),
        ("HoldIn", {"amount": 5, "tool": "logo", "quantity": 1}),
        ("HoldIn", {"tool": "no-such-tool", "quantity": 1}),
        (
            "GrantIn",
            {"amount": 1, "reason": "x", "expires_at": "2030-01-01T00:00:00Z", "valid_for": "P1D"},
        ),
        ("GrantIn", {"amount": 1, "reason": "\x00"}),
        ("GrantIn", {"amount": 1, "reason": "x", "expires_at": "9999-12-31T23:59:59-14:00"}),
        ("CaptureIn", {"amount": 1, "quantity": 1}),
        ("RefundIn", {"reason": " \u00a0"}),
        ("RedemptionIn", {"code": "ABCD", "account_id": "a/b"}),
    ],
)
def test_the_schema_refuses_what_the_api_refuses(
    document: dict[str, Any], name: str, body: dict[str, Any]
) -> None:
    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    assert not jsonschema_rs.Draft4Validator(root).is_valid(body)


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("HoldIn", {"amount": 5}),
        ("HoldIn", {"tool": "logo", "quantity": 2, "ttl_seconds": 60}),
        ("DebitIn", {"amount": 2010335}),
        ("GrantIn", {"amount": 1, "reason": "x", "expires_at": "8999-12-31T23:59:59Z"}),
        ("CaptureIn", {}),
        ("RefundIn", {"reason": " asked "}),
    ],
)
def test_the_schema_takes_what_the_api_takes(
    document: dict[str, Any], name: str, body: dict[str, Any]
) -> None:
    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    assert jsonschema_rs.Draft4Validator(root).is_valid(body)
