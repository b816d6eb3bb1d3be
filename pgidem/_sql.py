"""Reads pgidem's SQL files: the named queries and the numbered migrations.

Queries live in ``sql/queries.sql`` under ``-- name: <name>`` headers; runtime code refers to
them by name (``query("task_claim")``) and never builds SQL from strings.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One numbered migration file."""

    version: int
    name: str
    sql: str


def _sql_dir() -> Traversable:
    # Installed wheel: the build puts sql/ inside the package. Editable install or checkout:
    # it sits next to the package.
    packaged = resources.files("pgidem").joinpath("sql")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


#: Lines of a query between ``-- <<tag`` and ``-- tag>>`` (each marker on a line of its own):
#: the query is also given without them, as ``<name>_without_<tag>``; with several tags, also
#: without any combination of them (``<name>_without_<tag>_<tag>``, tags in sorted order).
_SECTION_TAG = re.compile(r"^-- <<(\w+)$", re.MULTILINE)
_MARKER = re.compile(r"^-- (?:<<\w+|\w+>>)\n", re.MULTILINE)


@functools.cache
def queries() -> dict[str, str]:
    """Return every named query in ``queries.sql``, by name, plus the variants of those with
    optional sections (``<name>_without_<tag>``)."""
    text = _sql_dir().joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        variants = {name: _MARKER.sub("", body)}
        tags = sorted(set(_SECTION_TAG.findall(body)))
        for n in range(1, len(tags) + 1):
            for dropped in itertools.combinations(tags, n):
                text = body
                for tag in dropped:
                    only = re.compile(rf"^-- <<{tag}\n.*?^-- {tag}>>\n", re.MULTILINE | re.DOTALL)
                    text = only.sub("", text)
                variants[f"{name}_without_{'_'.join(dropped)}"] = _MARKER.sub("", text)
        for key, sql in variants.items():
            if key in found:
                raise RuntimeError(f"query {key!r} is defined twice in queries.sql")
            found[key] = sql.strip().rstrip(";")
    return found


def query(name: str) -> str:
    """Return the SQL of one named query."""
    return queries()[name]


@functools.cache
def migrations() -> tuple[Migration, ...]:
    """Return the migrations in version order (checking that versions are 1, 2, 3...)."""
    folder = _sql_dir().joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise RuntimeError(f"migration {expected:04d} is missing from sql/migrations")
    return tuple(found)


def schema_sql() -> str:
    """Return ``schema.sql``: the whole current schema, for reading and for the drift test."""
    return _sql_dir().joinpath("schema.sql").read_text(encoding="utf-8")
