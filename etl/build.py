"""Raw drives → synchronized, preprocessed ArrayRecord shards, a manifest and a Parquet index.

    python -m etl.build --src cmht_raw --out data_cache [--config etl.toml] [--set k=v]
                        [--workers N] [--strict] [--force]
    python -m etl.build --src cmht_raw --out data_cache --shard-index I --num-shards N  # Slurm
    python -m etl.build --out data_cache --merge-only [--src cmht_raw]

Output layout (the per-drive folder is the unit of work, so merging is trivial)::

    data_cache/
      manifest.json              written last; the only thing a reader trusts
      index.parquet              one row per sample
      drives/<drive_hash>/
        train-<drive_hash>-00000.array_record   one shard per (split, chunk of shard_size sweeps)
        val-<drive_hash>-00003.array_record
        index.parquet            this drive's rows
        drive.json               completion marker: status, config hash, counts, shards

Every file is written under a temporary name and renamed into place; the marker after the
drive's shards, the manifest after every marker. A rerun skips drives whose marker says they
finished under the same config hash from the same raw files (relative names, sizes and
modification times, fingerprinted in the marker) and rebuilds the others; ``--force``
rebuilds every drive. Parallel over drives and over
chunks of sweeps within a drive; workers reopen the drive from its path and write their
shards themselves, so the output is byte-identical for any ``--workers``.

Exit code: 0 when every drive built (skipped bad frames are counted, not failures), 1 when a
drive failed (or, under ``--strict``, any frame was bad), 2 for a bad command line or config.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
import traceback
import warnings
from collections import Counter, OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from etl import codec, configlib
from etl.config import ETLConfig
from etl.errors import DriveError, ETLError, FrameError
from etl.images import decode_at_least
from etl.pcd import PCDWarning
from etl.preprocess import (
    bev_lidar,
    bev_radar,
    boxes_to_array,
    ir_outside,
    ir_range,
    ir_range_key,
    preprocess_ir,
    preprocess_rgb,
    transform_points,
)
from etl.progress import Progress, run_captured, warnings_to
from etl.schema import MODALITIES, MODALITY_INDEX, SCHEMA_VERSION, empty_sample, validate_sample
from etl.sync import SyncTable, sync_drive

DRIVES_DIR = "drives"
MARKER = "drive.json"
INDEX = "index.parquet"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
GUARD = -1  # split code of a sweep dropped as a guard between train and val blocks
OPENERS = {"scene": "etl.scene:open_scene", "bag": "etl.bag:open_bag"}
FINDERS = {"scene": "etl.scene:find_scenes", "bag": "etl.bag:find_bags"}
# (not etl.build itself: under `python -m etl.build` that makes runpy warn in every worker)
PRELOAD = [
    "etl.scene", "etl.bag", "etl.sync", "etl.codec", "array_record.python.array_record_module",
]  # fmt: skip
LINES_PER_DRIVE = 20  # bad-frame lines printed per drive (all are counted)
COMPRESSIONS = ("snappy", "uncompressed", "zstd", "brotli")


def writer_options(out_cfg) -> str:
    """ArrayRecord writer options: group_size 1 (every record its own chunk, so random access
    reads one record) and ``output.compression``. Measured on synthetic 0.5 MB samples (CPU
    ms per record, write / read, size): zstd:1 1.4 / 0.7 / 182 kB, snappy 0.8 / 0.6 / 249 kB,
    uncompressed 0.4 / 0.25 / 536 kB."""
    comp = str(out_cfg.compression).strip()
    name, _, level = comp.partition(":")
    if name not in COMPRESSIONS or (level and not level.lstrip("-").isdigit()):
        raise ValueError(
            f"output.compression: {comp!r} is not one of snappy, uncompressed, zstd[:N], "
            "brotli[:N]"
        )
    return f"group_size:1,{comp}"


_SHOWN: list[Progress] = []  # the progress display being shown, if any


def _err(msg: str) -> None:
    """One message on standard error, on lines of its own (above the progress bar)."""
    if _SHOWN:
        _SHOWN[-1].write(msg)
    else:
        print(msg, file=sys.stderr)


def _one_line(e: BaseException, where: str = "") -> str:
    if isinstance(e, ETLError):
        return str(e)
    msg = " ".join(str(e).split()) or "(no message)"
    return f"{where}: {type(e).__name__}: {msg}" if where else f"{type(e).__name__}: {msg}"


def _resolve(spec: str):
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _stable_unit(*parts: object) -> int:
    """A stable 64-bit integer from ``parts`` (for deterministic, seedable ranking)."""
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big")


def drive_hash(drive_id: str) -> str:
    return hashlib.sha1(drive_id.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- drives
@dataclass(frozen=True, order=True)
class DriveRef:
    """Where a drive lives and how to open it; small, so it travels to worker processes."""

    drive_id: str
    path: str
    opener: str  # "module:function" with the signature (path, drive_id, cfg) -> Drive

    @property
    def hash(self) -> str:
        return drive_hash(self.drive_id)


def discover(src: Path, cfg: ETLConfig | None = None) -> tuple[list[DriveRef], list[str]]:
    """Scene folders and bags under ``src``, sorted by drive_id (their path relative to src)."""
    src = Path(src)
    cfg = cfg or ETLConfig()
    refs: dict[str, DriveRef] = {}
    notes = []
    for kind, finder in FINDERS.items():
        mod = finder.partition(":")[0]
        try:
            with warnings.catch_warnings(record=True) as caught:  # duplicates behind links
                warnings.simplefilter("always", UserWarning)
                found = (_resolve(finder)(src, cfg.scene) if kind == "scene"
                         else _resolve(finder)(src))  # fmt: skip
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            notes.append(f"{mod} is not available; {kind} drives were not searched")
            continue
        notes += [m for m in dict.fromkeys(str(w.message) for w in caught) if m not in notes]
        for p in found:
            p = Path(p)
            try:  # the path under src as found (a drive behind a symbolic link keeps its name)
                rel = p.absolute().relative_to(src.absolute()).as_posix()
            except ValueError:
                try:
                    rel = p.resolve().relative_to(src.resolve()).as_posix()
                except ValueError:
                    rel = p.name
            drive_id = rel if rel not in ("", ".") else src.resolve().name
            refs.setdefault(drive_id, DriveRef(drive_id, str(p), OPENERS[kind]))
    return sorted(refs.values()), notes


# --------------------------------------------------------------------------- splits
def _pick(n: int, frac: float, keys: list[int]) -> set[int]:
    """Indices of the val members among ``n`` by stable key: round(frac·n), at least one and
    at most n−1 when there are two or more."""
    k = round(frac * n)
    if frac > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    return set(np.argsort(np.asarray(keys, np.uint64), kind="stable")[:k].tolist())


def drive_splits(refs: list[DriveRef], out_cfg) -> dict[str, int]:
    """Split "drive": drive_id → 0 (train) or 1 (val), chosen by the seed."""
    ids = sorted(r.drive_id for r in refs)
    val = _pick(len(ids), out_cfg.val_fraction, [_stable_unit(out_cfg.seed, i) for i in ids])
    return {d: int(j in val) for j, d in enumerate(ids)}


def block_split(times: np.ndarray, drive_id: str, out_cfg) -> np.ndarray:
    """Split "block": per sweep 0 (train), 1 (val) or GUARD (dropped).

    The drive is cut into blocks of ``block_s`` seconds from its first sweep; round(val_fraction
    · blocks) of them (chosen by the seed) go to val. Train sweeps closer than ``guard_s`` to any
    val sweep are dropped, so neighbouring, nearly identical frames never straddle the split.
    """
    t = np.asarray(times, np.float64)
    if len(t) == 0:
        return np.zeros(0, np.int8)
    block = np.floor((t - t[0]) / out_cfg.block_s).astype(np.int64)
    n = int(block.max()) + 1
    val_blocks = _pick(
        n, out_cfg.val_fraction, [_stable_unit(out_cfg.seed, drive_id, b) for b in range(n)]
    )
    split = np.isin(block, sorted(val_blocks)).astype(np.int8)
    tv = t[split == 1]
    if len(tv) and out_cfg.guard_s > 0:
        j = (
            np.clip(np.searchsorted(tv, t), 1, len(tv) - 1)
            if len(tv) > 1
            else np.zeros(len(t), int)
        )
        near = np.minimum(np.abs(tv[j] - t), np.abs(tv[np.maximum(j - 1, 0)] - t))
        split[(split == 0) & (near < out_cfg.guard_s)] = GUARD
    return split


def sample_splits(table: SyncTable, drive_id: str, out_cfg, drive_split: int | None) -> np.ndarray:
    if out_cfg.split == "drive":
        return np.full(len(table), drive_split or 0, np.int8)
    if out_cfg.split == "block":
        return block_split(table.time, drive_id, out_cfg)
    raise DriveError("output.split", f"unknown split {out_cfg.split!r} (use 'block' or 'drive')")


# --------------------------------------------------------------------------- one sample
def _frame_name(stream, i: int, path: str, modality: str) -> str:
    names = getattr(stream, "names", None)
    if names and 0 <= i < len(names):
        return str(names[i])
    return f"{path} [{modality} #{i}]"


def _points(raw, where: str, min_cols: int) -> np.ndarray:
    p = np.asarray(raw)
    if p.ndim != 2 or p.shape[1] < min_cols:
        raise FrameError(where, f"expected (N, ≥{min_cols}) points, got shape {p.shape}")
    return p


def _load(drive, modality: str, j: int):
    stream = getattr(drive, modality)
    where = _frame_name(stream, j, drive.path, modality)
    try:
        return stream.load(j), where
    except FrameError:
        raise
    except (OSError, ValueError) as e:  # a reader that let a file error through
        raise FrameError(where, _one_line(e)) from None


def _decode_hint(cfg: ETLConfig):
    """Where the config allows it, images decode no larger than the sample needs."""
    if not cfg.output.reduced_jpeg_decode:
        return contextlib.nullcontext()
    return decode_at_least(rgb=cfg.preprocess.image.rgb_size, ir=cfg.preprocess.image.ir_size)


def make_sample(drive, table: SyncTable, i: int, cfg: ETLConfig, ir_stats: dict | None = None):
    """The contract sample of sweep ``i`` and a list of FrameErrors of absent non-LiDAR frames.

    Raises FrameError when the LiDAR sweep itself is unusable (the sample is skipped).
    ``ir_stats`` (a dict, filled in): IR frames with pixels outside the configured range of
    their pixel type (clipped), for one warning per drive (:func:`_ir_warning`).
    """
    pc = cfg.preprocess
    sample = empty_sample(pc)
    present = table.present[i].copy()
    offset = table.offset[i].copy()
    problems: list[tuple[str, FrameError]] = []

    raw, where = _load(drive, "lidar", i)
    pts = _points(raw, where, 3)
    if len(pts) == 0:
        raise FrameError(where, "empty scan")
    finite = np.isfinite(pts[:, :3])
    if not finite.all() and not finite.all(axis=1).any():  # (row-wise only when needed: slow)
        raise FrameError(where, "no finite points (all NaN/inf)")
    sample["lidar"] = bev_lidar(pts, pc.lidar)

    for m in ("radar", "rgb", "ir"):
        k = MODALITY_INDEX[m]
        j = int(table.index[m][i])
        if not present[k] or j < 0:
            continue
        try:
            if m == "radar":
                raw, where = _load(drive, m, j)
            else:
                with _decode_hint(cfg):
                    raw, where = _load(drive, m, j)
            if m == "radar":
                p = _points(raw, where, 4)
                p = transform_points(p, drive.calib.radar_to_vehicle)
                sample[m] = bev_radar(p[:, :3], p[:, 3], pc.radar)
            else:
                img = np.asarray(raw)
                ok = img.ndim == 3 and img.shape[2] == 3 if m == "rgb" else img.ndim in (2, 3)
                if not ok or img.size == 0:
                    raise FrameError(where, f"unexpected image shape {img.shape}")
                sample[m] = (
                    preprocess_rgb(img, pc.image) if m == "rgb" else preprocess_ir(img, pc.image)
                )
                if m == "ir" and ir_stats is not None:
                    _note_ir(ir_stats, img, pc.image, where)
        except FrameError as e:
            problems.append((m, e))
            present[k] = False
            offset[k] = 0.0
    for m in ("gps", "imu"):
        sample[m] = getattr(table, m)[i].astype(np.float32)
    try:
        labels = drive.labels(i)
        if labels is not None:
            try:
                sample["boxes"], sample["box_class"] = boxes_to_array(labels, pc.max_boxes)
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise FrameError(
                    f"{drive.path} [labels #{i}]", f"malformed box: {_one_line(e)}"
                ) from None
            sample["has_labels"] = np.uint8(1)
    except FrameError as e:
        problems.append(("labels", e))
    sample["present"] = present.astype(np.uint8)
    sample["offset"] = offset.astype(np.float32)
    sample["time"] = np.float64(table.time[i])
    return sample, problems


def _note_ir(stats: dict, img: np.ndarray, cfg, where: str) -> None:
    n, vmin, vmax = ir_outside(img, cfg)
    if not n:
        return
    key = ir_range_key(img.dtype)
    if not stats:
        stats.update(frames=0, min=vmin, max=vmax, key=key, dtype=str(img.dtype), first=where,
                     range=list(ir_range(img.dtype, cfg)))
    stats["frames"] += 1
    stats["min"], stats["max"] = min(stats["min"], vmin), max(stats["max"], vmax)


def _ir_warning(ref: DriveRef, results: list[dict]) -> str | None:
    """One line for a drive whose IR frames fell outside the configured range, or None."""
    hits = [r["ir_outside"] for r in sorted(results, key=lambda r: r["chunk"])
            if r.get("ir_outside")]
    if not hits:
        return None
    h = hits[0]
    frames = sum(x["frames"] for x in hits)
    vmin, vmax = min(x["min"] for x in hits), max(x["max"] for x in hits)
    lo, hi = h["range"]
    return (f"{ref.drive_id}: {frames} {h['dtype']} ir frames have pixels outside "
            f"preprocess.image.{h['key']}_min/{h['key']}_max [{lo:g}, {hi:g}] (values "
            f"{vmin:g}..{vmax:g}, first {h['first']}): clipped; set the range to the camera's")


def _notice_kind(w: Warning) -> str:
    return getattr(w, "kind", None) or type(w).__name__


def _note_notices(res: dict, caught) -> None:
    """Repairs the readers warned about (NaN points dropped, trailing bytes, bad labels…):
    counted per kind, the first message kept, for one line per drive and kind."""
    for w in caught:
        kind = _notice_kind(w.message)
        n = res["notices"].setdefault(kind, {"count": 0, "first": str(w.message)})
        n["count"] += 1


def _notice_lines(ref: DriveRef, results: list[dict]) -> list[str]:
    """One line per kind of repair over a drive's chunks (in chunk order)."""
    merged: dict[str, dict] = {}
    for r in sorted(results, key=lambda r: r["chunk"]):
        for kind, n in r.get("notices", {}).items():
            m = merged.setdefault(kind, {"count": 0, "first": n["first"]})
            m["count"] += n["count"]
    return [f"{ref.drive_id}: {kind} in {m['count']} frames (first: {m['first']})"
            for kind, m in sorted(merged.items())]  # fmt: skip


