"""CMHT scene folders (the synchronized release, SUSTechPOINTS layout) → :class:`Drive`.

One scene folder (e.g. ``drive_dusk_clear_0/drive_dusk_1/``) holds, with the folder names of
:class:`etl.config.SceneLayout`::

    Gps_Imu/data/timestamp.txt     one stamp per frame: integer milliseconds (float seconds,
                                   integer µs or ns are recognised by their values, with a note)
    Gps_Imu/data/%08d.txt          8 lines: lat, lon (signed NMEA ddmm.mmmm), gyro xyz (rad/s),
                                   accel xyz (G)
    lidar/%08d.pcd                 radar/front_points/%08d.pcd
    camera/front/%08d.jpg|png      camera/ir/%08d.jpg|png
    calib/camera/<name>.json       extrinsic (16, row-major LiDAR → camera), intrinsic (9)
    calib/radar/<name>.json        translation, rotation (Euler xyz, rad), coordinatesOffset
    label/%08d.json                SUSTechPOINTS boxes in the LiDAR frame, on some frames

The release is synchronized: frame ``i`` of every sensor was taken at ``timestamp[i]``.
Frames whose stamp is a duplicate or out of order are dropped, each judged by its neighbours
(the longest increasing run of stamps is kept, so one spiked stamp drops one frame, not the
rest of the drive; one warning with the count and the frames); gaps in the stamps (dropped
frames) are kept as they are — no frame is invented.

Indices: ``Stream.load(k)`` takes the index ``k`` into that stream's ``times`` (the ``k``-th
existing file); ``Drive.labels(k)`` takes the index into the LiDAR stream (or, where a scene has
no LiDAR folder, the scene's frame number). :func:`scene_frames` gives the frame numbers.

Everything reachable from the returned :class:`Drive` is plain data or a small callable object
over file paths, so a worker process may equally call ``open_scene`` again on the path
(cheap: directory listings, ``timestamp.txt`` and the GPS/IMU text files) or use the Drive.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np

from etl import preprocess
from etl.config import ETLConfig, SceneLayout
from etl.errors import DriveError, FrameError
from etl.images import read_image
from etl.pcd import points_xyzi, radar_points, read_pcd
from etl.sources import Calibration, Drive, Stream, TimeSeries, walk

__all__ = ["SceneWarning", "find_scenes", "open_scene", "read_calibration", "scene_frames"]

_FRAME_RE = re.compile(r"^(\d+)$")
_IMAGE_EXT = (".jpg", ".jpeg", ".png")


class SceneWarning(UserWarning):
    """A repairable problem in a scene (a broken label file, …); one line naming the file.
    ``kind`` names the problem: the build counts them per drive and kind."""

    def __init__(self, message: str, kind: str = "bad labels"):
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------- discovery
def _is_scene(d: Path, layout: SceneLayout) -> bool:
    return (d / layout.lidar).is_dir() or (d / layout.gps_imu).is_dir()


def find_scenes(src, layout: SceneLayout | None = None) -> list[Path]:
    """Every scene folder under ``src`` (``src`` itself if it is one), sorted.

    A scene is a folder that contains the configured LiDAR folder or the ``Gps_Imu`` folder;
    the search does not descend into a scene. Symbolic links are followed, each real folder
    searched once (:func:`etl.sources.walk`).
    """
    layout = layout or SceneLayout()
    src = Path(src)
    if _is_scene(src, layout):
        return [src]
    found = []
    for root, dirs, _files in walk(src):
        d = Path(root)
        if d != src and _is_scene(d, layout):
            found.append(d)
            dirs[:] = []
            continue
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
    return sorted(found)


# --------------------------------------------------------------------------- small helpers
def _frame_files(folder: Path, exts: tuple[str, ...]) -> tuple[dict[int, str], int]:
    """Frame number → file name for ``%08d.<ext>`` files; also the count of other files."""
    out: dict[int, str] = {}
    other = 0
    with os.scandir(folder) as it:
        for e in it:
            stem, ext = os.path.splitext(e.name)
            m = _FRAME_RE.match(stem)
            if m is None or ext.lower() not in exts or not e.is_file():
                other += not e.name.startswith(".") and e.is_file()
                continue
            n = int(stem)
            if n not in out or exts.index(ext.lower()) < exts.index(os.path.splitext(out[n])[1]):
                out[n] = e.name
    return out, other


def _numbers(v, n: int, what: str, where: Path) -> np.ndarray:
    try:
        a = np.asarray(v, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DriveError(where, f"broken calibration: {what} is not a list of numbers") from None
    if a.size != n or not np.isfinite(a).all():
        raise DriveError(where, f"broken calibration: {what} needs {n} finite numbers, "
                         f"has {a.size}")  # fmt: skip
    return a


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DriveError(path, f"broken calibration JSON: {e}") from None


# --------------------------------------------------------------------------- timestamps
# seconds per unit, and the spacing of successive frames (seconds) a scene can have
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "ns": 1e-9}
FRAME_PERIOD_S = (1e-3, 10.0)  # 1 kHz … 0.1 Hz
EPOCH_S = (631152000.0, 4102444800.0)  # a Unix time 1990 … 2100


def _read_timestamps(path: Path) -> tuple[np.ndarray, str | None]:
    """``timestamp.txt`` → ((N,) float64 seconds, a note naming the unit when it is not ms).

    The release writes integer milliseconds; other exports write float seconds (``1650000000.1``)
    or integer µs / ns. The unit is inferred from the values: the one that makes the median
    frame spacing a plausible frame period (:data:`FRAME_PERIOD_S`); when several do, the one
    that makes the first stamp a Unix time (:data:`EPOCH_S`), else milliseconds for integer
    stamps. Stamps that fit no unit, or several (float stamps spaced 1–10 apart, not Unix
    times), fail with one line naming the file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DriveError(path, "no timestamp.txt: frame times unknown") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DriveError(path, f"cannot read timestamps: {e}") from None
    lines = text.split()
    try:
        raw = np.array(lines, dtype=np.float64)
    except ValueError:
        bad = next(i for i, s in enumerate(lines) if not _is_number(s))
        raise DriveError(path, f"bad timestamp {lines[bad]!r} (entry {bad + 1})") from None
    if raw.size == 0:
        raise DriveError(path, "timestamp.txt is empty")
    if not np.isfinite(raw).all():
        raise DriveError(path, "timestamp.txt holds NaN/inf")
    unit, why = _time_unit(raw, integers=all(s.lstrip("+-").isdigit() for s in lines))
    if unit is None:
        raise DriveError(path, f"timestamp unit unknown: {why}")
    note = None if unit == "ms" else f"{path}: timestamps read as {unit}, not ms ({why})"
    return raw * TIME_UNITS[unit], note


