"""What `schemathesis run` (tests/e2e/test_http_schema.py, tests/e2e/schemathesis.toml) adds to its
built-in checks for Tally.

- Each request's Idempotency-Key is made from the request itself. A key stands for one
  request (rule 5): generated keys are few and short, so the same key would come back with
  other bodies and be refused as `idempotency_key_reused`, which no schema can foresee. A key
  the schema refuses is sent as generated, so the API's refusal of it is still tested.
- One more check: a request the schema accepts is never refused for its shape. Where the
  configuration allows a 422 (a rule beyond any schema: a time in the past, a code never
  issued), its `code` must name that rule, never a validation error of the request.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import MutableMapping
from typing import Any, Final

import schemathesis
from schemathesis import Case, CheckContext, HookContext, Response

from tally.entrypoints.http.openapi import IDEMPOTENCY_KEY_PATTERN

#: Codes that say a request's shape is wrong: the schema must have refused it first.
SHAPE_CODES: Final = frozenset(
    {
        "invalid_json",
        "invalid_amount",
        "invalid_account_id",
        "invalid_idempotency_key",
        "idempotency_key_required",
        "idempotency_key_reused",
        "unknown_tool",
    }
)


#: The document's pattern (Python's `re` reads its `\uXXXX` escapes as ECMAScript does).
_KEY: Final = re.compile(IDEMPOTENCY_KEY_PATTERN)


def _valid_key(value: object) -> bool:
    """What the document says the API takes (and it does)."""
    return isinstance(value, str) and len(value) <= 255 and bool(_KEY.fullmatch(value))


@schemathesis.hook
def before_call(context: HookContext, case: Case[Any], kwargs: dict[str, Any]) -> None:
    headers: MutableMapping[str, Any] = case.headers or {}
    name = next((h for h in headers if h.lower() == "idempotency-key"), None)
    if name is None or not _valid_key(headers[name]):
        return
    request = json.dumps(
        [case.method, case.formatted_path, case.query, case.body, dict(headers)],
        default=repr,
        sort_keys=True,
    )
    headers[name] = hashlib.sha256(request.encode()).hexdigest()


@schemathesis.check
def refused_only_by_rules_beyond_the_schema(
    ctx: CheckContext, response: Response, case: Case[Any]
) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    if response.status_code not in (400, 422):
        return None
    try:
        problem = json.loads(response.content)
    except ValueError:
        problem = {}
    code = problem.get("code") if isinstance(problem, dict) else None
    if code in SHAPE_CODES or (isinstance(problem, dict) and "errors" in problem):
        raise AssertionError(
            f"A request the schema accepts was refused for its shape: {response.status_code}"
            f" {code}: {problem.get('detail') if isinstance(problem, dict) else problem}"
        )
    return None
