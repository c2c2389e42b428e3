"""The cycle's GC policy: the heap is frozen and the young threshold raised inside, and
everything is as it was outside, also when cycles nest or fail."""

from __future__ import annotations

import gc

import pytest

from aggregator.gcpolicy import YOUNG_THRESHOLD, cycle_gc


def test_inside_a_cycle_the_heap_is_frozen_and_young_collections_are_rare() -> None:
    before = gc.get_threshold()
    kept = [object() for _ in range(10)]  # noqa: F841 - alive across the freeze
    with cycle_gc():
        assert gc.get_threshold()[0] == max(YOUNG_THRESHOLD, before[0])
        assert gc.get_threshold()[1:] == before[1:]
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_nested_cycles_restore_once_and_failures_restore_too() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), cycle_gc():
        with cycle_gc():
            pass
        # The inner cycle left the outer one's settings in place.
        assert gc.get_threshold()[0] == max(YOUNG_THRESHOLD, before[0])
        assert gc.get_freeze_count() > 0
        raise RuntimeError("cycle failed")
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_cyclic_garbage_made_inside_a_cycle_is_still_collected() -> None:
    """The collector is not off: garbage cycles made in a cycle are found by a collection."""

    class Node:
        pass

    with cycle_gc():
        node = Node()
        node.self = node  # type: ignore[attr-defined]
        del node
        found = gc.collect()
    assert found >= 1


def test_a_heap_the_host_froze_stays_frozen() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with cycle_gc():
            assert gc.get_threshold()[0] >= YOUNG_THRESHOLD
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()
