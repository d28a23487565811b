"""`limits.max_connections` held exactly: by one process, and summed over workers sharing one counts file."""

import pytest

from pipecat_orpheus.wire.slots import ConnectionSlots, SharedConnectionSlots


def test_one_process_holds_its_limit():
    """Up to the limit every acquire succeeds, past it none; a release makes room for one."""
    slots = ConnectionSlots(2)
    assert slots.acquire() and slots.acquire() and not slots.acquire()
    slots.release()
    assert slots.acquire() and slots.held == slots.total() == 2


def test_workers_share_one_limit_however_the_connections_fall(tmp_path):
    """Three workers, a limit of 4: one worker may take all 4 (the kernel chose it), then nobody gets a fifth."""
    path = tmp_path / "connections.bin"
    SharedConnectionSlots.create(path, 3)
    workers = [SharedConnectionSlots(path, i, limit=4) for i in range(3)]
    try:
        assert all(workers[0].acquire() for _ in range(4))  # more than a third of the limit: a share would refuse
        assert not any(w.acquire() for w in workers)
        workers[0].release()
        assert workers[2].acquire() and not workers[1].acquire()
        assert [w.held for w in workers] == [3, 0, 1] and all(w.total() == 4 for w in workers)
        SharedConnectionSlots.reset(path, 0)  # worker 0 died: its 3 connections went with it
        assert workers[1].total() == 1 and workers[1].acquire()
    finally:
        for w in workers:
            w.close()


def test_a_worker_index_outside_the_file_is_refused(tmp_path):
    """A worker numbered past the workers the parent made counts for is a mistake, said at once."""
    path = tmp_path / "connections.bin"
    SharedConnectionSlots.create(path, 2)
    with pytest.raises(ValueError, match="worker 2"):
        SharedConnectionSlots(path, 2, limit=4)