def _time_unit(raw: np.ndarray, integers: bool) -> tuple[str | None, str]:
    """The unit of raw stamps (see :func:`_read_timestamps`) and why, or (None, why not)."""
    steps = np.diff(raw)
    steps = steps[steps > 0]
    if steps.size == 0:  # one frame (or none in order): the spacing cannot tell
        return "ms", "one frame"
    step = float(np.median(steps))
    lo, hi = FRAME_PERIOD_S
    fits = [u for u, k in TIME_UNITS.items() if lo <= step * k <= hi]
    spacing = f"median spacing {step:g}"
    if len(fits) == 1:
        return fits[0], f"{spacing} = {step * TIME_UNITS[fits[0]]:g} s"
    if not fits:
        return None, (f"{spacing} is no frame period ({lo:g}–{hi:g} s) in any of "
                      f"{', '.join(TIME_UNITS)}")
    epoch = [u for u in fits if EPOCH_S[0] <= raw[0] * TIME_UNITS[u] <= EPOCH_S[1]]
    if len(epoch) == 1:
        return epoch[0], f"{spacing}, first stamp {raw[0]:.6g} a Unix time in {epoch[0]}"
    if integers and "ms" in fits:
        return "ms", spacing
    return None, (f"{spacing} reads as {' or '.join(fits)} and the stamps are no Unix time; "
                  f"write integer milliseconds")


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _monotonic(t: np.ndarray) -> np.ndarray:
    """Mask of the frames kept: the longest strictly increasing run of stamps (not contiguous).

    Each frame is judged by its neighbours, not by the running maximum: one stamp that jumps
    far ahead (a spike) or back is dropped alone, and every later good frame stays. Duplicates
    and backsteps are dropped; among equally long choices the earlier frames are kept (a
    backstep drops the later frame). A forward gap with increasing stamps after it is kept.
    """
    n = len(t)
    keep = np.zeros(n, bool)
    if n == 0:
        return keep
    # patience sorting: tails[L] = index of the smallest last stamp of an increasing run of
    # length L + 1; length[i] = the longest run ending at frame i
    tails: list[int] = []
    tail_t: list[float] = []
    length = np.empty(n, np.int64)
    for i, x in enumerate(t.tolist()):
        L = bisect.bisect_left(tail_t, x)
        if L == len(tails):
            tails.append(i)
            tail_t.append(x)
        else:
            tails[L] = i
            tail_t[L] = x
        length[i] = L + 1
    # walk back from the last frame of a longest run, choosing at each length the earliest
    # frame that still fits below the frame kept after it
    by_len: dict[int, list[int]] = {}
    for i, L in enumerate(length.tolist()):
        by_len.setdefault(L, []).append(i)
    best = len(tails)
    i = by_len[best][0]
    keep[i] = True
    for L in range(best - 1, 0, -1):
        i = next(j for j in by_len[L] if j < i and t[j] < t[i])
        keep[i] = True
    return keep


