"""Synchronization to the LiDAR clock: which frame of every other sensor belongs to a sweep.

The LiDAR is the master clock; every sweep becomes one sample. Pure, vectorized functions:

* RGB, IR and radar take the *nearest* frame within a tolerance (default: half the median
  LiDAR period). Beyond it, or when the sweep lies outside the stream's time span, the
  modality is absent for that sample — flagged, never filled from a far-away frame.
* GPS and IMU are *interpolated* at the sweep time. GPS is first converted to ENU metres from
  the drive's first fix (never interpolated as ddmm.mmmm or degrees); IMU is interpolated per
  channel. No interpolation across a gap longer than ``gps_max_gap_s`` (GPS) or
  ``gps_imu_max_gap_s`` (IMU), or outside the span. Their offset is the signed time from the
  sweep to the nearest raw sample.
* A receiver that holds each fix over many rows (the CMHT unit writes its ~0.25 Hz fix into
  every 10 Hz frame file) would interpolate into a staircase; with ``gps_dedupe_repeats`` a
  run of identical consecutive fixes is collapsed to its first row — the time the fix
  appeared — before the ENU conversion (:func:`dedupe_repeats`). Sweeps after the last new
  fix then lie outside the GPS span (absent), not on a stale held value.

Offsets are ``sensor time − LiDAR time`` in seconds, 0 where absent (the schema's convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from etl.config import SyncConfig
from etl.errors import DriveError
from etl.preprocess import geodetic_to_enu
from etl.schema import MODALITIES, MODALITY_INDEX

NEAREST_MODALITIES: tuple[str, ...] = ("radar", "rgb", "ir")
FALLBACK_PERIOD_S = 0.1  # a drive with a single sweep has no period; assume 10 Hz


def _times(t) -> np.ndarray:
    return np.asarray(t, dtype=np.float64).reshape(-1)


def check_times(t, where: str) -> np.ndarray:
    """``t`` as float64, or DriveError if it is not finite and strictly increasing."""
    t = _times(t)
    if not np.all(np.isfinite(t)):
        raise DriveError(where, f"{int((~np.isfinite(t)).sum())} non-finite timestamps")
    if len(t) > 1:
        d = np.diff(t)
        if np.any(d <= 0):
            bad = int(np.argmax(d <= 0)) + 1
            raise DriveError(
                where,
                f"timestamps not strictly increasing at index {bad} ({t[bad - 1]!r} → {t[bad]!r})",
            )
    return t


def default_tolerance(lidar_t) -> float:
    """Half the median LiDAR period (the nearest-frame tolerance when the config says 0)."""
    t = _times(lidar_t)
    if len(t) < 2:
        return FALLBACK_PERIOD_S / 2
    return float(np.median(np.diff(t))) / 2


def nearest_within(master_t, stream_t, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """For each master time, the index of the nearest stream time within ``tol`` (inclusive).

    Returns ``(index, offset)``: ``index`` int64, −1 where the nearest frame is farther than
    ``tol`` or the master time lies outside ``[stream_t[0], stream_t[-1]]``; ``offset`` float64
    ``stream_t[index] − master_t``, 0 where absent. Ties go to the earlier frame.
    """
    m = _times(master_t)
    s = _times(stream_t)
    idx = np.full(m.shape, -1, np.int64)
    off = np.zeros(m.shape, np.float64)
    if len(s) == 0 or len(m) == 0:
        return idx, off
    hi = np.clip(np.searchsorted(s, m, side="left"), 0, len(s) - 1)
    lo = np.clip(hi - 1, 0, len(s) - 1)
    d_lo = np.abs(m - s[lo])
    d_hi = np.abs(s[hi] - m)
    best = np.where(d_hi < d_lo, hi, lo)
    d = s[best] - m
    ok = (np.abs(d) <= tol) & (m >= s[0]) & (m <= s[-1])
    idx[ok] = best[ok]
    off[ok] = d[ok]
    return idx, off


def interpolate(master_t, t, values, max_gap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation of ``values`` (N, D) sampled at ``t`` onto ``master_t``.

    Rows with a non-finite value are dropped first (they become a gap). Returns
    ``(out (M, D) float64, present (M,) bool, offset (M,) float64)`` where a master time is
    present iff it lies in ``[t[0], t[-1]]`` and its bracketing samples are at most
    ``max_gap`` apart; ``offset`` is the signed time to the nearest raw sample (0 if absent).
    """
    m = _times(master_t)
    t = _times(t)
    v = np.asarray(values, np.float64).reshape(len(t), -1)
    keep = np.all(np.isfinite(v), axis=1) & np.isfinite(t)
    t, v = t[keep], v[keep]
    out = np.zeros((len(m), v.shape[1]), np.float64)
    present = np.zeros(len(m), bool)
    off = np.zeros(len(m), np.float64)
    if len(t) == 0 or len(m) == 0:
        return out, present, off
    if len(t) == 1:
        present = m == t[0]
        out[present] = v[0]
        return out, present, off
    lo = np.clip(np.searchsorted(t, m, side="right") - 1, 0, len(t) - 2)
    hi = lo + 1
    span = t[hi] - t[lo]
    w = (m - t[lo]) / span
    present = (m >= t[0]) & (m <= t[-1]) & (span <= max_gap)
    interp = v[lo] + w[:, None] * (v[hi] - v[lo])
    out[present] = interp[present]
    d_lo, d_hi = t[lo] - m, t[hi] - m
    nearest = np.where(np.abs(d_hi) < np.abs(d_lo), d_hi, d_lo)
    off[present] = nearest[present]
    return out, present, off


