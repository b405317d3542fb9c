"""The Grain input pipeline: contract shapes, iterator state restore, per-process slices, and
the fast reader against the plain pipeline it replaced (bit for bit)."""

from __future__ import annotations

import dataclasses

import grain
import numpy as np
import pytest
from _train_fixtures import TINY_PRE, write_shards

from etl import codec
from etl.dataset import ShardSource
from etl.schema import empty_sample, sample_spec
from train.config import DataConfig
from train.data import (
    LABEL_KEYS,
    MODEL_KEYS,
    BatchReader,
    DeviceIterator,
    make_dataset,
    preprocess_config,
    state_to_json,
)


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


# --------------------------------------------------------------------------- the fast reader
# The reader reads records by index and decodes them straight into reused batch memory. These
# tests hold it to the plain pipeline it replaced — per-sample numpy decoding (frombuffer +
# astype into the contract's placeholders), MapDataset.source → shuffle → repeat → keep keys
# → np.stack → this process's batches — bit for bit: values, dtypes, shapes, order, iterator state.
ALL_KEYS = (*MODEL_KEYS, *LABEL_KEYS, "time")


def _plain_decode(record: bytes, pre) -> dict[str, np.ndarray]:
    header = codec.decode_header(record)
    body = record[8 + int.from_bytes(record[4:8], "little"):]
    spec, out = sample_spec(pre), empty_sample(pre)
    for key, dtype, shape, offset, nbytes in header["arrays"]:
        a = np.frombuffer(body[offset:offset + nbytes], dtype=dtype).reshape(shape)
        out[key] = a.astype(spec[key].dtype)
    return out


class _PlainSource:
    def __init__(self, path, split):
        self.src, self.pre = ShardSource(path, split), preprocess_config(path)

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        return _plain_decode(self.src.record(i), self.pre)


def _plain_dataset(path, batch_size, keys, seed=0, index=0, count=1, shuffle=True):
    ds = grain.MapDataset.source(_PlainSource(path, "train"))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(None)
    ds = ds.map(lambda s: {k: s[k] for k in keys}).batch(batch_size, drop_remainder=True)
    if count > 1:  # process `index` reads global batch k's block: local batch k·count + index
        ds = ds[index::count]
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))


def _assert_same_batch(want, got, where=""):
    assert list(got) == list(want), where
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, (where, k)
        assert got[k].tobytes() == want[k].tobytes(), (where, k)  # bit for bit (−0, NaN too)


@pytest.mark.parametrize("seed,index,count,shuffle", [(0, 0, 1, True), (3, 1, 2, True),
                                                      (0, 0, 1, False)])
def test_reader_gives_the_plain_pipelines_batches_bit_for_bit(shards, seed, index, count,
                                                              shuffle):
    batch = 4 if count == 1 else 3
    cfg = DataConfig(path=str(shards), read_threads=3, prefetch=8, shuffle_seed=seed)
    fast = iter(make_dataset(cfg, batch, keys=ALL_KEYS, process_index=index,
                             process_count=count, shuffle=shuffle))
    plain = iter(_plain_dataset(shards, batch, ALL_KEYS, seed, index, count, shuffle))
    n = 3 * 24 // (batch * count)  # three epochs: every epoch reshuffled
    for step in range(n):
        _assert_same_batch(next(plain), next(fast), step)
    state = fast.get_state()
    assert state == plain.get_state()  # checkpoints of either resume in the other
    resumed = iter(make_dataset(cfg, batch, keys=ALL_KEYS, process_index=index,
                                process_count=count, shuffle=shuffle))
    resumed.set_state(state_to_json(plain.get_state()))
    for step in range(3):
        want = next(plain)
        _assert_same_batch(want, next(resumed), f"resumed {step}")
        _assert_same_batch(want, next(fast), f"continued {step}")


