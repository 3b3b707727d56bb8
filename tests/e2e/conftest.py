from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import DATABASES
from tests.e2e.server import Server, running


@pytest.fixture(scope="module", params=DATABASES)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One real server per test module and database; tests make their own platforms and
    accounts, so they do not see each other's data."""
    with running(request.param, tmp_path_factory.mktemp("serve")) as found:
        yield found


@pytest.fixture(scope="module")
def admin_key(server: Server) -> str:
    return server.key("e2e-admin")
