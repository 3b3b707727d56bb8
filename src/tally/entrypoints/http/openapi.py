"""`/openapi.json` as the API really behaves: FastAPI's document, rewritten once per app.

FastAPI describes the pydantic models; the API refuses more than they say, so the document is
brought to the truth here:

- OpenAPI 3.0.3 rather than 3.1. Rule 1 refuses `5.0` where credits go; JSON Schema draft 4
  (OpenAPI 3.0) reads `5.0` as a number, not an integer, while 2020-12 (OpenAPI 3.1) calls it
  an integer. Only 3.0 can say what the API takes.
- Every refusal is `application/problem+json` (RFC 9457), each status listing the `code`s it
  can carry, taken from the error hierarchy so a new error is documented as it is added.
- The API key is a bearer security scheme, not an optional header.
- `Idempotency-Key` is required wherever a route asks for it, with the characters it takes.
- Rules across fields the models check in code (`{tool, quantity}` or `{amount}`, one way of
  giving a validity, quantity or amount in a capture), the catalog's tools, and the texts the
  databases cannot store (NUL) are written as schema.

What no schema can say (a time in the past, a code that was never issued, more than a hold
holds) is refused with 422 and a specific `code`, listed in each operation's description.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, Final

from fastapi import FastAPI

from tally.domain.errors import by_code
from tally.domain.values import IDEMPOTENCY_KEY_MAX_LENGTH, TIME_YEAR_MAX, TIME_YEAR_MIN

OPENAPI_VERSION: Final = "3.0.3"
PROBLEM_JSON: Final = "application/problem+json"
BEARER: Final = "bearer"
#: Every operation may answer these (the edge's body limit, a bug, the database away).
ALWAYS: Final = (413, 500, 503)
#: Statuses added where a route can answer them beyond what its decorator lists.
EXTRA_STATUSES: Final[dict[str, tuple[int, ...]]] = {
    "GET /v1/codes/{code}": (429,),  # a look-up counts as a guess (rule 11)
    "POST /v1/accounts/{account_id}/debits": (402,),
    "POST /v1/accounts/{account_id}/holds": (402,),
}
#: Refusals of schema-valid requests, by operation: what each depends on beyond its shape.
STATE_RULES: Final[dict[str, str]] = {
    "GET /v1/accounts/{account_id}/balance": "`at` in the future is 422 `invalid_time`.",
    "GET /v1/accounts/{account_id}/entries": (
        "A `starting_after` that names no entry of this account is 422 `invalid_input`."
    ),
    "GET /v1/orders": "A `starting_after` that names no order is 422 `invalid_input`.",
    "POST /v1/accounts/{account_id}/grants": (
        "`expires_at` in the past is 422 `invalid_time`; a `valid_for` that is not an ISO 8601"
        " duration, not positive, or ends after the time range is 422 `invalid_duration`."
    ),
    "POST /v1/holds/{hold_id}/capture": (
        "More than the hold holds is 422 `capture_exceeds_hold`; a `quantity` for a hold placed"
        " by `amount` is 422 `invalid_input`."
    ),
    "POST /v1/redemptions": (
        "A code that was never issued, was voided or was used is 422 `code_invalid_or_used`."
    ),
    "PUT /v1/accounts/{account_id}": "An address that cannot receive mail may be refused (422).",
    "POST /webhooks/stripe": (
        "A `Stripe-Signature` that is not Stripe's HMAC of this body with the webhook secret,"
        " or older than 300 s, is 400 `signature_invalid`; a signed event not in Stripe's"
        " shape is 400 `event_malformed` (and kept for support)."
    ),
}

_TIME_RANGE = f"years {TIME_YEAR_MIN} to {TIME_YEAR_MAX} (UTC)"
#: RFC 3339 with an offset, as `values.parse_time` reads it, with years in Tally's range; the
#: instant must also lie in the range once the offset is applied.
TIME_PATTERN: Final = (
    r"^(19[7-9][0-9]|[2-8][0-9]{3})-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"(\.[0-9]{1,6})?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
#: Text both databases store: anything but NUL.
TEXT_PATTERN: Final = "^[^\\u0000]*$"


def _char_class(characters: Iterable[int]) -> str:
    """A regular expression's character class of exactly these code points."""
    runs: list[tuple[int, int]] = []
    for c in sorted(characters):
        if runs and runs[-1][1] == c - 1:
            runs[-1] = (runs[-1][0], c)
        else:
            runs.append((c, c))
    parts = [f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in runs]
    return "[" + "".join(parts) + "]"


