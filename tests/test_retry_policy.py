"""RetryPolicy.delay: exponential backoff ``min(cap, base * 2 ** (n - 1))`` times a random factor
in [1 - jitter, 1] (docs/handlers.md). Pure arithmetic: no database needed."""

from __future__ import annotations

import pytest

import pgidem
from pgidem import RetryPolicy

SAMPLES = 2000


def planned(policy: RetryPolicy, attempt: int) -> float:
    """The documented delay before jitter."""
    return min(policy.cap, policy.base * 2 ** (attempt - 1))


def test_without_jitter_the_delay_is_exact_backoff_capped() -> None:
    """jitter=0: every call gives exactly base, 2 base, 4 base... up to cap, and then cap."""
    policy = RetryPolicy(base=0.3, cap=10.0, jitter=0.0)
    expected = [0.3, 0.6, 1.2, 2.4, 4.8, 9.6, 10.0, 10.0]
    for attempt, want in enumerate(expected, start=1):
        assert planned(policy, attempt) == pytest.approx(want)
        assert {policy.delay(attempt) for _ in range(50)} == {planned(policy, attempt)}
    assert policy.delay(1000) == 10.0  # a very late attempt neither overflows nor passes cap


@pytest.mark.parametrize("jitter", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("attempt", [1, 3, 12])
def test_jittered_delays_stay_within_bounds_and_vary(jitter: float, attempt: int) -> None:
    """With jitter j every delay lies in [(1 - j) * d, d] for the planned delay d (cap
    included), and the delays spread over that range instead of repeating one value."""
    policy = RetryPolicy(base=1.0, cap=300.0, jitter=jitter)
    d = planned(policy, attempt)
    delays = [policy.delay(attempt) for _ in range(SAMPLES)]
    low = (1 - jitter) * d
    assert all(low <= x <= d for x in delays), (min(delays), max(delays), low, d)
    assert len(set(delays)) > SAMPLES * 0.9
    # Both ends of the range are reached (within a tenth of its width): the chance that 2,000
    # uniform draws all miss one tenth is 0.9 ** 2000, about 1e-92.
    width = d - low
    assert min(delays) < low + width / 10
    assert max(delays) > d - width / 10


def test_default_policy_is_documented_values() -> None:
    """A task without retry= gets base 1 s, cap 300 s, jitter 0.5."""
    assert RetryPolicy() == RetryPolicy(base=1.0, cap=300.0, jitter=0.5)


@pytest.mark.parametrize(
    "kwargs", [{"jitter": -0.1}, {"jitter": 1.5}, {"base": -1.0}, {"cap": 10**9}]
)
def test_out_of_range_policy_is_invalid_input(kwargs: dict[str, float]) -> None:
    with pytest.raises(pgidem.InvalidInput):
        RetryPolicy(**kwargs)
