"""Tests for grpcmux.registry: entries, immutable snapshots, observers."""

import pytest

from grpcmux.registry import CONNECTED, DISCONNECTED, ClientInfo, ClientRegistry


def _info(client_id, remote_address="127.0.0.1:1"):
    return ClientInfo(client_id, 1.5, remote_address, "native", (("k", "v"),))


def test_add_get_remove():
    registry = ClientRegistry()
    info = _info("a")
    registry.add(info)
    assert registry.get("a") is info
    assert registry.remove("a") is info
    assert registry.get("a") is None
    assert registry.remove("a") is None


def test_duplicate_id_raises_and_keeps_first():
    registry = ClientRegistry()
    first = _info("a", "127.0.0.1:1")
    registry.add(first)
    with pytest.raises(KeyError):
        registry.add(_info("a", "127.0.0.1:2"))
    assert registry.get("a") is first


def test_snapshot_is_immutable_and_replaced_on_change():
    registry = ClientRegistry()
    empty = registry.snapshot
    registry.add(_info("a"))
    one = registry.snapshot
    assert dict(empty) == {}
    assert list(one) == ["a"]
    with pytest.raises(TypeError):
        one["b"] = _info("b")
    registry.remove("a")
    assert list(one) == ["a"]  # an old snapshot never changes
    assert dict(registry.snapshot) == {}


def test_observers_in_order_with_snapshot_already_updated():
    registry = ClientRegistry()
    seen = []
    registry.subscribe(lambda e: seen.append(("first", e.kind, e.info.client_id,
                                              "a" in registry.snapshot)))
    registry.subscribe(lambda e: seen.append(("second", e.kind, e.info.client_id)))
    registry.add(_info("a"))
    registry.remove("a")
    assert seen == [
        ("first", CONNECTED, "a", True),
        ("second", CONNECTED, "a"),
        ("first", DISCONNECTED, "a", False),
        ("second", DISCONNECTED, "a"),
    ]


def test_unsubscribe_only_that_subscription_and_idempotent():
    registry = ClientRegistry()
    seen = []
    observer = seen.append
    unsubscribe_first = registry.subscribe(observer)
    registry.subscribe(observer)
    unsubscribe_first()
    unsubscribe_first()
    registry.add(_info("a"))
    assert len(seen) == 1


def test_failing_observer_is_logged_and_others_still_run(logged_errors):
    registry = ClientRegistry()
    registry.subscribe(lambda e: 1 / 0)
    seen = []
    registry.subscribe(seen.append)
    registry.add(_info("a"))
    assert [e.kind for e in seen] == [CONNECTED]
    assert [e["log_failure"].type for e in logged_errors] == [ZeroDivisionError]
    logged_errors.clear()
