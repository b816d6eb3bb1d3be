"""Cron expressions for periodic tasks: parse one, and find the ticks before and after a time.

Five fields, as in crontab(5): ``minute hour day-of-month month day-of-week``; or six, with a
leading ``second`` field (``*/10 * * * * *``: every ten seconds). Each field is ``*``, a value, a
range ``a-b``, a step ``*/n``, ``a-b/n`` or ``a/n``, or a comma-separated list of those. Months
and weekdays take English names (``jan``..``dec``, ``sun``..``sat``, any case); weekday ``7`` is
Sunday, like ``0``. The macros ``@yearly`` (``@annually``), ``@monthly``, ``@weekly``, ``@daily``
(``@midnight``) and ``@hourly`` stand for their usual expressions.

As in Vixie cron, when both day-of-month and day-of-week are restricted (neither starts with
``*``), a day matches when *either* does (``0 0 1 * mon``: the 1st of the month and every Monday).

Ticks are wall-clock times in a time zone (UTC by default). A wall time that does not exist (the
hour skipped when clocks go forward) has no tick; a wall time that happens twice (clocks go back)
ticks once, at its first occurrence.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

from pgidem.errors import InvalidInput

_MONTHS = {
    name: n
    for n, name in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
        start=1,
    )
}
_WEEKDAYS = {name: n for n, name in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

#: How far ahead (or back) a tick is searched for; an expression with no tick in this span
#: (``0 0 30 2 *``: February 30th) is rejected when parsed.
SEARCH_YEARS = 8

_TERM = re.compile(r"^(?P<base>\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/(?P<step>[0-9]+))?$")


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int] | None = None


_SECOND = _Field("second", 0, 59)
_MINUTE = _Field("minute", 0, 59)
_HOUR = _Field("hour", 0, 23)
_DAY = _Field("day-of-month", 1, 31)
_MONTH = _Field("month", 1, 12, _MONTHS)
_WEEKDAY = _Field("day-of-week", 0, 7, _WEEKDAYS)


def _bad(expression: str, message: str) -> InvalidInput:
    return InvalidInput(f"invalid cron expression {expression!r}: {message}", "cron")


def _value(expression: str, spec: _Field, text: str) -> int:
    if text.isdigit():
        value = int(text)
    elif spec.names is not None and text in spec.names:
        value = spec.names[text]
    else:
        expected = "a number" + (" or a name" if spec.names else "")
        raise _bad(expression, f"{text!r} in the {spec.name} field is not {expected}")
    if not spec.low <= value <= spec.high:
        raise _bad(
            expression,
            f"{value} is out of range for the {spec.name} field ({spec.low}-{spec.high})",
        )
    return value


def _parse_field(expression: str, spec: _Field, text: str) -> frozenset[int]:
    values: set[int] = set()
    for term in text.split(","):
        match = _TERM.match(term)
        if match is None:
            raise _bad(expression, f"{term!r} is not a valid {spec.name} term")
        base, step_text = match["base"], match["step"]
        step = 1
        if step_text is not None:
            step = int(step_text)
            if step < 1:
                raise _bad(expression, f"the step in {term!r} must be at least 1")
        if base == "*":
            low, high = spec.low, spec.high
        elif "-" in base:
            first, last = base.split("-", 1)
            low, high = _value(expression, spec, first), _value(expression, spec, last)
            if low > high:
                raise _bad(expression, f"the range {base!r} in the {spec.name} field is reversed")
        else:
            low = _value(expression, spec, base)
            # `a/n` means from a to the end of the field, every n.
            high = spec.high if step_text is not None else low
        values.update(range(low, high + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    """A parsed cron expression (build one with ``parse``)."""

    expression: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    #: Whether day-of-month / day-of-week were restricted (for the either-matches rule).
    days_restricted: bool
    weekdays_restricted: bool
    timezone: tzinfo = UTC

    @property
    def has_seconds(self) -> bool:
        """Whether the expression has a seconds field (ticks can be under a minute apart)."""
        return self.seconds != frozenset({0})

    def _day_matches(self, t: datetime) -> bool:
        weekday = (t.weekday() + 1) % 7  # Python: Monday 0; cron: Sunday 0
        in_days = t.day in self.days
        in_weekdays = weekday in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return in_days or in_weekdays
        return in_days and in_weekdays

    def _aware(self, wall: datetime) -> datetime | None:
        """The instant of a wall time in the zone; None if that wall time does not exist."""
        aware = wall.replace(tzinfo=self.timezone, fold=0)
        if aware.astimezone(UTC).astimezone(self.timezone).replace(tzinfo=None) != wall:
            return None
        return aware.astimezone(UTC)

    def _wall(self, t: datetime) -> datetime:
        if t.tzinfo is None:
            raise InvalidInput("a naive datetime is ambiguous; give it a timezone", "cron")
        return t.astimezone(self.timezone).replace(tzinfo=None, microsecond=0)

    def next_after(self, t: datetime) -> datetime:
        """The first tick strictly after ``t`` (an aware datetime), as an aware UTC datetime.

        Raises:
            InvalidInput: no tick within ``SEARCH_YEARS`` years (or ``t`` is naive).
        """
        after = t.astimezone(UTC)
        wall = self._wall(t) + timedelta(seconds=1)
        stop_year = wall.year + SEARCH_YEARS
        while True:
            found = self._forward(wall, stop_year)
            if found is None:
                raise _bad(self.expression, f"it has no tick within {SEARCH_YEARS} years")
            aware = self._aware(found)
            if aware is not None and aware > after:
                return aware
            wall = found + timedelta(seconds=1)

    def latest_at_or_before(self, t: datetime) -> datetime:
        """The last tick at or before ``t`` (an aware datetime), as an aware UTC datetime.

        Raises:
            InvalidInput: no tick within ``SEARCH_YEARS`` years before (or ``t`` is naive).
        """
        at = t.astimezone(UTC)
        wall = self._wall(t)
        stop_year = wall.year - SEARCH_YEARS
        while True:
            found = self._backward(wall, stop_year)
            if found is None:
                raise _bad(self.expression, f"it had no tick within {SEARCH_YEARS} years")
            aware = self._aware(found)
            if aware is not None and aware <= at:
                return aware
            wall = found - timedelta(seconds=1)

    def ticks(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """Every tick in (``after``, ``until``], oldest first."""
        tick = self.next_after(after)
        while tick <= until:
            yield tick
            tick = self.next_after(tick)

    def _forward(self, t: datetime, stop_year: int) -> datetime | None:
        """The first wall time at or after ``t`` that matches every field (None: none before
        ``stop_year``)."""
        while t.year <= stop_year:
            if t.month not in self.months:
                t = (t.replace(day=1) + timedelta(days=32)).replace(
                    day=1, hour=0, minute=0, second=0
                )
                continue
            if not self._day_matches(t):
                t = (t + timedelta(days=1)).replace(hour=0, minute=0, second=0)
                continue
            if t.hour not in self.hours:
                later = [h for h in self.hours if h > t.hour]
                if not later:
                    t = (t + timedelta(days=1)).replace(hour=0, minute=0, second=0)
                else:
                    t = t.replace(hour=min(later), minute=0, second=0)
                continue
            if t.minute not in self.minutes:
                later = [m for m in self.minutes if m > t.minute]
                if not later:
                    t = (t + timedelta(hours=1)).replace(minute=0, second=0)
                else:
                    t = t.replace(minute=min(later), second=0)
                continue
            if t.second not in self.seconds:
                later = [s for s in self.seconds if s > t.second]
                if not later:
                    t = (t + timedelta(minutes=1)).replace(second=0)
                else:
                    t = t.replace(second=min(later))
                continue
            return t
        return None

    def _backward(self, t: datetime, stop_year: int) -> datetime | None:
        """The last wall time at or before ``t`` that matches every field (None: none after
        ``stop_year``)."""
        while t.year >= stop_year:
            if t.month not in self.months:
                t = t.replace(day=1, hour=0, minute=0, second=0) - timedelta(seconds=1)
                continue
            if not self._day_matches(t):
                t = t.replace(hour=0, minute=0, second=0) - timedelta(seconds=1)
                continue
            if t.hour not in self.hours:
                earlier = [h for h in self.hours if h < t.hour]
                if not earlier:
                    t = t.replace(hour=0, minute=0, second=0) - timedelta(seconds=1)
                else:
                    t = t.replace(hour=max(earlier), minute=59, second=59)
                continue
            if t.minute not in self.minutes:
                earlier = [m for m in self.minutes if m < t.minute]
                if not earlier:
                    t = t.replace(minute=0, second=0) - timedelta(seconds=1)
                else:
                    t = t.replace(minute=max(earlier), second=59)
                continue
            if t.second not in self.seconds:
                earlier = [s for s in self.seconds if s < t.second]
                if not earlier:
                    t = t.replace(second=0) - timedelta(seconds=1)
                else:
                    t = t.replace(second=max(earlier))
                continue
            return t
        return None


def parse(expression: str, timezone: tzinfo | str | None = None) -> Cron:
    """Parse a cron expression.

    Args:
        expression: five fields (minute hour day-of-month month day-of-week), six with a leading
            seconds field, or a macro (``@hourly``...).
        timezone: the zone whose wall clock the expression follows: a tzinfo or an IANA name
            (``"Europe/Paris"``); default UTC.

    Returns:
        The parsed expression.

    Raises:
        InvalidInput: the expression is malformed, has a value out of range, or never ticks; or
            the time zone is unknown.
    """
    if not isinstance(expression, str):
        raise InvalidInput(
            f"invalid cron expression: expected a string, got {type(expression).__name__}",
            "cron",
        )
    text = " ".join(expression.strip().lower().split())
    text = _MACROS.get(text, text)
    if text.startswith("@"):
        raise _bad(expression, f"unknown macro (known: {', '.join(sorted(_MACROS))})")
    fields = text.split(" ") if text else []
    if len(fields) == 5:
        fields = ["0", *fields]
    elif len(fields) != 6:
        raise _bad(
            expression,
            f"it has {len(fields)} fields; expected 5 (minute hour day-of-month month "
            "day-of-week) or 6 (with a leading second)",
        )
    specs = (_SECOND, _MINUTE, _HOUR, _DAY, _MONTH, _WEEKDAY)
    parsed = [_parse_field(expression, spec, f) for spec, f in zip(specs, fields, strict=True)]
    weekdays = frozenset(0 if d == 7 else d for d in parsed[5])
    zone = _zone(timezone)
    cron = Cron(
        expression=expression,
        seconds=parsed[0],
        minutes=parsed[1],
        hours=parsed[2],
        days=parsed[3],
        months=parsed[4],
        weekdays=weekdays,
        days_restricted=not fields[3].startswith("*"),
        weekdays_restricted=not fields[5].startswith("*"),
        timezone=zone,
    )
    cron.next_after(datetime(2000, 1, 1, tzinfo=UTC))  # raises for an expression that never ticks
    return cron


def _zone(timezone: tzinfo | str | None) -> tzinfo:
    if timezone is None:
        return UTC
    if isinstance(timezone, tzinfo):
        return timezone
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidInput(f"unknown time zone {timezone!r}", "timezone") from exc
