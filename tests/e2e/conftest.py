from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import DATABASES
from tests.e2e.server import Server, running
from tests.mailserver import Inbox, smtp_server


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


@pytest.fixture(scope="session", params=DATABASES)
def shared_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One server per database for the whole session, for modules that opt in by making it
    their `server` (each start costs seconds). Such modules make their own platforms and
    accounts and find their own lines in the log by request id, as on a fresh server."""
    with running(request.param, tmp_path_factory.mktemp("shared")) as found:
        yield found


@pytest.fixture(scope="session")
def shared_admin_key(shared_server: Server) -> str:
    return shared_server.key("e2e-admin")


@pytest.fixture(scope="module")
def inbox() -> Iterator[tuple[Inbox, int]]:
    """An SMTP server of the test module's own, and its port."""
    with smtp_server() as found:
        yield found
