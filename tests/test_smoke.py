"""The fixtures give each test a migrated database of its own."""

import pgidem


def test_each_test_gets_a_migrated_database(app: pgidem.App) -> None:
    handle = app.enqueue("charge", {"order": 1}, idempotency_key="order-1")
    assert app.enqueue("charge", {"order": 1}, idempotency_key="order-1").id == handle.id
    assert handle.state == "queued"
