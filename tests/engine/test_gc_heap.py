"""The start-up heap freeze: everything alive moves to the permanent generation."""

import gc

from specserve.engine.gc_heap import freeze_startup_heap


def test_freeze_moves_every_live_object_out_of_the_collected_generations():
    survivor = [[1], [2]]  # a tracked container alive at start-up
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
        assert not any(obj is survivor for obj in gc.get_objects(generation=2))
    finally:
        gc.unfreeze()  # the rest of the test process collects as before
    assert gc.get_freeze_count() == 0