def _notice_counts(results: list[dict]) -> dict[str, int]:
    c: Counter = Counter()
    for r in results:
        for kind, n in r.get("notices", {}).items():
            c[kind] += n["count"]
    return dict(sorted(c.items()))


def _reason_key(modality: str, e: FrameError) -> str:
    return f"{modality}: {e.reason.split(':')[0].strip()[:60]}"


# --------------------------------------------------------------------------- workers
_STATE: dict[str, Any] = {"cfg": None, "drives": OrderedDict()}


def _init_worker(cfg_dict: dict) -> None:
    _STATE["cfg"] = configlib.from_dict(ETLConfig, cfg_dict)
    _STATE["drives"] = OrderedDict()
    try:
        import cv2

        cv2.setNumThreads(1)  # one core per worker; parallelism comes from the processes
    except ImportError:  # pragma: no cover
        pass


def _open(ref: DriveRef, drive_split: int | None):
    """The drive, its sync table and per-sweep splits; cached per worker process."""
    key = (ref, drive_split)
    cache = _STATE["drives"]
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    cfg = _STATE["cfg"]
    drive = _resolve(ref.opener)(Path(ref.path), ref.drive_id, cfg)
    try:
        table = sync_drive(drive, cfg.sync)
        split = sample_splits(table, ref.drive_id, cfg.output, drive_split)
    except Exception as e:
        try:
            e.drive_warnings = list(drive.warnings)  # still worth showing with the failure
        except AttributeError:  # pragma: no cover
            pass
        raise
    cache[key] = (drive, table, split)
    while len(cache) > 2:
        cache.popitem(last=False)
    return cache[key]