def _latin1_class(*, space: bool) -> str:
    """The printable characters (`str.isprintable`) a header value can carry, as the server
    reads headers (Latin-1)."""
    return _char_class(c for c in range(0x100) if chr(c).isprintable() and (space or c != 0x20))


#: Text with something besides NUL and white space (Python's `str.strip`) in it.
_SOLID = "[^\\u0000" + _char_class(c for c in range(0x10000) if chr(c).isspace())[1:]
SOLID_TEXT_PATTERN: Final = f"^[^\\u0000]*{_SOLID}[^\\u0000]*$"
_PRINTABLE = _latin1_class(space=True)
_VISIBLE = _latin1_class(space=False)
#: `values.idempotency_key`: 1-255 printable characters. A header value has no white space
#: around it (RFC 9110: the server drops it before the key is read).
IDEMPOTENCY_KEY_PATTERN: Final = f"^{_VISIBLE}({_PRINTABLE}*{_VISIBLE})?$"


def install(app: FastAPI, tools: Callable[[], Iterable[str]]) -> None:
    """Serve the rewritten document at /openapi.json (and to /docs). `tools`: the catalog's
    tool ids, read when the document is first asked for."""
    build = app.openapi
    rewritten: dict[str, Any] | None = None

    def openapi() -> dict[str, Any]:
        nonlocal rewritten
        if rewritten is None:
            rewritten = app.openapi_schema = rewrite(build(), tools=sorted(tools()))
        return rewritten

    app.openapi = openapi  # type: ignore[method-assign]


def rewrite(document: dict[str, Any], *, tools: list[str]) -> dict[str, Any]:
    """FastAPI's 3.1 document, told true (see the module's docstring)."""
    found = copy.deepcopy(document)
    found["openapi"] = OPENAPI_VERSION
    components = found.setdefault("components", {})
    schemas: dict[str, Any] = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    components["securitySchemes"] = {
        BEARER: {"type": "http", "scheme": "bearer", "description": "an API key, `tly_...`"}
    }
    statuses: set[int] = set()
    for path, methods in found.get("paths", {}).items():
        for method, operation in methods.items():
            label = f"{method.upper()} {path}"
            _parameters(operation)
            if label == "GET /v1/orders":
                _order_filters(operation)
            statuses |= _responses(operation, label)
            rule = STATE_RULES.get(label)
            if rule:
                operation["description"] = f"{operation.get('description', '')}\n\n{rule}".strip()
    schemas.update(_problems(statuses))
    _bodies(schemas, tools)
    rewritten: dict[str, Any] = _to_openapi_30(found)
    return rewritten


# --- parameters ---------------------------------------------------------------------------------


def _parameters(operation: dict[str, Any]) -> None:
    kept = []
    for parameter in operation.get("parameters", []):
        name = parameter["name"].lower()
        if parameter["in"] == "header" and name == "authorization":
            operation["security"] = [{BEARER: []}]
            continue
        if parameter["in"] == "header" and name == "idempotency-key":
            parameter["required"] = True
            parameter["description"] = (
                "1-255 printable characters; the same key with the same request answers the"
                " first result, with another request 422 `idempotency_key_reused`"
            )
            parameter["schema"] = {
                "type": "string",
                "minLength": 1,
                "maxLength": IDEMPOTENCY_KEY_MAX_LENGTH,
                "pattern": IDEMPOTENCY_KEY_PATTERN,
            }
        elif parameter["in"] == "header" and name == "stripe-signature":
            parameter["required"] = True  # without it, 400 `signature_invalid`
            parameter["schema"] = {"type": "string"}
        elif parameter["in"] == "query" and name == "at":
            parameter["schema"] = _time_schema(nullable=False)
        kept.append(parameter)
    operation["parameters"] = kept
    if not kept:
        del operation["parameters"]


