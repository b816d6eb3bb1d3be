"""The cron parser (pgidem._cron): fields, ranges, steps, lists, names, macros, the seconds
field, the day-of-month/day-of-week rule, time zones, and the errors bad expressions raise."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

import pgidem
from pgidem import _cron

T = datetime(2026, 12, 4, 4, 33, 12, tzinfo=UTC)  # a Friday


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("*/5 * * * *", T, at(2026, 12, 4, 4, 35)),
        ("0 * * * *", T, at(2026, 12, 4, 5, 0)),
        ("15,45 9-17 * * *", T, at(2026, 12, 4, 9, 15)),
        ("0 9 * * mon-fri", at(2026, 12, 4, 10), at(2026, 12, 7, 9, 0)),  # Fri -> Mon
        ("0 0 * * 7", T, at(2026, 12, 6, 0, 0)),  # 7 is Sunday
        ("0 0 * * SUN", T, at(2026, 12, 6, 0, 0)),
        ("0 0 1 jan *", T, at(2027, 1, 1, 0, 0)),
        ("0 0 29 2 *", T, at(2028, 2, 29, 0, 0)),  # the next leap day
        ("30 4 1-7/3 * *", T, at(2026, 12, 7, 4, 30)),  # days 1, 4, 7
        ("0 12 10/10 * *", T, at(2026, 12, 10, 12, 0)),  # 10, 20, 30
        ("0 0 1 * mon", T, at(2026, 12, 7, 0, 0)),  # restricted dom and dow: either matches
        ("@hourly", T, at(2026, 12, 4, 5, 0)),
        ("@daily", T, at(2026, 12, 5, 0, 0)),
        ("@weekly", T, at(2026, 12, 6, 0, 0)),
        ("@monthly", T, at(2027, 1, 1, 0, 0)),
        ("@yearly", T, at(2027, 1, 1, 0, 0)),
        ("* * * * * *", T, at(2026, 12, 4, 4, 33, 13)),  # six fields: seconds first
        ("*/20 * * * * *", T, at(2026, 12, 4, 4, 33, 20)),
        ("0 0 * * * *", T, at(2026, 12, 4, 5, 0, 0)),
        ("  0   0  *  *  *  ", T, at(2026, 12, 5, 0, 0)),
    ],
)
def test_next_tick(expression: str, after: datetime, expected: datetime) -> None:
    """The first tick strictly after a time."""
    assert _cron.parse(expression).next_after(after) == expected


def test_ticks_are_strictly_after_and_latest_is_at_or_before() -> None:
    """A time on a tick: next_after skips it, latest_at_or_before returns it; ticks() lists
    (after, until]."""
    cron = _cron.parse("*/15 * * * *")
    on_tick = at(2026, 12, 4, 4, 30)
    assert cron.next_after(on_tick) == at(2026, 12, 4, 4, 45)
    assert cron.latest_at_or_before(on_tick) == on_tick
    assert cron.latest_at_or_before(T) == on_tick
    assert cron.latest_at_or_before(at(2026, 12, 4, 0, 10)) == at(2026, 12, 4, 0, 0)
    assert cron.latest_at_or_before(at(2026, 1, 1, 0, 5)) == at(2026, 1, 1, 0, 0)
    assert list(cron.ticks(at(2026, 12, 4, 4, 0), at(2026, 12, 4, 5, 0))) == [
        at(2026, 12, 4, 4, 15),
        at(2026, 12, 4, 4, 30),
        at(2026, 12, 4, 4, 45),
        at(2026, 12, 4, 5, 0),
    ]
    yearly = _cron.parse("0 0 1 1 *")
    assert yearly.latest_at_or_before(T) == at(2026, 1, 1)


def test_time_zones_follow_the_wall_clock_across_dst() -> None:
    """A zone's wall clock: 09:00 Paris is 08:00 UTC in winter; the 02:30 that does not exist
    on the spring-forward day has no tick; the 02:30 that happens twice in autumn ticks once."""
    nine = _cron.parse("0 9 * * *", "Europe/Paris")
    assert nine.next_after(T) == at(2026, 12, 4, 8, 0)
    half_two = _cron.parse("30 2 * * *", "Europe/Paris")
    # 2026-03-29: clocks go from 02:00 to 03:00 in Paris.
    assert half_two.next_after(at(2026, 3, 28, 12)) == at(2026, 3, 30, 0, 30)
    # 2026-10-25: 02:30 happens at 00:30 UTC (CEST) and again at 01:30 UTC (CET).
    first = half_two.next_after(at(2026, 10, 24, 12))
    assert first == at(2026, 10, 25, 0, 30)
    assert half_two.next_after(first) == at(2026, 10, 26, 1, 30)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("* * * *", "it has 4 fields"),
        ("* * * * * * *", "it has 7 fields"),
        ("", "it has 0 fields"),
        ("60 * * * *", "60 is out of range for the minute field (0-59)"),
        ("* 24 * * *", "24 is out of range for the hour field"),
        ("* * 0 * *", "0 is out of range for the day-of-month field"),
        ("* * * 13 *", "13 is out of range for the month field"),
        ("* * * * 8", "8 is out of range for the day-of-week field"),
        ("*/0 * * * *", "the step in '*/0' must be at least 1"),
        ("5-1 * * * *", "the range '5-1' in the minute field is reversed"),
        ("* * * foo *", "'foo' in the month field is not a number or a name"),
        ("mon * * * *", "'mon' in the minute field is not a number"),
        ("1,,2 * * * *", "'' is not a valid minute term"),
        ("*/x * * * *", "is not a valid minute term"),
        ("0 0 30 2 *", "it has no tick within 8 years"),
        ("0 0 31 4,6,9,11 *", "it has no tick"),
        ("@often", "unknown macro"),
    ],
)
def test_bad_expressions_raise_invalid_input(expression: str, message: str) -> None:
    """A clear InvalidInput (field ``cron``) that quotes the expression and says what is
    wrong."""
    with pytest.raises(pgidem.InvalidInput) as info:
        _cron.parse(expression)
    assert message in str(info.value)
    assert repr(expression) in str(info.value)
    assert info.value.field == "cron"


def test_bad_time_zone_non_string_and_naive_times() -> None:
    with pytest.raises(pgidem.InvalidInput, match="unknown time zone 'Mars/Olympus'"):
        _cron.parse("* * * * *", "Mars/Olympus")
    with pytest.raises(pgidem.InvalidInput, match="expected a string"):
        _cron.parse(5)  # type: ignore[arg-type]
    with pytest.raises(pgidem.InvalidInput, match="naive"):
        _cron.parse("* * * * *").next_after(datetime(2026, 1, 1))


def test_every_second_for_a_day_is_fast_and_gapless() -> None:
    """86400 consecutive one-second ticks, each one second after the previous (the
    scheduler's test ticks every second)."""
    cron = _cron.parse("* * * * * *")
    ticks = list(cron.ticks(at(2026, 12, 31, 12), at(2027, 1, 1, 12)))
    assert len(ticks) == 86400
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(ticks))