def plan_drive(ref: DriveRef, drive_split: int | None, size: int, out: str, strict: bool) -> dict:
    """Open and synchronize a drive, then build its first chunk (so a short drive is opened
    once): its sweep count and chunk 0's result, or the one line saying why the drive failed."""
    cpu0 = time.process_time()
    try:
        drive, table, _ = _open(ref, drive_split)
        plan = {
            "frames": len(table),
            "warnings": list(drive.warnings),
            "error": None,
            "tolerance": table.tolerance,
        }
    except Exception as e:  # noqa: BLE001 — a bad drive fails alone, with one line
        return {
            "frames": 0,
            "warnings": getattr(e, "drive_warnings", []),
            "error": _one_line(e, ref.path),
            "trace": traceback.format_exc(),
            "cpu_s": time.process_time() - cpu0,
        }
    plan["cpu_s"] = time.process_time() - cpu0
    plan["first"] = process_chunk(ref, drive_split, 0, 0, min(size, len(table)), out, strict)
    return plan


def _note(res: dict, e: FrameError) -> None:
    res["bad"] += 1
    if len(res["lines"]) < LINES_PER_DRIVE:  # every bad frame is counted, the first printed
        res["lines"].append(str(e))


def shard_name(split: str, dhash: str, chunk: int) -> str:
    return f"{split}-{dhash}-{chunk:05d}.array_record"


