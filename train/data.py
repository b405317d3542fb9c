"""The Grain input pipeline: ETL shards → decoded, shuffled, batched samples on the devices.

    ArrayRecord shards ─ MapDataset.source(etl.dataset.ShardSource: decode with etl.codec)
        ─ shuffle(seed) ─ repeat ─ select keys ─ batch(drop_remainder) ─ this process's
        batches ─ to_iter_dataset (reader threads)
        ─ mp_prefetch (worker processes) ─ device_put with the batch's NamedSharding

Every process of a multi-process run reads a disjoint part of the one global shuffled order:
with P processes and a local batch of L, global batch k is the samples kPL … (k+1)PL − 1, and
process p reads its block kPL + pL … kPL + (p+1)L − 1 (local batch kP + p). Laid out in process
order on the mesh, the global batch is the one a single process would train on, sample for
sample — so the masks and the losses are those of a one-process run. The iterator's state is
a small JSON-able dict (`get_state`/`set_state`): it goes into every checkpoint, so a resumed
run continues with exactly the batch after the last one it trained on.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from etl.config import PreprocessConfig
from etl.dataset import ShardSource, dataset_config, list_shards, load_manifest
from etl.schema import MODALITIES
from train.config import DataConfig

# What the model consumes of a sample (the rest — boxes, time, meta — stays on the host).
MODEL_KEYS: tuple[str, ...] = (*MODALITIES, "present", "offset")
LABEL_KEYS: tuple[str, ...] = ("boxes", "box_class", "has_labels")


# --------------------------------------------------------------------------- the shards
def preprocess_config(path: str | Path) -> PreprocessConfig:
    """The PreprocessConfig the shards at ``path`` were built with (from their manifest)."""
    return dataset_config(load_manifest(path)).preprocess


def shard_paths(path: str | Path, split: str) -> list[str]:
    """The split's shard files, as the manifest lists them."""
    return [str(p) for p, _ in list_shards(path, split)]


class SelectKeys(grain.transforms.Map):
    """Keep the keys a consumer needs (arrays only: no meta, no float64 time)."""

    def __init__(self, keys: Sequence[str]):
        self.keys = tuple(keys)

    def map(self, sample: dict[str, Any]) -> dict[str, np.ndarray]:
        return {k: sample[k] for k in self.keys}


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
    source = ShardSource(cfg.path, cfg.split)  # decodes with etl.codec under the manifest's
    if pre is not None and pre != source.cfg:  # preprocess config
        raise ValueError(f"{cfg.path}: shards were built with a different preprocess config")
    if len(source) < batch_size:
        raise ValueError(f"{cfg.path}: split {cfg.split!r} has {len(source)} samples, fewer "
                         f"than one batch of {batch_size}")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=cfg.shuffle_seed)
    if repeat:
        ds = ds.repeat(None)  # endless; reshuffled every epoch
    ds = ds.map(SelectKeys(keys)).batch(batch_size, drop_remainder=True)
    if process_count > 1:  # global batch k = local batches kP … kP+P-1, in process order
        ds = ds[process_index::process_count]
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
    )
    if cfg.worker_count > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size
            )
        )
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
