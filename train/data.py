"""The Grain input pipeline: ETL shards → decoded, shuffled, batched samples on the devices.

    record indices ─ MapDataset.range ─ shuffle(seed) ─ repeat
        ─ batch(drop_remainder, BatchReader: read each record and decode it straight into
          row j of the batch's arrays, etl.codec.decode_into) ─ this process's batches
        ─ to_iter_dataset (reader threads) ─ mp_prefetch (worker processes; batch arrays
          allocated in shared memory, handed over by name) ─ device_put (NamedSharding)

The order is that of ``MapDataset.source(ShardSource).shuffle(seed).repeat()``: the shuffle
permutes positions, whatever the source holds. Every process of a multi-process run reads a
disjoint part of the one global shuffled order: with P processes and a local batch of L,
global batch k is the samples kPL … (k+1)PL − 1, and process p reads its block kPL + pL …
kPL + (p+1)L − 1 (local batch kP + p). Laid out in process order on the mesh, the global batch
is the one a single process would train on, sample for sample — so the masks and the losses
are those of a one-process run. The iterator's state is a small JSON-able dict
(`get_state`/`set_state`): it goes into every checkpoint, so a resumed run continues with
exactly the batch after the last one it trained on.

Per sample the pipeline pays what any reader must — read the record, cast its arrays once
into the batch's dtype — and no more: no per-sample dict of arrays, no ``np.stack`` of them,
no copy into shared memory (``python -m benchmarks.reader``; README, issue 15).
"""

from __future__ import annotations

import collections
import json
import math
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import grain.experimental

from etl import codec
from etl.config import PreprocessConfig
from etl.dataset import ShardSource, dataset_config, list_shards, load_manifest
from etl.schema import MODALITIES, sample_spec
from train import batchmem
from train.config import DataConfig

# What the model consumes of a sample (the rest — boxes, time, meta — stays on the host).
MODEL_KEYS: tuple[str, ...] = (*MODALITIES, "present", "offset")
LABEL_KEYS: tuple[str, ...] = ("boxes", "box_class", "has_labels")
# Batch arrays at least this large cross from worker processes in shared memory (allocated there
# by BatchReader); smaller ones (gps, imu, flags: a few hundred bytes) are simply pickled.
MIN_SHM_BYTES = 64 * 1024


# --------------------------------------------------------------------------- the shards
def preprocess_config(path: str | Path) -> PreprocessConfig:
    """The PreprocessConfig the shards at ``path`` were built with (from their manifest)."""
    return dataset_config(load_manifest(path)).preprocess


def shard_paths(path: str | Path, split: str) -> list[str]:
    """The split's shard files, as the manifest lists them."""
    return [str(p) for p, _ in list_shards(path, split)]


class BatchReader:
    """Grain batch function: a batch's record indices → the batch (key → array).

    Takes the batch's arrays (in the contract's dtypes) from a ring of reused batch memory
    (`train.batchmem`), then reads each record (ArrayRecord: the read and decompression run
    without the GIL) and decodes it straight into its row (`etl.codec.decode_into`: one cast
    pass per stored array, float16 → float32 vectorized). No per-sample arrays, no stacking
    copy, no fresh pages. With ``shared_memory`` (in Grain worker processes) the ring lives in
    shared memory and the batch crosses to the training process as a `batchmem.RingBatch`,
    which `batchmem.RingOpener` turns back into arrays there — no copy either. Picklable (the
    source reopens, the ring is made anew, in each process).
    """

    def __init__(self, source: ShardSource, keys: Sequence[str], *, shared_memory: bool = False,
                 max_slots: int = 8):
        spec = sample_spec(source.cfg)
        unknown = [k for k in keys if k not in spec]
        if unknown:
            raise ValueError(f"{source.out_dir}: unknown sample keys {unknown} (the contract's: "
                             f"{', '.join(spec)})")
        self.source = source
        self.shared_memory = shared_memory
        self.max_slots = max_slots
        self.spec = {k: spec[k] for k in sorted(keys)}  # sorted, as Grain's batching orders them
        self._ring, self._ring_batch = None, 0
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ring"] = state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def ring(self, batch_size: int):
        """This process's ring for batches of ``batch_size`` (made on first use)."""
        with self._lock:
            if self._ring is None or self._ring_batch != batch_size:
                layout = batchmem.Layout.of(
                    {k: ((batch_size, *s.shape), s.dtype) for k, s in self.spec.items()})
                ring_type = batchmem.SharedRing if self.shared_memory else batchmem.LocalRing
                self._ring, self._ring_batch = ring_type(layout, self.max_slots), batch_size
            return self._ring

    def __call__(self, indices: Sequence[int]):
        ring = self.ring(len(indices))
        if self.shared_memory:
            handle, out = ring.batch()
        else:
            handle, out = None, ring.batch()
        try:
            for row, i in enumerate(indices):
                try:
                    codec.decode_into(self.source.record(int(i)), out, row, self.source.cfg)
                except codec.CodecError as e:
                    raise codec.CodecError(
                        f"{self.source.out_dir}: {self.source.split} sample {int(i)}: {e}"
                    ) from None
        except BaseException:
            if self.shared_memory:
                ring.discard(handle, out)  # a batch that never leaves: free its memory now
            raise
        return handle if handle is not None else out