# --------------------------------------------------------------------------- GPS / IMU
def _read_gps_imu(
    data_dir: Path, frames: np.ndarray, times: np.ndarray, warn: list[str],
    accel_sign=(1.0, 1.0, -1.0),
) -> tuple[TimeSeries | None, TimeSeries | None]:
    """Per-frame GPS/IMU text files → (gps, imu) TimeSeries at the frames' stamps.

    Acceleration: G → m/s², then multiplied per axis by ``accel_sign`` into the contract's
    convention (specific force, z up: +9.81 on z at rest, as sensor_msgs/Imu).

    A missing or unparsable file, a wrong number of values, NaN/inf, or the receiver's
    "no fix" (lat = lon = 0) skips that row; the skips are counted in one warning line.
    """
    rows, used, bad = [], [], []
    for n, t in zip(frames.tolist(), times.tolist(), strict=True):
        name = f"{n:08d}.txt"
        try:
            with open(data_dir / name) as f:
                vals = f.read().split()
        except (OSError, UnicodeDecodeError):
            bad.append(f"{name}: missing or unreadable")
            continue
        if len(vals) != 8:
            bad.append(f"{name}: {len(vals)} values, expected 8")
            continue
        try:
            row = [float(v) for v in vals]
        except ValueError:
            bad.append(f"{name}: not numbers")
            continue
        if not all(np.isfinite(row)):
            bad.append(f"{name}: NaN/inf")
            continue
        if row[0] == 0.0 and row[1] == 0.0:
            bad.append(f"{name}: no fix (lat = lon = 0)")
            continue
        rows.append(row)
        used.append(t)
    if bad:
        warn.append(f"{data_dir}: {len(bad)} of {len(frames)} GPS/IMU files skipped "
                    f"(first: {bad[0]})")  # fmt: skip
    if not rows:
        warn.append(f"{data_dir}: no usable GPS/IMU file: gps and imu absent")
        return None, None
    a = np.array(rows, dtype=np.float64)
    t = np.array(used, dtype=np.float64)
    lat, lon = preprocess.nmea_to_degrees(a[:, 0]), preprocess.nmea_to_degrees(a[:, 1])
    gps = TimeSeries(t, np.stack([lat, lon, np.zeros_like(lat)], axis=1))
    accel = preprocess.accel_g_to_si(a[:, 5:8]) * np.asarray(accel_sign, np.float64)
    imu = TimeSeries(t.copy(), np.concatenate([a[:, 2:5], accel], 1))
    return gps, imu


