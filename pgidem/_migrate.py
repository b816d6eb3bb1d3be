"""Applies the numbered migrations and checks that a database's schema matches the code."""

from __future__ import annotations

import psycopg

from pgidem import _sql
from pgidem.errors import SchemaOutdated, SchemaTooNew, mapped_errors


def code_version() -> int:
    """The schema version this code expects: the number of the last migration file."""
    return _sql.migrations()[-1].version


def database_version(conn: psycopg.Connection[object]) -> int | None:
    """The database's applied schema version; None if pgidem was never migrated there."""
    with mapped_errors():
        present = conn.execute(_sql.query("schema_exists")).fetchone()
        if not present or not present[0]:  # type: ignore[index]
            return None
        row = conn.execute(_sql.query("schema_version")).fetchone()
    return None if row is None else int(row[0])  # type: ignore[index]


def migrate(conn: psycopg.Connection[object]) -> list[int]:
    """Apply every pending migration in one transaction and return the versions applied.

    Safe to run from several processes at once: a transaction-level advisory lock makes them
    take turns, and the second finds nothing to do. A no-op when the schema is current.

    Raises:
        SchemaTooNew: the database has migrations this code does not know.
    """
    applied: list[int] = []
    with mapped_errors(), conn.transaction():
        conn.execute(_sql.query("migration_lock"))
        current = database_version(conn) or 0
        latest = code_version()
        if current > latest:
            raise SchemaTooNew(
                f"the database's pgidem schema is version {current}, newer than this pgidem "
                f"(which knows up to {latest}): upgrade pgidem"
            )
        for migration in _sql.migrations():
            if migration.version <= current:
                continue
            conn.execute(migration.sql.encode())
            conn.execute(
                _sql.query("migration_record"),
                {"version": migration.version, "name": migration.name},
            )
            applied.append(migration.version)
    return applied


def check(conn: psycopg.Connection[object]) -> None:
    """Refuse to run against a schema that does not match the code.

    Raises:
        SchemaOutdated: pgidem was never migrated here, or is behind: run `pgidem migrate`.
        SchemaTooNew: the database is ahead of this code: upgrade pgidem.
    """
    current = database_version(conn)
    latest = code_version()
    if current is None:
        raise SchemaOutdated("this database has no pgidem schema: run `pgidem migrate`")
    if current < latest:
        raise SchemaOutdated(
            f"the database's pgidem schema is version {current}, this code needs {latest}: "
            "run `pgidem migrate`"
        )
    if current > latest:
        raise SchemaTooNew(
            f"the database's pgidem schema is version {current}, newer than this pgidem "
            f"(which knows up to {latest}): upgrade pgidem"
        )