def process_chunk(
    ref: DriveRef,
    drive_split: int | None,
    chunk: int,
    start: int,
    stop: int,
    out: str,
    strict: bool,
) -> dict:
    """Build sweeps [start, stop) of one drive and write their shards (one per split)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    cpu0 = time.process_time()
    cfg = _STATE["cfg"]
    ddir = Path(out) / DRIVES_DIR / ref.hash
    res: dict[str, Any] = {
        "chunk": chunk,
        "frames": stop - start,
        "skipped": Counter(),
        "absent": Counter(),
        "lines": [],
        "bad": 0,
        "error": None,
        "shards": [],
        "rows": None,
        "ir_outside": {},
        "notices": {},
    }
    cols: dict[str, list] = {
        k: [] for k in ("frame", "time", "split", "shard", "record", "has_labels")
    }
    present, offsets = [], []
    writers: dict[int, tuple[Any, Path, Path]] = {}
    counts: Counter = Counter()
    try:
        options = writer_options(cfg.output)
        drive, table, split = _open(ref, drive_split)
        for i in range(start, stop):
            s = int(split[i])
            if s == GUARD:
                res["skipped"]["split guard"] += 1
                continue
            caught: list = []
            try:
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", PCDWarning)
                        warnings.simplefilter("always", UserWarning)
                        sample, problems = make_sample(drive, table, i, cfg, res["ir_outside"])
                finally:  # outside the catcher: a warning passed on is not caught again
                    _note_notices(res, [w for w in caught
                                        if isinstance(w.message, UserWarning)])  # fmt: skip
                    for w in caught:  # anything else goes on as it would have
                        if not isinstance(w.message, UserWarning):
                            warnings.warn_explicit(w.message, w.category, w.filename,
                                                   w.lineno)  # fmt: skip
            except FrameError as e:
                if strict:
                    raise DriveError(e.where, f"{e.reason} (--strict)") from None
                res["skipped"][_reason_key("lidar", e)] += 1
                _note(res, e)
                continue
            for m, e in problems:
                if strict:
                    raise DriveError(e.where, f"{e.reason} (--strict)")
                res["absent"][_reason_key(m, e)] += 1
                _note(res, e)
            validate_sample(sample, cfg.preprocess, where=f"{ref.path} [sweep {i}]")
            meta = {"drive": ref.drive_id, "frame": i, "time": float(table.time[i])}
            rec = codec.encode(sample, meta, storage_dtype=cfg.output.storage_dtype)
            if s not in writers:
                name = shard_name(SPLITS[s], ref.hash, chunk)
                tmp = ddir / f".{name}.tmp-{os.getpid()}"
                writers[s] = (ArrayRecordWriter(str(tmp), options), tmp, ddir / name)
            writers[s][0].write(rec)
            cols["frame"].append(i)
            cols["time"].append(float(table.time[i]))
            cols["split"].append(SPLITS[s])
            cols["shard"].append(f"{DRIVES_DIR}/{ref.hash}/{writers[s][2].name}")
            cols["record"].append(counts[s])
            cols["has_labels"].append(bool(sample["has_labels"]))
            present.append(sample["present"].astype(bool))
            offsets.append(sample["offset"])
            counts[s] += 1
        for s in sorted(writers):
            w, tmp, final = writers.pop(s)
            w.close()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # on disk before the name says it is complete
            os.replace(tmp, final)
            res["shards"].append(
                {
                    "path": f"{DRIVES_DIR}/{ref.hash}/{final.name}",
                    "split": SPLITS[s],
                    "count": counts[s],
                }
            )
    except Exception as e:  # noqa: BLE001 — the drive fails alone, with one line
        res["error"] = _one_line(e, ref.path)
        res["trace"] = traceback.format_exc()
        for w, tmp, _ in writers.values():
            with contextlib.suppress(Exception):
                w.close()
            tmp.unlink(missing_ok=True)
        res["cpu_s"] = time.process_time() - cpu0
        return res
    cols["present"] = np.asarray(present, bool).reshape(-1, len(MODALITIES)).tolist()
    cols["offset"] = np.asarray(offsets, np.float32).reshape(-1, len(MODALITIES)).tolist()
    res["rows"] = cols
    res["cpu_s"] = time.process_time() - cpu0
    return res


# --------------------------------------------------------------------------- index & stats
def _index_table(drive_id: str, cols: dict[str, list]):
    import pyarrow as pa

    n = len(cols["frame"])
    pres = np.asarray(cols["present"], bool).reshape(n, len(MODALITIES))
    offs = np.asarray(cols["offset"], np.float32).reshape(n, len(MODALITIES))
    data = {
        "drive": pa.array([drive_id] * n, pa.string()),
        "frame": pa.array(cols["frame"], pa.int64()),
        "time": pa.array(cols["time"], pa.float64()),
        "split": pa.array(cols["split"], pa.string()),
        "shard": pa.array(cols["shard"], pa.string()),
        "record": pa.array(cols["record"], pa.int64()),
        "has_labels": pa.array(cols["has_labels"], pa.bool_()),
    }
    for k, m in enumerate(MODALITIES):
        data[f"present_{m}"] = pa.array(pres[:, k], pa.bool_())
    for k, m in enumerate(MODALITIES):
        data[f"offset_{m}"] = pa.array(offs[:, k], pa.float32())
    return pa.table(data)


def _write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def sync_stats(present: np.ndarray, offset: np.ndarray) -> dict[str, dict[str, float]]:
    """Per modality: presence rate and |offset| statistics over the samples where present."""
    out = {}
    n = len(present)
    for k, m in enumerate(MODALITIES):
        p = present[:, k] if n else np.zeros(0, bool)
        o = offset[p, k].astype(np.float64) if n else np.zeros(0)
        a = np.abs(o)
        out[m] = {
            "presence_rate": float(p.mean()) if n else 0.0,
            "offset_mean": float(o.mean()) if len(o) else 0.0,
            "offset_abs_mean": float(a.mean()) if len(a) else 0.0,
            "offset_abs_p50": float(np.percentile(a, 50)) if len(a) else 0.0,
            "offset_abs_p95": float(np.percentile(a, 95)) if len(a) else 0.0,
            "offset_abs_max": float(a.max()) if len(a) else 0.0,
        }
    return out


def _stats_of(table) -> dict:
    pres = np.stack([table[f"present_{m}"].to_numpy(zero_copy_only=False) for m in MODALITIES], 1)
    offs = np.stack([table[f"offset_{m}"].to_numpy(zero_copy_only=False) for m in MODALITIES], 1)
    return sync_stats(pres.reshape(-1, len(MODALITIES)), offs.reshape(-1, len(MODALITIES)))


# --------------------------------------------------------------------------- markers
def input_fingerprint(path: str | Path) -> dict:
    """What a drive was built from: its files (a scene folder or a ROS 2 bag folder, walked;
    or a single bag file) by relative name, size and modification time — ``{"files": n,
    "bytes": total, "hash": sha1 of the sorted list}``. Cheap (directory listings and stats,
    no file is read); a rerun rebuilds a drive whose fingerprint changed."""
    root = Path(path)
    rows = []
    if root.is_dir():
        for dirpath, dirs, files in os.walk(root):
            dirs.sort()
            for name in files:
                f = Path(dirpath) / name
                try:
                    st = f.stat()
                except OSError:  # vanished or unreadable: counted as changed input
                    continue
                rows.append((f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    elif root.exists():
        st = root.stat()
        rows.append((root.name, st.st_size, st.st_mtime_ns))
    rows.sort()
    h = hashlib.sha1()
    for name, size, mtime in rows:
        h.update(f"{name}\0{size}\0{mtime}\n".encode())
    return {"files": len(rows), "bytes": sum(r[1] for r in rows), "hash": h.hexdigest()}


def drive_dir(out: Path, ref: DriveRef) -> Path:
    return Path(out) / DRIVES_DIR / ref.hash


def read_marker(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _reusable(out: Path, ref: DriveRef, chash: str, dsplit: int | None,
              inputs: dict | None = None) -> dict | None:
    """The drive's marker when it finished under this config, split and (given ``inputs``,
    its :func:`input_fingerprint`) these raw files, with its outputs on disk; else None."""
    m = read_marker(drive_dir(out, ref) / MARKER)
    if not m or m.get("status") not in ("ok", "skipped") or m.get("config_hash") != chash:
        return None
    if m.get("drive_id") != ref.drive_id or m.get("drive_split") != dsplit:
        return None
    if inputs is not None and (m.get("inputs") or {}).get("hash") != inputs["hash"]:
        return None
    if not all((Path(out) / s["path"]).is_file() for s in m.get("shards", [])):
        return None
    if not (drive_dir(out, ref) / INDEX).is_file():
        return None
    return m


def _reset_drive_dir(out: Path, ref: DriveRef) -> None:
    d = drive_dir(out, ref)
    (d / MARKER).unlink(missing_ok=True)  # first: the drive no longer counts as finished
    if d.exists():
        for p in sorted(d.iterdir()):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    d.mkdir(parents=True, exist_ok=True)


def _base_marker(ref: DriveRef, chash: str, dsplit: int | None) -> dict:
    return {
        "drive_id": ref.drive_id,
        "path": ref.path,
        "hash": ref.hash,
        "config_hash": chash,
        "drive_split": dsplit,
        "schema_version": SCHEMA_VERSION,
        "codec_version": codec.CODEC_VERSION,
    }


def _finalize_drive(
    out: Path, ref: DriveRef, chash: str, dsplit, plan: dict, results: list,
    inputs: dict | None = None,
) -> dict:
    marker = _base_marker(ref, chash, dsplit)
    if inputs is not None:
        marker["inputs"] = inputs
    results = sorted(results, key=lambda r: r["chunk"])
    skipped, absent = Counter(), Counter()
    for r in results:
        skipped.update(r["skipped"])
        absent.update(r["absent"])
    ir_line = _ir_warning(ref, results)
    marker.update(
        frames=plan["frames"],
        warnings=plan["warnings"] + ([ir_line] if ir_line else []) + _notice_lines(ref, results),
        tolerance_s=plan.get("tolerance"),
        skipped=dict(sorted(skipped.items())),
        absent=dict(sorted(absent.items())),
        notices=_notice_counts(results),
    )
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        marker.update(status="failed", reason=errors[0], samples={}, shards=[], sync={})
        _write_json(drive_dir(out, ref) / MARKER, marker)
        return marker
    cols: dict[str, list] = {}
    for r in results:
        for k, v in r["rows"].items():
            cols.setdefault(k, []).extend(v)
    table = _index_table(ref.drive_id, cols)
    _write_parquet(table, drive_dir(out, ref) / INDEX)
    shards = [s for r in results for s in r["shards"]]
    samples = {sp: sum(s["count"] for s in shards if s["split"] == sp) for sp in SPLITS}
    n = sum(samples.values())
    status = "ok" if n else "skipped"
    reason = None if n else f"no usable sweeps (of {plan['frames']})"
    marker.update(
        status=status, reason=reason, samples=samples, shards=shards, sync=_stats_of(table)
    )
    _write_json(drive_dir(out, ref) / MARKER, marker)  # last: the drive is finished
    return marker


def _failed_marker(out: Path, ref: DriveRef, chash: str, dsplit, reason: str, warnings=()) -> dict:
    marker = _base_marker(ref, chash, dsplit)
    marker.update(
        status="failed",
        reason=reason,
        frames=0,
        samples={},
        shards=[],
        sync={},
        skipped={},
        absent={},
        warnings=list(warnings),
    )
    d = drive_dir(out, ref)
    d.mkdir(parents=True, exist_ok=True)
    _write_json(d / MARKER, marker)
    return marker


# --------------------------------------------------------------------------- merge
def normalization(cfg: ETLConfig) -> dict:
    from etl.schema import IMAGENET_MEAN, IMAGENET_STD

    p = cfg.preprocess
    return {
        "lidar": {
            "grid": configlib.to_dict(p.lidar),
            "density": "log1p(count)/log1p(density_max)",
            "max_height": "(z - z_min)/(z_max - z_min)",
        },
        "radar": {
            "grid": configlib.to_dict(p.radar.grid),
            "doppler": [p.radar.velocity_min, p.radar.velocity_max],
        },
        "rgb": {
            "size": list(p.image.rgb_size),
            "mean": IMAGENET_MEAN.tolist(),
            "std": IMAGENET_STD.tolist(),
        },
        "ir": {"size": list(p.image.ir_size), "range": [p.image.ir_min, p.image.ir_max],
               "range_16bit": [p.image.ir16_min, p.image.ir16_max]},
        "gps": "ENU metres from the drive's first fix",
        "imu": "gyro rad/s, accel m/s^2",
    }


def merge(out: Path, cfg: ETLConfig, refs: list[DriveRef] | None = None) -> dict:
    """Collect the per-drive markers and indexes into ``index.parquet`` and ``manifest.json``.

    With ``refs``, drives without a finished marker are reported as failed ("not built").
    A marker made under another config hash is stale: reported, not used.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    chash = configlib.config_hash(cfg)
    markers: dict[str, dict] = {}
    for f in sorted((out / DRIVES_DIR).glob(f"*/{MARKER}")):
        m = read_marker(f)
        if m is None or "drive_id" not in m:
            continue
        if m.get("config_hash") != chash:
            m = dict(
                m,
                status="failed",
                shards=[],
                samples={},
                reason=f"stale: built under config {m.get('config_hash')}, not {chash}",
            )
        markers[m["drive_id"]] = m
    if refs is not None:
        wanted = {r.drive_id: r for r in refs}
        markers = {k: v for k, v in markers.items() if k in wanted}
        for d, r in wanted.items():
            if d not in markers:
                markers[d] = _base_marker(r, chash, None) | {
                    "status": "failed",
                    "reason": "not built (no completion marker)",
                    "frames": 0,
                    "samples": {},
                    "shards": [],
                    "skipped": {},
                    "absent": {},
                    "sync": {},
                }
    drives = dict(sorted(markers.items()))
    for stale in out.glob(".*.tmp-*"):  # left by a killed merge
        stale.unlink(missing_ok=True)
    tables = []
    for m in drives.values():
        if m["status"] in ("ok", "skipped") and m.get("shards") is not None:
            tables.append(pq.read_table(out / DRIVES_DIR / m["hash"] / INDEX))
    table = (
        pa.concat_tables(tables)
        if tables
        else _index_table(
            "",
            {
                "frame": [],
                "time": [],
                "split": [],
                "shard": [],
                "record": [],
                "has_labels": [],
                "present": [],
                "offset": [],
            },
        )
    )
    _write_parquet(table, out / INDEX)
    splits = {}
    for sp in SPLITS:
        shards = [
            {"path": s["path"], "count": s["count"], "drive": d}
            for d, m in drives.items()
            for s in m.get("shards", [])
            if s["split"] == sp
        ]
        splits[sp] = {"samples": sum(s["count"] for s in shards), "shards": shards}
    summary = {
        d: {
            k: m.get(k)
            for k in (
                "status",
                "reason",
                "path",
                "hash",
                "frames",
                "samples",
                "skipped",
                "absent",
                "notices",
                "warnings",
                "sync",
                "tolerance_s",
            )
        }
        for d, m in drives.items()
    }
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "codec_version": codec.CODEC_VERSION,
        "config": configlib.to_dict(cfg),
        "config_hash": chash,
        "normalization": normalization(cfg),
        "counts": {
            "samples": table.num_rows,
            "per_split": {sp: splits[sp]["samples"] for sp in SPLITS},
            "drives": {
                s: sum(m["status"] == s for m in drives.values())
                for s in ("ok", "skipped", "failed")
            },
        },
        "splits": splits,
        "sync": _stats_of(table),
        "drives": summary,
        "index": INDEX,
    }
    _write_json(out / MANIFEST, manifest)  # last: now the dataset is readable
    return manifest


