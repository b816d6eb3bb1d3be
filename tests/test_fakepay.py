"""The fake payment service (pgidem/fakepay.py) itself, over HTTP on loopback: it applies each
Idempotency-Key once and refuses a fencing token older than the newest it has seen for that key
(409 ``stale_token``, nothing applied). The tests of the example app and of ctx.step rely on
both; here each is shown on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgidem import fakepay
from pgidem.fakepay import FakePaymentService, PaymentError


def test_older_token_after_a_newer_one_is_refused_with_409_and_not_applied(
    tmp_path: Path,
) -> None:
    """Key k charged with token 10; the same key with token 9 is refused (409 stale_token,
    naming both tokens): nothing applied, nothing replayed, the record file unchanged."""
    record = tmp_path / "charges.jsonl"
    with FakePaymentService(record_path=record) as service:
        first = fakepay.charge(service.url, key="k", amount=100, fencing_token=10)
        with pytest.raises(PaymentError) as refused:
            fakepay.charge(service.url, key="k", amount=999, fencing_token=9)
        snapshot = service.snapshot()
        over_http = fakepay.stats(service.url)
    assert first == {"id": "ch_1", "key": "k", "amount": 100, "token": 10}
    assert refused.value.status == 409
    assert refused.value.body == {"error": "stale_token", "token": 9, "highest_seen": 10}
    stats = snapshot["stats"]
    assert (stats["applied"], stats["replayed"], stats["stale_refused"]) == (1, 0, 1)
    assert stats["calls_per_key"] == {"k": 2}
    assert snapshot["charges"] == [first]
    assert over_http == stats
    assert [json.loads(line) for line in record.read_text().splitlines()] == [first]


def test_request_without_a_token_is_not_fenced_and_does_not_lower_the_fence() -> None:
    """A request with no Fencing-Token is served (a replay of the key's charge) and leaves the
    fence where it was: a token older than the highest seen is still refused after it."""
    with FakePaymentService() as service:
        fakepay.charge(service.url, key="k", amount=1, fencing_token=5)
        untokened = fakepay.charge(service.url, key="k", amount=1)
        with pytest.raises(PaymentError) as refused:
            fakepay.charge(service.url, key="k", amount=1, fencing_token=4)
        stats = service.snapshot()["stats"]
    assert untokened["id"] == "ch_1"
    assert refused.value.status == 409
    assert refused.value.body == {"error": "stale_token", "token": 4, "highest_seen": 5}
    assert (stats["applied"], stats["replayed"], stats["stale_refused"]) == (1, 1, 1)


def test_equal_and_newer_tokens_are_accepted_and_the_fence_moves_up() -> None:
    """The same token again replays the charge (200); a newer one replays it too and becomes
    the highest, so the token that was current before is now refused. Keys are fenced
    separately: a low token on another key is applied."""
    with FakePaymentService() as service:
        first = fakepay.charge(service.url, key="k", amount=100, fencing_token=10)
        same = fakepay.charge(service.url, key="k", amount=100, fencing_token=10)
        newer = fakepay.charge(service.url, key="k", amount=100, fencing_token=11)
        with pytest.raises(PaymentError) as refused:
            fakepay.charge(service.url, key="k", amount=100, fencing_token=10)
        other = fakepay.charge(service.url, key="other", amount=5, fencing_token=1)
        snapshot = service.snapshot()
        highest = dict(service.highest_token)
    assert same == first and newer == first
    assert refused.value.status == 409
    assert refused.value.body["highest_seen"] == 11
    assert other == {"id": "ch_2", "key": "other", "amount": 5, "token": 1}
    stats = snapshot["stats"]
    assert (stats["applied"], stats["replayed"], stats["stale_refused"]) == (2, 2, 1)
    assert highest == {"k": 11, "other": 1}