def _order_filters(operation: dict[str, Any]) -> None:
    """`email`, `order_number` or both, each with more than white space: one form-exploded
    object parameter, the one way OpenAPI 3.0 can require one of two query parameters. On the
    wire it is the same `?email=...&order_number=...`."""
    fields = {"email": "the buyer's or gift recipient's address", "order_number": "as sold"}
    found = {p["name"]: p for p in operation["parameters"] if p["name"] in fields}
    properties = {
        name: {
            "type": "string",
            "maxLength": found[name]["schema"]["anyOf"][0]["maxLength"],
            "pattern": TEXT_PATTERN,
            "description": description,
        }
        for name, description in fields.items()
    }
    solid = [
        {"required": [name], "properties": {name: {"pattern": SOLID_TEXT_PATTERN}}}
        for name in fields
    ]
    combined = {
        "name": "filter",
        "in": "query",
        "required": True,
        "style": "form",
        "explode": True,
        "description": "`email`, `order_number` or both (blank ones count as not given)",
        "schema": {
            "type": "object",
            "properties": properties,
            "additionalProperties": False,
            "anyOf": solid,
        },
    }
    kept = [p for p in operation["parameters"] if p["name"] not in fields]
    operation["parameters"] = [combined, *kept]


def _time_schema(*, nullable: bool) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "string",
        "pattern": TIME_PATTERN,
        "description": f"RFC 3339 with an offset, {_TIME_RANGE}",
        "example": "2027-01-01T00:00:00Z",
    }
    if nullable:
        schema["nullable"] = True
    return schema


# --- responses ----------------------------------------------------------------------------------


def _responses(operation: dict[str, Any], label: str) -> set[int]:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    wanted = {int(status) for status in responses if status.isdigit() and int(status) >= 400}
    wanted |= set(ALWAYS) | set(EXTRA_STATUSES.get(label, ()))
    if "security" in operation:
        wanted |= {401, 403}
    else:  # no key is asked for, so none is refused
        wanted -= {401, 403}
        for status in ("401", "403"):
            responses.pop(status, None)
    codes = _codes_by_status()
    for number in sorted(wanted):
        known = codes.get(number, [])
        answer: dict[str, Any] = {
            "description": ", ".join(f"`{code}`" for code in known) or "A problem",
            "content": {
                PROBLEM_JSON: {"schema": {"$ref": f"#/components/schemas/Problem{number}"}}
            },
        }
        if number == 401:
            answer["headers"] = {"WWW-Authenticate": _header("`Bearer`")}
        if number == 429:
            answer["headers"] = {"Retry-After": _header("seconds to wait", integer=True)}
        responses[str(number)] = answer
    keyed = any(p["name"] == "Idempotency-Key" for p in operation.get("parameters", []))
    for status, answer in responses.items():
        if status.startswith("2") and "content" not in answer and label == "GET /metrics":
            answer["content"] = {"text/plain": {"schema": {"type": "string"}}}
        headers = answer.setdefault("headers", {})
        headers["X-Request-Id"] = _header("this request's id in Tally's log")
        if status.startswith("2") and keyed:
            headers["Idempotent-Replayed"] = {
                "required": False,
                "description": "`true` when this is the stored answer to an earlier request",
                "schema": {"type": "string", "enum": ["true"]},
            }
    return wanted


def _header(description: str, *, integer: bool = False) -> dict[str, Any]:
    return {
        "required": True,
        "description": description,
        "schema": {"type": "integer"} if integer else {"type": "string"},
    }


def _codes_by_status() -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for code, kind in sorted(by_code().items()):
        found.setdefault(kind.status, []).append(code)
    return found