def summary_table(manifest: dict) -> str:
    """The per-drive summary a person reads at the end of a build."""
    head = f"{'drive':<40} {'frames':>6} {'samples':>7}  {'presence % L/R/C/I/G/M':<26} "
    head += f"{'status':<8} skipped / reason"
    lines = [head, "-" * len(head)]
    for d, m in manifest["drives"].items():
        n = sum((m.get("samples") or {}).values())
        sync = m.get("sync") or {}
        pres = "/".join(
            f"{100 * sync[k]['presence_rate']:.0f}" if k in sync else "-" for k in MODALITIES
        )
        skipped = Counter(m.get("skipped") or {}) + Counter(m.get("absent") or {})
        sk = ", ".join(f"{k} ×{v}" for k, v in sorted(skipped.items())) or "-"
        if m.get("reason"):
            sk = f"{m['reason']}; {sk}" if sk != "-" else m["reason"]
        name = d if len(d) <= 40 else "…" + d[-39:]
        frames, status = m.get("frames") or 0, m["status"]
        lines.append(f"{name:<40} {frames:>6} {n:>7}  {pres:<26} {status:<8} {sk}")
    c = manifest["counts"]
    lines.append(
        f"total: {c['samples']} samples (train {c['per_split']['train']}, val "
        f"{c['per_split']['val']}); drives ok {c['drives']['ok']}, skipped "
        f"{c['drives']['skipped']}, failed {c['drives']['failed']}"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the build
@dataclass
class BuildResult:
    built: list[str]
    reused: list[str]
    failed: list[str]
    bad_frames: int  # skipped sweeps + absent-by-error frames (not guard drops)
    manifest: dict | None
    cpu_s: float = 0.0  # CPU seconds spent in plan and chunk work, summed over workers


def _executor(workers: int, cfg: ETLConfig):
    if workers <= 1:
        return None
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # import numpy, cv2, the readers and array_record once; workers fork from that
        ctx.set_forkserver_preload(PRELOAD)
    else:
        ctx = mp.get_context("spawn")
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(configlib.to_dict(cfg),),
    )