# --------------------------------------------------------------------------- calibration
def read_calibration(calib_dir, layout: SceneLayout | None = None, warn: list[str] | None = None):
    """``calib/`` → :class:`Calibration`; only the configured files are read.

    Cameras: ``extrinsic`` (16 numbers, row-major 4×4 LiDAR → camera), ``intrinsic`` (9, 3×3).
    Radar: ``radar_to_vehicle = rigid_transform(rotation, translation + coordinatesOffset)``:
    ``rotation`` is intrinsic Euler x-y-z in radians, and ``coordinatesOffset`` is read as a
    further translation (metres, vehicle frame) added to ``translation`` — the sample's files
    carry zeros in both, so the two readings cannot be told apart from the data.
    Any other file under ``calib/`` (the real sample has a stray ``front (copy).json``) is
    ignored with a warning naming it. A broken radar file is a :class:`DriveError` (the radar
    BEV needs the mount); a broken camera file is ignored with one warning naming the file and
    the reason — no modality of the sample uses the camera calibration.
    """
    layout = layout or SceneLayout()
    warn = [] if warn is None else warn
    calib_dir = Path(calib_dir)
    cal = Calibration()
    if not calib_dir.is_dir():
        warn.append(f"{calib_dir}: no calibration folder: identity radar mount, no camera calib")
        return cal
    wanted = {layout.rgb_calib, layout.ir_calib, layout.radar_calib}
    for p in sorted(calib_dir.rglob("*")):
        rel = p.relative_to(calib_dir).as_posix()
        if p.is_file() and rel not in wanted and not p.name.startswith("."):
            warn.append(f"{p}: ignored calibration file (not configured)")
    for rel, cam in ((layout.rgb_calib, "rgb"), (layout.ir_calib, "ir")):
        p = calib_dir / rel
        if not p.is_file():
            warn.append(f"{p}: no {cam} camera calibration")
            continue
        try:  # unused by the sample: a broken file costs a warning, not the drive
            d = _load_json(p)
            if not isinstance(d, dict):
                raise DriveError(p, "broken calibration: not a JSON object")
            ext = (_numbers(d["extrinsic"], 16, "extrinsic", p).reshape(4, 4)
                   if "extrinsic" in d else None)  # fmt: skip
            intr = (_numbers(d["intrinsic"], 9, "intrinsic", p).reshape(3, 3)
                    if "intrinsic" in d else None)  # fmt: skip
        except DriveError as e:
            warn.append(f"{p}: {e.reason}: {cam} camera calibration ignored (not used)")
            continue
        setattr(cal, f"{cam}_extrinsic", ext)
        setattr(cal, f"{cam}_intrinsic", intr)
    p = calib_dir / layout.radar_calib
    if p.is_file():
        d = _load_json(p)
        if not isinstance(d, dict):
            raise DriveError(p, "broken calibration: not a JSON object")
        tr = _numbers(d.get("translation", [0, 0, 0]), 3, "translation", p)
        rot = _numbers(d.get("rotation", [0, 0, 0]), 3, "rotation", p)
        off = _numbers(d.get("coordinatesOffset", [0, 0, 0]), 3, "coordinatesOffset", p)
        cal.radar_to_vehicle = preprocess.rigid_transform(rot, tr + off)
    else:
        warn.append(f"{p}: no radar calibration: identity radar mount")
    return cal


# --------------------------------------------------------------------------- frame loaders
class _Loader:
    """``load(k)``: read the k-th file of a stream. Plain attributes only (picklable)."""

    def __init__(self, paths: list[str], kind: str):
        self.paths = paths
        self.kind = kind

    def __call__(self, k: int):
        path = self.paths[k]
        try:
            if self.kind == "lidar":
                return points_xyzi(read_pcd(path), path)
            if self.kind == "radar":
                return radar_points(read_pcd(path), path)
            return read_image(path, self.kind)
        except FrameError:
            raise
        except Exception as e:  # one clear line naming the file, never a bare traceback
            raise FrameError(path, f"{type(e).__name__}: {e}") from None


def _valid_box(b) -> bool:
    try:
        psr = b["psr"]
        return all(
            np.isfinite(float(psr[k][c])) for k in ("position", "scale", "rotation") for c in "xyz"
        )
    except (KeyError, TypeError, ValueError):
        return False


class _Labels:
    """``labels(k)``: boxes of the k-th LiDAR frame (see the module doc), None if unlabelled."""

    def __init__(self, label_dir: Path, frames: list[int] | None, files: dict[int, str]):
        self.label_dir = str(label_dir)
        self.frames = frames  # LiDAR stream index → frame number; None: the index is the number
        self.files = files

    def __call__(self, k: int) -> list[dict] | None:
        if self.frames is not None:
            if not 0 <= k < len(self.frames):
                return None
            k = self.frames[k]
        name = self.files.get(k)
        if name is None:
            return None
        path = os.path.join(self.label_dir, name)
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            warnings.warn(SceneWarning(f"{path}: broken label JSON ({e}): frame unlabelled"),
                          stacklevel=2)  # fmt: skip
            return None
        if isinstance(d, dict) and isinstance(d.get("objs"), list):
            d = d["objs"]
        if not isinstance(d, list):
            warnings.warn(SceneWarning(f"{path}: label file is not a list of boxes: frame "
                                       "unlabelled"), stacklevel=2)  # fmt: skip
            return None
        boxes = [b for b in d if _valid_box(b)]
        if len(boxes) != len(d):
            warnings.warn(SceneWarning(f"{path}: {len(d) - len(boxes)} malformed boxes dropped"),
                          stacklevel=2)  # fmt: skip
        return boxes