def test_float16_decodes_to_float32_bit_for_bit():
    every = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(256, 256)
    want = every.astype(np.float32)
    batch = np.full((3, 256, 256), 7.0, np.float32)
    codec._copy_cast(every, batch[1])  # a row of a batch, written in place
    got = batch[1]
    nan = np.isnan(want)
    assert nan.sum() == 2 * 1023 and np.isnan(got[nan]).all()  # NaN stays NaN (payload aside)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert (batch[0] == 7).all() and (batch[2] == 7).all()  # neighbours untouched
    strided = np.zeros((256, 512), np.float32)[:, ::2]  # not contiguous: the numpy path
    codec._copy_cast(every, strided)
    np.testing.assert_array_equal(strided[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_held_batches_are_never_overwritten(shards):
    """Ring slots are reused only once nothing references their batch: a batch kept (even
    only through a view of one of its arrays) keeps its values while many more are read."""
    cfg = DataConfig(path=str(shards), read_threads=2, prefetch=4, device_prefetch=0)
    ds = make_dataset(cfg, 4)
    plain = iter(_plain_dataset(shards, 4, MODEL_KEYS))
    it = iter(ds)
    first = next(it)
    kept = [next(it) for _ in range(12)]  # more than the ring's slots: some get fresh memory
    view = first["rgb"][1:3, ::2]
    del first
    for _ in range(60):
        next(it)
    want = [next(plain) for _ in range(13)]
    np.testing.assert_array_equal(view, want[0]["rgb"][1:3, ::2])
    for step, (w, g) in enumerate(zip(want[1:], kept, strict=True)):
        _assert_same_batch(w, g, step)


def test_a_ring_slot_is_reused_only_when_its_batch_is_gone(shards):
    src = ShardSource(shards, "train")
    reader = BatchReader(src, MODEL_KEYS, max_slots=2)
    ring = reader.ring(4)
    a = reader([0, 1, 2, 3])
    view = a["lidar"][2:]  # all that is left of batch a
    del a
    b = reader([4, 5, 6, 7])
    assert ring.fresh_batches == 0 and len(ring._slots) == 2
    c = reader([8, 9, 10, 11])  # both slots taken (a through its view): fresh memory
    assert ring.fresh_batches == 1
    np.testing.assert_array_equal(view, np.stack([_PlainSource(shards, "train")[i]["lidar"]
                                                  for i in (2, 3)]))
    del view, c
    d = reader([12, 13, 14, 15])  # a's slot again
    assert ring.fresh_batches == 1 and not np.shares_memory(d["lidar"], b["lidar"])


def test_worker_processes_give_the_same_batches_and_state(shards):
    cfg = DataConfig(path=str(shards), read_threads=2, prefetch=4, worker_count=2)
    plain = iter(_plain_dataset(shards, 4, MODEL_KEYS))
    it = iter(make_dataset(cfg, 4))
    try:
        first = next(it)  # held to the end: its shared-memory slot must not be reused
        _assert_same_batch(next(plain), first, 0)
        want_first = {k: v.copy() for k, v in first.items()}
        for step in range(1, 16):  # past the end of the first epoch (6 batches)
            _assert_same_batch(next(plain), next(it), step)
        state = state_to_json(it.get_state())
        after = [next(it) for _ in range(2)]
        for step, want in enumerate(after):
            _assert_same_batch(next(plain), want, f"after {step}")
        for _ in range(5):
            next(it)
        it.set_state(state)  # the workers rewind (batches they had queued are dropped)
        for step, want in enumerate(after):
            _assert_same_batch(want, next(it), f"rewound {step}")
        _assert_same_batch(want_first, first, "held")
    finally:
        it.close()


def test_unknown_keys_and_bad_records_are_clear_errors(shards, tmp_path):
    with pytest.raises(ValueError, match=r"unknown sample keys \['lidars'\]"):
        make_dataset(_cfg(shards), 4, keys=("lidars", "gps"))
    bad = write_shards(tmp_path / "bad", n_train=8, n_val=4, shards=1)
    path = bad / "train-00000.array_record"
    records = ShardSource(bad, "train")
    good = [records.record(i) for i in range(len(records))]
    good[5] = b"XXXX" + good[5][4:]
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(path), "group_size:1")
    for r in good:
        w.write(r)
    w.close()
    it = iter(make_dataset(_cfg(bad), 4, shuffle=False))
    next(it)
    with pytest.raises(codec.CodecError, match=r"bad: train sample 5: not a raceformer record"):
        next(it)


def test_shared_ring_slot_is_freed_when_the_batch_dies_and_dead_rings_are_let_go():
    import gc
    import subprocess
    import sys

    from train.batchmem import Layout, RingOpener, SharedRing

    layout = Layout.of({"x": ((2, 3), "float32"), "flag": ((2,), "uint8")})
    ring = SharedRing(layout, max_slots=2)
    handle, arrays = ring.batch()  # as a worker: take a slot, fill it
    arrays["x"][:] = 5
    arrays["flag"][:] = 1
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True)
    dead_pid = int(exited.stdout)
    opener = RingOpener()  # as the trainer
    batch = opener(dataclasses.replace(handle, pid=dead_pid))
    assert (batch["x"] == 5).all() and batch["flag"].tolist() == [1, 1]
    assert opener.mapped() == 2  # the slot and the ring's flags
    view = batch["x"][1]
    del batch
    gc.collect()
    assert ring._flags[handle.slot] == 1  # a view of the batch is alive: the slot stays taken
    del view
    gc.collect()
    assert ring._flags[handle.slot] == 0
    again, _ = ring.batch()
    assert again.slot == handle.slot
    other = SharedRing(layout, max_slots=1)
    opener(other.batch()[0])  # a new ring shows up: the exited worker's one is let go
    assert opener.mapped() == 2
