"""Reading what ``etl.build`` wrote: the manifest, the index, and a random-access sample source.

    from etl.dataset import ShardSource
    import grain
    ds = grain.MapDataset.source(ShardSource("data_cache", "train")).shuffle(seed=0).batch(8)

Only shards listed in ``manifest.json`` are read (a half-written file is never listed), and each
shard's record count is checked against the manifest when the source opens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from etl import codec, configlib
from etl.config import ETLConfig, PreprocessConfig
from etl.schema import SCHEMA_VERSION

MANIFEST = "manifest.json"
INDEX = "index.parquet"


class DatasetError(RuntimeError):
    """The output folder cannot be read as a dataset; the message is one line saying why."""


def load_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest of a built dataset, checked against this code's schema and codec versions."""
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: no manifest (build not run or not finished)") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable manifest: {e}") from None
    got = manifest.get("schema_version")
    if got != SCHEMA_VERSION:
        raise DatasetError(
            f"{path}: schema version {got}, this code reads {SCHEMA_VERSION}; rebuild with "
            "python -m etl.build"
        )
    if manifest.get("codec_version") != codec.CODEC_VERSION:
        raise DatasetError(
            f"{path}: codec version {manifest.get('codec_version')}, this code reads "
            f"{codec.CODEC_VERSION}; rebuild with python -m etl.build"
        )
    return manifest


def dataset_config(manifest: dict[str, Any]) -> ETLConfig:
    """The ETL config the dataset was built with."""
    return configlib.from_dict(ETLConfig, manifest["config"])


def list_shards(out_dir: str | Path, split: str) -> list[tuple[Path, int]]:
    """(path, record count) of every shard of ``split``, in manifest (= index) order."""
    manifest = load_manifest(out_dir)
    if split not in manifest["splits"]:
        known = ", ".join(manifest["splits"])
        raise DatasetError(f"{Path(out_dir) / MANIFEST}: no split {split!r} (known: {known})")
    shards = manifest["splits"][split]["shards"]
    return [(Path(out_dir) / s["path"], int(s["count"])) for s in shards]


def read_index(out_dir: str | Path, split: str | None = None):
    """The Parquet index as a pyarrow Table (optionally one split's rows), in shard order."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    manifest = load_manifest(out_dir)
    table = pq.read_table(Path(out_dir) / manifest.get("index", INDEX))
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    return table


class ShardSource:
    """Random access over one split: ``len``, ``source[i]`` → decoded sample dict.

    A grain ``RandomAccessDataSource`` (use with ``grain.MapDataset.source``). Records decode with
    :func:`etl.codec.decode` under the dataset's own preprocessing config, so every sample has the
    contract's full shape (absent modalities are zero placeholders with ``present`` 0). With
    ``keep_meta`` each sample also carries ``meta`` (drive, frame, time); by default it is dropped
    so that batches hold arrays only. Picklable (the reader reopens lazily in each process).
    """

    def __init__(self, out_dir: str | Path, split: str = "train", keep_meta: bool = False):
        self.out_dir = str(out_dir)
        self.split = split
        self.keep_meta = keep_meta
        manifest = load_manifest(out_dir)
        self.cfg: PreprocessConfig = dataset_config(manifest).preprocess
        self.shards = list_shards(out_dir, split)
        missing = [str(p) for p, _ in self.shards if not p.is_file()]
        if missing:
            raise DatasetError(f"{missing[0]}: shard listed in the manifest is missing")
        self._len = sum(n for _, n in self.shards)
        self._source = None
        if self._len:
            n = len(self._open())
            if n != self._len:
                raise DatasetError(
                    f"{Path(out_dir) / MANIFEST}: {split} shards hold {n} records, manifest "
                    f"says {self._len}; rebuild"
                )

    def _open(self):
        if self._source is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._source = ArrayRecordDataSource([str(p) for p, _ in self.shards])
        return self._source

    def __len__(self) -> int:
        return self._len

    def record(self, i: int) -> bytes:
        """The encoded record of sample ``i``, as ``etl.build`` wrote it (etl.codec format)."""
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} samples")
        return self._open()[int(i) % self._len]

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = codec.decode(self.record(i), self.cfg)
        if not self.keep_meta:
            sample.pop("meta", None)
        return sample

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def __repr__(self) -> str:
        return f"ShardSource({self.out_dir!r}, {self.split!r}, {self._len} samples)"