def _stream(folder: Path, kind: str, times: np.ndarray, keep: np.ndarray,
            warn: list[str]) -> tuple[Stream | None, list[int]]:  # fmt: skip
    if not folder.is_dir():
        warn.append(f"{folder}: missing {kind} folder: {kind} absent")
        return None, []
    exts = (".pcd",) if kind in ("lidar", "radar") else _IMAGE_EXT
    files, other = _frame_files(folder, exts)
    n = len(times)
    nums = sorted(files)
    beyond = sum(1 for f in nums if f >= n)
    dropped = sum(1 for f in nums if f < n and not keep[f])
    nums = [f for f in nums if f < n and keep[f]]
    if beyond:
        warn.append(f"{folder}: {beyond} {kind} files beyond the {n} timestamps ignored")
    if dropped:
        warn.append(f"{folder}: {dropped} {kind} frames with duplicate/backward stamps dropped")
    if other:
        warn.append(f"{folder}: {other} files not named like a {kind} frame ignored")
    if not nums:
        warn.append(f"{folder}: no {kind} frames: {kind} absent")
        return None, []
    paths = [str(folder / files[f]) for f in nums]
    return Stream(times[nums], _Loader(paths, kind), paths), nums


def scene_frames(drive: Drive) -> dict[str, list[int]]:
    """Scene frame number of every stream entry, per modality (from the file names)."""
    out = {}
    for k, s in drive.streams().items():
        if s is not None:
            out[k] = [int(Path(p).stem) for p in s.names]
    return out


# --------------------------------------------------------------------------- the drive
def open_scene(path, drive_id: str, cfg: ETLConfig | None = None, *,
               gps_imu: bool = True) -> Drive:  # fmt: skip
    """Open one scene folder as a :class:`Drive` (see the module doc for the layout).

    Raises :class:`DriveError` without ``timestamp.txt`` or with a broken configured
    calibration file. Missing sensor folders give a ``None`` stream and one warning line each
    (``Drive.warnings``). ``gps_imu=False`` skips reading the per-frame GPS/IMU files (for
    worker processes that only need to load frames).
    """
    cfg = cfg or ETLConfig()
    lay = cfg.scene
    root = Path(path)
    if not root.is_dir():
        raise DriveError(root, "scene folder not found")
    warn: list[str] = []
    data_dir = root / lay.gps_imu / "data"
    times, unit_note = _read_timestamps(data_dir / "timestamp.txt")
    if unit_note:
        warn.append(unit_note)
    keep = _monotonic(times)
    if not keep.all():
        bad = np.flatnonzero(~keep).tolist()
        shown = ", ".join(str(b) for b in bad[:5]) + (", …" if len(bad) > 5 else "")
        warn.append(f"{data_dir / 'timestamp.txt'}: {len(bad)} frames with duplicate "
                    f"or backward timestamps dropped (frame {shown})")  # fmt: skip
    frames = np.flatnonzero(keep)

    calib = read_calibration(root / lay.calib, lay, warn)
    lidar, lidar_nums = _stream(root / lay.lidar, "lidar", times, keep, warn)
    radar, _ = _stream(root / lay.radar, "radar", times, keep, warn)
    rgb, _ = _stream(root / lay.rgb, "rgb", times, keep, warn)
    ir, _ = _stream(root / lay.ir, "ir", times, keep, warn)

    gps = imu = None
    if gps_imu:
        gps, imu = _read_gps_imu(data_dir, frames, times[frames], warn, lay.imu_accel_sign)

    label_dir = root / lay.label
    label_files: dict[int, str] = {}
    if label_dir.is_dir():
        label_files, _ = _frame_files(label_dir, (".json",))
    labels = _Labels(label_dir, lidar_nums if lidar is not None else None, label_files)

    return Drive(
        drive_id=drive_id,
        path=str(root),
        lidar=lidar,
        radar=radar,
        rgb=rgb,
        ir=ir,
        gps=gps,
        imu=imu,
        calib=calib,
        labels=labels,
        warnings=warn,
    )
