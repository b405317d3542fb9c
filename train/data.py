"""The Grain input pipeline: ETL shards → decoded, shuffled, batched samples on the devices.

    ArrayRecord shards ─ MapDataset.source ─ shuffle(seed) ─ repeat ─ this process's slice
        ─ decode (etl.codec) ─ batch(drop_remainder) ─ to_iter_dataset (reader threads)
        ─ mp_prefetch (worker processes) ─ device_put with the batch's NamedSharding

Every process of a multi-process run reads the disjoint slice ``index::count`` of the one
global shuffled order and feeds its local part of each global batch. The iterator's state is
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

from etl import codec, configlib
from etl.config import PreprocessConfig
from etl.schema import MODALITIES
from train.config import DataConfig

# What the model consumes of a sample (the rest — boxes, time, meta — stays on the host).
MODEL_KEYS: tuple[str, ...] = (*MODALITIES, "present", "offset")
LABEL_KEYS: tuple[str, ...] = ("boxes", "box_class", "has_labels")


# --------------------------------------------------------------------------- the shards
def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"{p} not found: data.path must be an `etl.build --out` directory "
            "(python -m etl.build --src RAW --out CACHE)"
        )
    return json.loads(p.read_text())


def preprocess_config(path: str | Path) -> PreprocessConfig:
    """The PreprocessConfig the shards were built with, from their manifest."""
    man = read_manifest(path)
    for cand in (
        man.get("preprocess"),
        (man.get("config") or {}).get("preprocess"),
        (man.get("etl_config") or {}).get("preprocess"),
    ):
        if isinstance(cand, dict):
            return configlib.from_dict(PreprocessConfig, cand, prefix="manifest.preprocess")
    raise ValueError(f"{path}/manifest.json holds no preprocess config")


def shard_paths(path: str | Path, split: str) -> list[str]:
    """The split's shard files: from the manifest when it lists them, else by name."""
    root = Path(path)
    man = read_manifest(root)
    listed = None
    splits = man.get("splits")
    if isinstance(splits, dict) and isinstance(splits.get(split), dict):
        listed = splits[split].get("shards")
    if listed is None and isinstance(man.get("shards"), dict):
        listed = man["shards"].get(split)
    if listed:
        files = [str(root / (s["path"] if isinstance(s, dict) else s)) for s in listed]
    else:
        files = sorted(
            {
                str(f)
                for pattern in (f"{split}/*.array_record", f"{split}-*.array_record",
                                f"{split}_*.array_record", f"**/{split}*.array_record")
                for f in root.glob(pattern)
            }
        )
    if not files:
        raise FileNotFoundError(f"no {split!r} shards (*.array_record) under {root}")
    return files


class Decode(grain.transforms.Map):
    """Record bytes → the contract's arrays (float32 images; placeholders for absent ones)."""

    def __init__(self, pre: PreprocessConfig, keys: Sequence[str]):
        self.pre = pre
        self.keys = tuple(keys)

    def map(self, record: bytes) -> dict[str, np.ndarray]:
        s = codec.decode(record, self.pre)
        return {k: s[k] for k in self.keys}


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
    pre = pre or preprocess_config(cfg.path)
    source = grain.sources.ArrayRecordDataSource(shard_paths(cfg.path, cfg.split))
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=cfg.shuffle_seed)
    if repeat:
        ds = ds.repeat(None)  # endless; reshuffled every epoch
    if process_count > 1:
        ds = ds[process_index::process_count]
    ds = ds.map(Decode(pre, keys)).batch(batch_size, drop_remainder=True)
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
    )
    if cfg.worker_count > 0:
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size
            )
        )
    return it


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