def _problems(statuses: set[int]) -> dict[str, Any]:
    codes = _codes_by_status()
    return {
        f"Problem{status}": {
            "type": "object",
            "title": f"Problem{status}",
            "description": "RFC 9457 problem details with Tally's stable `code`",
            "required": ["type", "title", "status", "code"],
            "properties": {
                "type": {"type": "string", "enum": ["about:blank"]},
                "title": {"type": "string"},
                "status": {"type": "integer", "enum": [status]},
                "code": {"type": "string", "enum": codes.get(status, ["tally_error"])},
                "detail": {"type": "string"},
                "request_id": {"type": "string"},
            },
            "additionalProperties": True,
        }
        for status in sorted(statuses)
    }


# --- request bodies -----------------------------------------------------------------------------


def _bodies(schemas: dict[str, Any], tools: list[str]) -> None:
    for schema in schemas.values():
        for name, field in schema.get("properties", {}).items():
            if name == "reason":
                _each_string(field, lambda s: s.setdefault("pattern", TEXT_PATTERN))
    for name in ("HoldIn", "DebitIn"):
        if name in schemas:
            _priced(schemas[name], tools)
    if "CaptureIn" in schemas:
        schemas["CaptureIn"]["not"] = _all_given("quantity", "amount", kind="integer")
        schemas["CaptureIn"]["description"] = "`quantity` or `amount` (or neither: all of it)"
    if "GrantIn" in schemas:
        grant = schemas["GrantIn"]
        grant["not"] = _all_given("expires_at", "valid_for", kind="string")
        grant["description"] = "`expires_at` or `valid_for` (or neither: the source's default)"
        grant["properties"]["expires_at"] = _time_schema(nullable=True)
    if "RefundIn" in schemas:  # a refund's reason is stripped, and must not be blank
        schemas["RefundIn"]["properties"]["reason"]["pattern"] = SOLID_TEXT_PATTERN
    if "RedemptionIn" in schemas:
        field = schemas["RedemptionIn"]["properties"]["account_id"]
        field["pattern"] = "^[A-Za-z0-9._:@-]+$"


def _each_string(field: dict[str, Any], change: Callable[[dict[str, Any]], Any]) -> None:
    for option in [field, *field.get("anyOf", [])]:
        if option.get("type") == "string":
            change(option)


def _all_given(*names: str, kind: str) -> dict[str, Any]:
    """A schema that holds when every one of `names` is present and not null."""
    return {"required": list(names), "properties": {name: {"type": kind} for name in names}}


def _priced(schema: dict[str, Any], tools: list[str]) -> None:
    """`{tool, quantity}` or `{amount}`, never both, never neither; tools from the catalog."""
    tool = schema["properties"]["tool"]
    _each_string(tool, lambda s: s.update(enum=[*tools, None]))
    null = {"enum": [None]}
    schema["oneOf"] = [
        {
            "title": "by tool",
            "required": ["tool", "quantity"],
            "properties": {
                "tool": {"type": "string"},
                "quantity": {"type": "integer"},
                "amount": null,
            },
        },
        {
            "title": "by amount",
            "required": ["amount"],
            "properties": {"amount": {"type": "integer"}, "tool": null, "quantity": null},
        },
    ]
    schema["description"] = "`{tool, quantity}` priced from the catalog, or `{amount}`"


# --- OpenAPI 3.1 to 3.0 -------------------------------------------------------------------------


def _to_openapi_30(node: Any) -> Any:
    """The 3.1 (JSON Schema 2020-12) spellings FastAPI writes, in 3.0's: `nullable` for a
    null alternative, `enum` for `const`, one `example` for `examples`, whole numbers for
    limits pydantic writes as floats."""
    if isinstance(node, list):
        return [_to_openapi_30(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _to_openapi_30(value) for key, value in node.items()}
    options = node.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options:
        rest = [option for option in options if option != {"type": "null"}]
        del node["anyOf"]
        if len(rest) == 1 and "$ref" not in rest[0]:
            node = {**rest[0], **node}
        else:
            node["anyOf" if len(rest) > 1 else "allOf"] = rest
        node["nullable"] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if isinstance(node.get("examples"), list) and "type" in node:
        examples = node.pop("examples")
        if examples:
            node["example"] = examples[0]
    for limit in ("minimum", "maximum"):
        value = node.get(limit)
        if isinstance(value, float) and value.is_integer():
            node[limit] = int(value)
    return node