def build(
    refs: list[DriveRef],
    out: Path,
    cfg: ETLConfig,
    workers: int = 1,
    strict: bool = False,
    shard_index: int = 0,
    num_shards: int = 1,
    progress: bool = True,
    do_merge: bool | None = None,
    show_traceback: bool = False,
    force: bool = False,
) -> BuildResult:
    """Build the drives ``refs[shard_index::num_shards]`` into ``out``; merge when it is the
    whole set (or ``do_merge``). A drive finished under the same config from the same raw
    files (:func:`input_fingerprint`) is reused, unless ``force``. Progress: one bar (or, off
    a terminal, a plain line now and then) with every message on lines of its own above it;
    what the workers write to stderr is relayed by this process (:mod:`etl.progress`)."""
    out = Path(out)
    (out / DRIVES_DIR).mkdir(parents=True, exist_ok=True)
    chash = configlib.config_hash(cfg)
    refs = sorted(refs)
    dsplits = drive_splits(refs, cfg.output) if cfg.output.split == "drive" else {}
    mine = refs[shard_index::num_shards]
    result = BuildResult([], [], [], 0, None)
    todo = []
    inputs = {ref: input_fingerprint(ref.path) for ref in mine}
    for ref in mine:
        dsplit = dsplits.get(ref.drive_id)
        if not force and _reusable(out, ref, chash, dsplit, inputs[ref]) is not None:
            result.reused.append(ref.drive_id)
            continue
        if not force and _reusable(out, ref, chash, dsplit) is not None:
            _err(f"{ref.drive_id}: raw files changed since it was built "
                 f"({inputs[ref]['files']} files now); rebuilding")
        todo.append(ref)
    if todo:
        (out / MANIFEST).unlink(missing_ok=True)  # the dataset is unreadable until merged again
        for ref in todo:
            _reset_drive_dir(out, ref)
    if result.reused:
        _err(f"{len(result.reused)} drive(s) already built under config {chash} from the same "
             "raw files; skipped (--force rebuilds them)")

    _init_worker(configlib.to_dict(cfg))
    pool = _executor(workers, cfg) if todo else None

    def submit(fn, *args) -> Future:
        # what a task writes to stderr comes back with its result (see etl.progress)
        if pool is not None:
            return pool.submit(run_captured, fn, *args)
        fut: Future = Future()
        fut.set_result(run_captured(fn, *args))
        return fut

    bar = None
    try:
        size = max(1, cfg.output.shard_size)
        plans: dict[DriveRef, dict] = {}
        chunks: dict[DriveRef, int] = {}
        done: dict[DriveRef, list] = {}
        printed: Counter = Counter()
        traces: dict[DriveRef, str] = {}
        bar = Progress(enabled=progress, stream=sys.stderr, unit="frame")

        def relay(ref: DriveRef, res: dict) -> None:
            """What the task wrote to stderr (warnings, C libraries), the first lines."""
            for line in res.get("output", ()):
                if printed[ref, "out"] < LINES_PER_DRIVE:
                    _err(f"warning: {ref.drive_id}: {line}")
                printed[ref, "out"] += 1

        def relay_end(ref: DriveRef) -> None:
            more = printed[ref, "out"] - LINES_PER_DRIVE
            if more > 0:
                _err(f"… {more} more lines of output while building {ref.drive_id}")

        def on_chunk(ref: DriveRef, res: dict) -> None:
            bar.update(res["frames"])
            relay(ref, res)
            result.cpu_s += res.get("cpu_s", 0.0)
            if res["error"]:
                traces.setdefault(ref, res.get("trace", ""))
            result.bad_frames += res["bad"]
            for line in res["lines"]:
                if printed[ref] < LINES_PER_DRIVE:
                    _err(f"bad frame: {line}")
                    printed[ref] += 1
            printed[ref, "bad"] += res["bad"]
            done[ref].append(res)
            if len(done[ref]) < chunks[ref]:
                return
            results = done.pop(ref)
            ir_line = _ir_warning(ref, results)
            if ir_line:
                _err(f"warning: {ir_line}")  # once per drive
            for line in _notice_lines(ref, results):
                _err(f"warning: {line}")  # once per drive and kind
            marker = _finalize_drive(
                out, ref, chash, dsplits.get(ref.drive_id), plans[ref], results, inputs[ref]
            )
            if printed[ref, "bad"] > printed[ref]:
                _err(
                    f"… {printed[ref, 'bad'] - printed[ref]} more bad frames in {ref.drive_id} "
                    "(counted in the manifest)"
                )
            relay_end(ref)
            if marker["status"] == "failed":
                _err(f"drive failed: {marker['reason']}")
                if show_traceback and traces.get(ref):
                    _err(traces[ref])
                result.failed.append(ref.drive_id)
            else:
                result.built.append(ref.drive_id)

        pending = {
            submit(plan_drive, ref, dsplits.get(ref.drive_id), size, str(out), strict): (ref, None)
            for ref in todo
        }
        _SHOWN.append(bar)
        with bar, warnings_to(_err):
            while pending:
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in sorted(finished, key=lambda f: (pending[f][0], pending[f][1] or 0)):
                    ref, c = pending.pop(fut)
                    res = fut.result()
                    if c is not None:
                        on_chunk(ref, res)
                        continue
                    plans[ref] = res
                    result.cpu_s += res.get("cpu_s", 0.0)
                    for w in res["warnings"]:
                        _err(f"warning: {w}")
                    relay(ref, res)
                    if res["error"]:
                        relay_end(ref)
                        _err(f"drive failed: {res['error']}")
                        if show_traceback:
                            _err(res.get("trace", ""))
                        _failed_marker(
                            out,
                            ref,
                            chash,
                            dsplits.get(ref.drive_id),
                            res["error"],
                            res["warnings"],
                        )
                        result.failed.append(ref.drive_id)
                        continue
                    n = res["frames"]
                    chunks[ref], done[ref] = max(1, math.ceil(n / size)), []
                    bar.add_total(n)
                    for k in range(1, chunks[ref]):
                        args = (
                            ref,
                            dsplits.get(ref.drive_id),
                            k,
                            k * size,
                            min(n, (k + 1) * size),
                            str(out),
                            strict,
                        )
                        pending[submit(process_chunk, *args)] = (ref, k)
                    on_chunk(ref, res.pop("first"))
    finally:
        if bar is not None and bar in _SHOWN:
            _SHOWN.remove(bar)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    result.built.sort()
    result.failed.sort()
    if do_merge is None:
        do_merge = num_shards == 1
    if do_merge:
        result.manifest = merge(out, cfg, refs)
    return result


