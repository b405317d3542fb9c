"""The preprocessing functions that define a sample's arrays — pure, vectorized, no file I/O.

The ETL calls them on real sensor data, the simulator's observation adapter (``rl/``) on
simulated sensors; both must go through exactly these functions so that a BEV cell or a
normalized pixel means the same thing on both sides. Importing this module pulls in numpy
and OpenCV's array routines only (JAX lazily, for the ``xp=jax.numpy`` paths).

Frames: the vehicle frame is the LiDAR frame — x forward, y left, z up, metres.
BEV layout: row 0 is the far front edge (x = x_max), column 0 the far left (y = y_max),
so that the grid reads like a map with the car facing up.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from etl.config import BEVGrid, ImageConfig, RadarConfig
from etl.schema import IMAGENET_MEAN, IMAGENET_STD, VEHICLE_CLASSES, box_class_index

G = 9.80665  # standard gravity, m/s² per G
WGS84_A = 6378137.0
WGS84_E2 = 6.69437999014e-3


def _is_numpy(xp: Any) -> bool:
    return xp is np


# --------------------------------------------------------------------------- BEV grids
def _cell_index(points, grid: BEVGrid, valid, xp):
    """Flat cell index of each point, and a mask of points that land inside the grid."""
    h, w = grid.shape
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    finite = xp.isfinite(x) & xp.isfinite(y) & xp.isfinite(z)
    if not (_is_numpy(xp) and finite.all()):  # (numpy, all finite: nothing to replace)
        x = xp.where(finite, x, grid.x_max + 1.0)  # NaN/inf land outside (masked below)
        y = xp.where(finite, y, grid.y_max + 1.0)
    row = xp.floor((grid.x_max - x) / grid.resolution).astype(xp.int32)
    col = xp.floor((grid.y_max - y) / grid.resolution).astype(xp.int32)
    inside = (row >= 0) & (row < h) & (col >= 0) & (col < w) & (z >= grid.z_min) & (z <= grid.z_max)
    inside = inside & finite
    if valid is not None:
        inside = inside & valid
    flat = xp.where(inside, row * w + col, h * w)  # h*w is a dump cell, dropped below
    return flat, inside


def _scatter(flat, values, n, op, xp):
    """Reduce ``values`` into ``n`` cells by ``op`` ('add' or 'max'); index n is dropped."""
    if _is_numpy(xp):
        if op == "add":
            return np.bincount(flat, weights=values, minlength=n + 1)[:n]
        out = np.full(n + 1, -np.inf)
        np.maximum.at(out, flat, np.asarray(values, np.float64))  # same dtype: fast path
        return out[:n]
    init = xp.zeros(n + 1, xp.float32) if op == "add" else xp.full(n + 1, -xp.inf, xp.float32)
    out = init.at[flat].add(values) if op == "add" else init.at[flat].max(values)
    return out[:n]


def _log_density(count, grid: BEVGrid, xp):
    return xp.clip(xp.log1p(count) / np.log1p(grid.density_max), 0.0, 1.0)


def bev_lidar(points, grid: BEVGrid, valid=None, xp: Any = np):
    """LiDAR points (N, ≥3: x y z …) in the vehicle frame → (H, W, 2) float32 in [0, 1].

    Channel 0: log-density, log1p(count) / log1p(density_max), clipped to 1.
    Channel 1: max height, (max z − z_min) / (z_max − z_min); 0 in empty cells.
    ``valid`` (N,) bool masks out padding points (used by the simulator's fixed-size scans).
    Works with numpy or jax.numpy (pass ``xp=jax.numpy``; then it is jit/vmap-able).
    """
    h, w = grid.shape
    n = h * w
    points = xp.asarray(points)
    flat, inside = _cell_index(points, grid, valid, xp)
    if _is_numpy(xp):  # the same numbers with fewer passes: points outside are in cell n
        count = np.bincount(flat, minlength=n + 1)[:n].astype(np.float64)
        zmax = np.full(n + 1, -np.inf)
        np.maximum.at(zmax, flat, points[:, 2].astype(np.float64))
        zmax = zmax[:n]
    else:
        count = _scatter(flat, inside.astype(xp.float32), n, "add", xp)
        zmax = _scatter(flat, xp.where(inside, points[:, 2], -xp.inf), n, "max", xp)
    height = xp.where(count > 0, (zmax - grid.z_min) / (grid.z_max - grid.z_min), 0.0)
    out = xp.stack([_log_density(count, grid, xp), xp.clip(height, 0.0, 1.0)], axis=-1)
    return out.reshape(h, w, 2).astype(xp.float32)


def bev_radar(points, velocity, cfg: RadarConfig, valid=None, xp: Any = np):
    """Radar targets (N, ≥3) and their Doppler velocity (N,) m/s → (H, W, 2) float32 in [0, 1].

    Channel 0: log-density as for LiDAR. Channel 1: mean Doppler of the cell's targets,
    min-max on [velocity_min, velocity_max]; 0 in empty cells (the density channel says
    which cells are empty, so 0 never reads as a velocity).
    """
    grid = cfg.grid
    h, w = grid.shape
    n = h * w
    points = xp.asarray(points)
    velocity = xp.asarray(velocity)
    flat, inside = _cell_index(points, grid, valid, xp)
    inside = inside & xp.isfinite(velocity)
    flat = xp.where(inside, flat, n)
    ones = inside.astype(xp.float32)
    count = _scatter(flat, ones, n, "add", xp)
    vsum = _scatter(flat, xp.where(inside, velocity, 0.0), n, "add", xp)
    vmean = vsum / xp.maximum(count, 1.0)
    vnorm = (vmean - cfg.velocity_min) / (cfg.velocity_max - cfg.velocity_min)
    doppler = xp.where(count > 0, xp.clip(vnorm, 0.0, 1.0), 0.0)
    out = xp.stack([_log_density(count, grid, xp), doppler], axis=-1)
    return out.reshape(h, w, 2).astype(xp.float32)


def scan_to_points(ranges, angles, z: float = 0.0, scale: float = 1.0, max_range=None, xp=np):
    """A planar range scan → (N, 3) points in the sensor frame, times ``scale``.

    ``scale`` maps simulator metres onto real-car metres (the world-scale knob). Returns the
    points and a validity mask (finite ranges below ``max_range``: max-range returns are
    misses, not obstacles).
    """
    ranges = xp.asarray(ranges)
    angles = xp.asarray(angles)
    valid = xp.isfinite(ranges)
    if max_range is not None:
        valid = valid & (ranges < max_range)
    r = xp.where(valid, ranges, 0.0) * scale
    pts = xp.stack([r * xp.cos(angles), r * xp.sin(angles), xp.full_like(r, z * scale)], axis=-1)
    return pts, valid


# --------------------------------------------------------------------------- images
def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if img.shape[0] == h and img.shape[1] == w:
        return img
    shrinking = img.shape[0] > h or img.shape[1] > w
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


@lru_cache(maxsize=1)
def _rgb_lut() -> np.ndarray:
    """(1, 256, 3) float32: the normalized value of every uint8 level per channel, computed
    with exactly the float32 operations of the array path (so the table is bit-identical)."""
    x = np.arange(256, dtype=np.float32)[:, None] / 255.0
    lut = ((x - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    lut.setflags(write=False)
    return lut.reshape(1, 256, 3)


def preprocess_rgb(img, cfg: ImageConfig) -> np.ndarray:
    """An RGB image (H, W, 3) uint8 (RGB order) → (h, w, 3) float32, ImageNet mean/std.

    Resize: INTER_AREA when shrinking, INTER_LINEAR when enlarging, on the uint8 image (so
    the result is rounded to uint8 levels, as OpenCV does); then (x/255 − mean)/std. For uint8
    input the normalization is one table lookup per pixel (``cv2.LUT``; bit-identical to the
    arithmetic, which other dtypes still take).
    """
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"rgb image must be (H, W, 3), got {img.shape}")
    r = _resize(img, cfg.rgb_size)
    if r.dtype == np.uint8:
        return cv2.LUT(np.ascontiguousarray(r), _rgb_lut())
    x = r.astype(np.float32) / 255.0
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def ir_range_key(dtype) -> str:
    """``"ir16"`` for 16-bit (and wider integer) IR images, else ``"ir"``: the prefix of the
    ImageConfig keys that give their raw range."""
    dt = np.dtype(dtype)
    return "ir16" if dt.kind in "ui" and dt.itemsize >= 2 else "ir"


def ir_range(dtype, cfg: ImageConfig) -> tuple[float, float]:
    """The raw pixel range mapped to [0, 1] for an IR image of this pixel type: 16-bit images
    ``(ir16_min, ir16_max)``, others (8-bit, float) ``(ir_min, ir_max)``."""
    key = ir_range_key(dtype)
    return getattr(cfg, f"{key}_min"), getattr(cfg, f"{key}_max")


def ir_outside(img, cfg: ImageConfig) -> tuple[int, float, float]:
    """(pixels outside :func:`ir_range`, the image's min, its max): clipped pixels."""
    img = np.asarray(img)
    lo, hi = ir_range(img.dtype, cfg)
    vmin, vmax = float(img.min()), float(img.max())
    if lo <= vmin and vmax <= hi:
        return 0, vmin, vmax
    return int(np.count_nonzero((img < lo) | (img > hi))), vmin, vmax


def preprocess_ir(img, cfg: ImageConfig) -> np.ndarray:
    """A thermal image (H, W), (H, W, 1) or (H, W, 3) → (h, w, 1) float32 min-max in [0, 1],
    over the range of its pixel type (:func:`ir_range`)."""
    img = np.asarray(img)
    lo, hi = ir_range(img.dtype, cfg)
    if img.ndim == 3 and img.shape[2] == 3:  # grayscale stored as 3 equal channels
        img = img.mean(axis=2)
    elif img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim != 2:
        raise ValueError(f"ir image must be (H, W) or (H, W, 1|3), got {img.shape}")
    x = _resize(img.astype(np.float32), cfg.ir_size)
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return x[..., None].astype(np.float32)


# --------------------------------------------------------------------------- GPS / IMU
def nmea_to_degrees(v):
    """Signed NMEA ddmm.mmmm (or dddmm.mmmm) → decimal degrees. 4313.7196 → 43.228660."""
    v = np.asarray(v, dtype=np.float64)
    a = np.abs(v)
    deg = np.floor(a / 100.0)
    return np.sign(v) * (deg + (a - 100.0 * deg) / 60.0)


def geodetic_to_ecef(lat_deg, lon_deg, alt=0.0):
    lat = np.radians(np.asarray(lat_deg, np.float64))
    lon = np.radians(np.asarray(lon_deg, np.float64))
    alt = np.asarray(alt, np.float64)
    n = WGS84_A / np.sqrt(1.0 - WGS84_E2 * np.sin(lat) ** 2)
    x = (n + alt) * np.cos(lat) * np.cos(lon)
    y = (n + alt) * np.cos(lat) * np.sin(lon)
    z = (n * (1.0 - WGS84_E2) + alt) * np.sin(lat)
    return np.stack([x, y, z], axis=-1)


def geodetic_to_enu(lat_deg, lon_deg, alt, lat0, lon0, alt0=0.0) -> np.ndarray:
    """WGS-84 latitude/longitude/altitude → (…, 3) east, north, up metres from the origin."""
    d = geodetic_to_ecef(lat_deg, lon_deg, alt) - geodetic_to_ecef(lat0, lon0, alt0)
    la, lo = np.radians(lat0), np.radians(lon0)
    r = np.array(
        [
            [-np.sin(lo), np.cos(lo), 0.0],
            [-np.sin(la) * np.cos(lo), -np.sin(la) * np.sin(lo), np.cos(la)],
            [np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)],
        ]
    )
    return d @ r.T


def accel_g_to_si(accel_g):
    """Linear acceleration in G → m/s²."""
    return np.asarray(accel_g, np.float64) * G


# --------------------------------------------------------------------------- calibration
def euler_xyz_to_matrix(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix of intrinsic x-y-z Euler angles in radians (R = Rz · Ry · Rx)."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rxm = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rym = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rzm = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rzm @ rym @ rxm


def rigid_transform(rotation_xyz, translation) -> np.ndarray:
    t = np.eye(4)
    t[:3, :3] = euler_xyz_to_matrix(*rotation_xyz)
    t[:3, 3] = translation
    return t


def transform_points(points, t) -> np.ndarray:
    """Apply a 4×4 rigid transform to the xyz columns of (N, ≥3) points (others kept)."""
    points = np.asarray(points)
    out = np.array(points, dtype=np.float32, copy=True)
    if len(points):
        out[:, :3] = points[:, :3] @ np.asarray(t)[:3, :3].T + np.asarray(t)[:3, 3]
    return out


def project_to_image(points_vehicle, extrinsic, intrinsic) -> tuple[np.ndarray, np.ndarray]:
    """Vehicle-frame points → pixel (u, v) and depth with a LiDAR→camera extrinsic and K."""
    cam = transform_points(points_vehicle, extrinsic)[:, :3]
    z = cam[:, 2]
    uvw = cam @ np.asarray(intrinsic).T
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = uvw[:, :2] / uvw[:, 2:3]
    return uv, z


# --------------------------------------------------------------------------- labels
def boxes_to_array(labels: list[dict], max_boxes: int) -> tuple[np.ndarray, np.ndarray]:
    """SUSTechPOINTS label dicts → (max_boxes, 7) [x y z l w h yaw] and (max_boxes,) class."""
    boxes = np.zeros((max_boxes, 7), np.float32)
    cls = np.full((max_boxes,), -1, np.int32)
    for i, b in enumerate(labels[:max_boxes]):
        p, s, r = b["psr"]["position"], b["psr"]["scale"], b["psr"]["rotation"]
        boxes[i] = [p["x"], p["y"], p["z"], s["x"], s["y"], s["z"], r["z"]]
        cls[i] = box_class_index(b.get("obj_type", "Other"))
    return boxes, cls


def boxes_to_bev(boxes, box_class, grid: BEVGrid, classes=VEHICLE_CLASSES) -> np.ndarray:
    """(K, 7) boxes → (H, W) float32 occupancy of the grid cells whose centre lies in a box of
    one of ``classes`` (the linear probe's target)."""
    h, w = grid.shape
    keep_idx = np.array([box_class_index(c) for c in classes])
    keep = np.isin(np.asarray(box_class), keep_idx)
    b = np.asarray(boxes, np.float64)[keep]
    if len(b) == 0:
        return np.zeros((h, w), np.float32)
    rows, cols = np.mgrid[0:h, 0:w]
    cx = grid.x_max - (rows + 0.5) * grid.resolution
    cy = grid.y_max - (cols + 0.5) * grid.resolution
    dx = cx[..., None] - b[:, 0]
    dy = cy[..., None] - b[:, 1]
    c, s = np.cos(b[:, 6]), np.sin(b[:, 6])
    lx = c * dx + s * dy
    ly = -s * dx + c * dy
    inside = (np.abs(lx) <= b[:, 3] / 2) & (np.abs(ly) <= b[:, 4] / 2)
    return inside.any(axis=-1).astype(np.float32)
