"""The Grain input pipeline: contract shapes, iterator state restore, per-process slices."""

from __future__ import annotations

import numpy as np
import pytest
from _train_fixtures import TINY_PRE, write_shards

from etl.schema import sample_spec
from train.config import DataConfig
from train.data import MODEL_KEYS, DeviceIterator, make_dataset, preprocess_config, state_to_json


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n_train=24, n_val=8)


def _cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), read_threads=1, prefetch=4, **kw)


def test_batches_follow_the_contract(shards):
    assert preprocess_config(shards) == TINY_PRE
    batch = next(iter(make_dataset(_cfg(shards), 4)))
    spec = sample_spec(TINY_PRE)
    assert set(batch) == set(MODEL_KEYS)
    for k in MODEL_KEYS:
        assert batch[k].shape == (4, *spec[k].shape), k
        assert batch[k].dtype == np.dtype(spec[k].dtype), k


def test_iterator_state_restore_continues_exactly(shards):
    it = iter(make_dataset(_cfg(shards), 4))
    for _ in range(7):  # past the end of the first epoch (24 / 4 = 6 batches)
        next(it)
    state = state_to_json(it.get_state())
    want = [next(it) for _ in range(3)]
    it2 = iter(make_dataset(_cfg(shards), 4))
    it2.set_state(state)
    got = [next(it2) for _ in range(3)]
    for a, b in zip(want, got, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # another shuffle seed reads another order
    other = next(iter(make_dataset(_cfg(shards, shuffle_seed=1), 4)))
    first = next(iter(make_dataset(_cfg(shards), 4)))
    assert not np.array_equal(other["lidar"], first["lidar"])


def test_process_slices_are_disjoint_and_cover_the_split(shards):
    def times(index, count):
        ds = make_dataset(_cfg(shards), 1, keys=("time",), process_index=index,
                          process_count=count, repeat=False)
        return [float(b["time"][0]) for b in ds]

    a, b = times(0, 2), times(1, 2)
    assert len(a) == len(b) == 12
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(times(0, 1))


def test_process_blocks_make_up_the_one_process_batch(shards):
    """Two processes with local batches of 2 feed, in process order, exactly the global batch
    of 4 that one process reads — across an epoch boundary too (24 samples = 6 batches) — so
    a multi-process run trains on the same samples in the same places as a one-process run."""
    def batches(index, count, size, n):
        it = iter(make_dataset(_cfg(shards), size, keys=("time",), process_index=index,
                               process_count=count))
        return [next(it)["time"] for _ in range(n)]

    one = batches(0, 1, 4, 8)
    p0, p1 = batches(0, 2, 2, 8), batches(1, 2, 2, 8)
    for k in range(8):
        np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), one[k])
    assert not set(np.concatenate(p0).tolist()[:12]) & set(np.concatenate(p1).tolist()[:12])


def test_device_iterator_state_is_that_of_the_last_batch_handed_out(shards):
    it = iter(make_dataset(_cfg(shards), 4))
    dev = DeviceIterator(it, put=lambda b: b, depth=3)
    next(dev)
    next(dev)
    state = dev.state  # after 2 batches, though 3 more are prefetched
    assert it.get_state() != state
    fresh = iter(make_dataset(_cfg(shards), 4))
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["lidar"], next(dev)["lidar"])


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="manifest"):
        make_dataset(_cfg(tmp_path), 4)