# --------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m etl.build",
        description="Raw CMHT drives (scene folders, ROS bags) → ArrayRecord shards, "
        "manifest.json and index.parquet.",
    )
    ap.add_argument("--src", type=Path, help="folder of raw drives (scene folders and/or bags)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (e.g. data_cache)")
    ap.add_argument("--config", type=Path, help="ETL config TOML (defaults when absent)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set output.split=drive",
    )
    ap.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument(
        "--strict", action="store_true", help="any bad frame fails its drive and the run"
    )
    ap.add_argument("--shard-index", type=int, default=0, help="build drives i::N (Slurm arrays)")
    ap.add_argument(
        "--num-shards", type=int, default=1, help="N in --shard-index (no merge if > 1)"
    )
    ap.add_argument(
        "--merge-only",
        action="store_true",
        help="only write manifest.json and index.parquet from the per-drive outputs",
    )
    ap.add_argument("--force", action="store_true",
                    help="rebuild every drive, even one already built from the same files")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--traceback", action="store_true", help="print tracebacks of failed drives")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = configlib.cli_load("etl.build", ETLConfig, args.config, args.set)
    if cfg is None:
        return configlib.EXIT_CONFIG
    try:
        writer_options(cfg.output)
    except ValueError as e:
        return configlib.cli_error("etl.build", e)
    if args.num_shards < 1:
        print(f"--num-shards {args.num_shards}: must be ≥ 1", file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"{args.out}: --out is a file, not a folder", file=sys.stderr)
        return 2
    if not 0 <= args.shard_index < args.num_shards:
        print(f"--shard-index {args.shard_index} is not in [0, {args.num_shards})", file=sys.stderr)
        return 2
    refs = None
    if args.src is not None:
        if not args.src.is_dir():
            print(f"{args.src}: source folder not found", file=sys.stderr)
            return 2
        try:
            refs, notes = discover(args.src, cfg)
        except Exception as e:  # noqa: BLE001
            print(f"{args.src}: cannot list drives: {_one_line(e)}", file=sys.stderr)
            return 1
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
    elif not args.merge_only:
        print("--src is required (except with --merge-only)", file=sys.stderr)
        return 2
    if args.merge_only:
        manifest = merge(args.out, cfg, refs)
        print(summary_table(manifest))
        return int(manifest["counts"]["drives"]["failed"] > 0)
    if not refs:
        print(f"{args.src}: no drives found (scene folders or bags)", file=sys.stderr)
        return 1
    try:
        res = build(
            refs,
            args.out,
            cfg,
            workers=args.workers,
            strict=args.strict,
            shard_index=args.shard_index,
            num_shards=args.num_shards,
            progress=not args.no_progress,
            show_traceback=args.traceback,
            force=args.force,
        )
    except KeyboardInterrupt:
        print("interrupted; finished drives are kept, rerun to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — e.g. a worker killed by the OOM killer
        print(
            f"build aborted: {_one_line(e)}; finished drives are kept, rerun to resume",
            file=sys.stderr,
        )
        return 1
    if res.manifest is not None:
        print(summary_table(res.manifest))
        print(f"wrote {args.out / MANIFEST} and {args.out / INDEX}")
    else:
        print(
            f"built {len(res.built)}, reused {len(res.reused)}, failed {len(res.failed)} drive(s); "
            "run with --merge-only to write the manifest"
        )
    return int(bool(res.failed))


if __name__ == "__main__":
    sys.exit(main())