# --------------------------------------------------------------------------- the pipeline
def make_dataset(
    cfg: DataConfig,
    batch_size: int,
    *,
    pre: PreprocessConfig | None = None,
    keys: Sequence[str] = MODEL_KEYS,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
    shuffle: bool = True,
) -> grain.IterDataset:
    """This process's IterDataset of batches of ``batch_size`` (its *local* batch size)."""
    source = ShardSource(cfg.path, cfg.split)  # records encoded by etl.codec under the
    if pre is not None and pre != source.cfg:  # manifest's preprocess config
        raise ValueError(f"{cfg.path}: shards were built with a different preprocess config")
    if len(source) < batch_size:
        raise ValueError(f"{cfg.path}: split {cfg.split!r} has {len(source)} samples, fewer "
                         f"than one batch of {batch_size}")
    ds = grain.MapDataset.range(len(source))
    if shuffle:
        ds = ds.shuffle(seed=cfg.shuffle_seed)
    if repeat:
        ds = ds.repeat(None)  # endless; reshuffled every epoch
    # cfg.prefetch counts records; Grain's buffer counts batches (and at least one per thread)
    buffered = max(cfg.read_threads, math.ceil(cfg.prefetch / batch_size))
    # batches alive at once: the reader's buffer, the workers' queues, the device prefetch, the
    # batch in use and the one before it (a ring slot is reused once its batch is gone)
    alive = buffered + 2 * cfg.worker_buffer_size * (cfg.worker_count > 0) + cfg.device_prefetch + 3
    reader = BatchReader(source, keys, shared_memory=cfg.worker_count > 0, max_slots=alive)
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=reader)
    if process_count > 1:  # global batch k = local batches kP … kP+P-1, in process order
        ds = ds[process_index::process_count]  # (lazy: only this process's batches are read)
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=buffered)
    )
    if cfg.worker_count > 0:
        _absl_flags_parsed()
        it = grain.experimental.WithOptionsIterDataset(
            it, grain.experimental.DatasetOptions(min_shm_size=MIN_SHM_BYTES)
        )
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size
            )
        ).map(batchmem.RingOpener())
    return it


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside an absl app nobody parses them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class DeviceIterator:
    """Batches from a Grain iterator, put on the devices ``depth`` steps ahead.

    ``state`` is the Grain iterator state *after the last batch handed out* (not after the
    ones prefetched), which is what a checkpoint must hold.
    """

    def __init__(self, it, put, depth: int = 2):
        self._it = it
        self._put = put
        self._depth = max(1, depth)
        self._queue: collections.deque = collections.deque()
        self._state = it.get_state()

    def _fill(self):
        while len(self._queue) < self._depth:
            host = next(self._it)
            self._queue.append((self._put(host), self._it.get_state()))

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        self._fill()
        batch, self._state = self._queue.popleft()
        return batch

    @property
    def state(self) -> dict[str, Any]:
        return self._state

    def close(self):
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def state_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """A Grain iterator state as plain JSON data (numpy scalars → Python numbers)."""
    plain = lambda o: o.item() if hasattr(o, "item") else str(o)
    return json.loads(json.dumps(state, default=plain))