def dedupe_repeats(t, values) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first row of every run of identical consecutive rows of ``values`` (N, D).

    Rows with a non-finite value are kept as they are (``interpolate`` drops them) and end a
    run. Returns ``(t, values)`` of the kept rows (float64)."""
    t = _times(t)
    v = np.asarray(values, np.float64)
    if len(t) < 2:
        return t, v.reshape(len(t), *v.shape[1:])
    v = v.reshape(len(t), -1)
    same = np.all(v[1:] == v[:-1], axis=1)  # NaN ≠ NaN: a non-finite row never repeats
    keep = np.concatenate([[True], ~same])
    return t[keep], v[keep]


def gps_to_enu(gps_values) -> np.ndarray:
    """(N, 3) latitude, longitude (decimal degrees), altitude → ENU metres from the first
    finite fix. Non-finite rows stay NaN (``interpolate`` treats them as gaps)."""
    g = np.asarray(gps_values, np.float64).reshape(-1, 3)
    enu = np.full(g.shape, np.nan)
    finite = np.all(np.isfinite(g), axis=1)
    if not finite.any():
        return enu
    lat0, lon0, alt0 = g[np.argmax(finite)]
    enu[finite] = geodetic_to_enu(g[finite, 0], g[finite, 1], g[finite, 2], lat0, lon0, alt0)
    return enu


@dataclass
class SyncTable:
    """Per-sweep synchronization of one drive (M sweeps)."""

    time: np.ndarray  # (M,) float64 LiDAR sweep times
    index: dict[str, np.ndarray]  # modality → (M,) int64 frame index, −1 absent (lidar: arange)
    present: np.ndarray  # (M, 6) bool, MODALITIES order
    offset: np.ndarray  # (M, 6) float64 sensor − LiDAR time (s), 0 where absent
    gps: np.ndarray  # (M, 3) ENU metres, 0 where absent
    imu: np.ndarray  # (M, 6) SI, 0 where absent
    tolerance: float  # the nearest-frame tolerance used (s)

    def __len__(self) -> int:
        return len(self.time)


def synchronize(
    lidar_t,
    streams: dict[str, np.ndarray | None],
    gps: tuple[np.ndarray, np.ndarray] | None,
    imu: tuple[np.ndarray, np.ndarray] | None,
    cfg: SyncConfig,
) -> SyncTable:
    """The per-sweep table from raw timestamps.

    ``streams`` maps radar/rgb/ir to frame times (or None when the sensor is missing);
    ``gps`` is ``(times, (N, 3) lat lon alt degrees/metres)``, ``imu`` ``(times, (N, 6) SI)``.
    """
    lt = _times(lidar_t)
    m = len(lt)
    tol = cfg.tolerance_s if cfg.tolerance_s > 0 else default_tolerance(lt)
    present = np.zeros((m, len(MODALITIES)), bool)
    offset = np.zeros((m, len(MODALITIES)), np.float64)
    index = {"lidar": np.arange(m, dtype=np.int64)}
    present[:, MODALITY_INDEX["lidar"]] = True
    for name in NEAREST_MODALITIES:
        st = streams.get(name)
        if st is None:
            index[name] = np.full(m, -1, np.int64)
            continue
        idx, off = nearest_within(lt, st, tol)
        index[name] = idx
        present[:, MODALITY_INDEX[name]] = idx >= 0
        offset[:, MODALITY_INDEX[name]] = off
    out = {"gps": np.zeros((m, 3)), "imu": np.zeros((m, 6))}
    for name in ("gps", "imu"):
        series = gps if name == "gps" else imu
        if series is None or len(_times(series[0])) == 0:
            continue
        t, v = series
        if name == "gps":
            if cfg.gps_dedupe_repeats:
                t, v = dedupe_repeats(t, v)
            v, max_gap = gps_to_enu(v), cfg.gps_max_gap_s
        else:
            v, max_gap = np.asarray(v, np.float64), cfg.gps_imu_max_gap_s
        vals, ok, off = interpolate(lt, t, v, max_gap)
        out[name] = vals
        present[:, MODALITY_INDEX[name]] = ok
        offset[:, MODALITY_INDEX[name]] = off
    return SyncTable(lt, index, present, offset, out["gps"], out["imu"], float(tol))


def sync_drive(drive, cfg: SyncConfig) -> SyncTable:
    """:func:`synchronize` on an :class:`etl.sources.Drive`; DriveError when it has no
    LiDAR or a stream's timestamps are not strictly increasing."""
    if drive.lidar is None or len(drive.lidar.times) == 0:
        raise DriveError(drive.path, "no LiDAR frames (the master clock)")
    lt = check_times(drive.lidar.times, f"{drive.path} [lidar]")
    streams = {}
    for name in NEAREST_MODALITIES:
        s = getattr(drive, name)
        streams[name] = None if s is None else check_times(s.times, f"{drive.path} [{name}]")
    series = {}
    for name in ("gps", "imu"):
        ts = getattr(drive, name)
        series[name] = (
            None if ts is None else (check_times(ts.times, f"{drive.path} [{name}]"), ts.values)
        )
    return synchronize(lt, streams, series["gps"], series["imu"], cfg)
