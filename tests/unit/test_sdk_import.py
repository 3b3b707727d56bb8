"""The SDK ships without the server: importing it loads no web framework, database driver or
server module of Tally's."""

from __future__ import annotations

import subprocess
import sys

SERVER = ("fastapi", "starlette", "sqlalchemy", "uvicorn", "psycopg", "alembic", "jinja2")
TALLY_SERVER = ("tally.entrypoints", "tally.adapters", "tally.service", "tally.bootstrap")


def test_importing_the_sdk_loads_nothing_of_the_server() -> None:
    probe = (
        "import sys, tally.client; "
        f"print('\\n'.join(m for m in sys.modules if m.startswith({SERVER + TALLY_SERVER!r})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.split()
    assert loaded == []
