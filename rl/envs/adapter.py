"""THE SEAM: a simulator observation → the model's input dict, exactly an ETL sample.

Every backend (racecar_gym, rl/envs/bullet.py, rl/envs/jax_env.py) yields racecar_gym's
observation dict — ``pose`` (6), ``velocity`` (6), ``acceleration`` (6), ``lidar`` (1080),
optionally ``rgb_camera`` (128, 128, 3) uint8, ``time``. The model was pretrained on ETL samples
(etl/schema.py): this adapter produces the same keys, shapes, dtypes, units and normalization
by calling the ETL's own preprocessing functions (etl/preprocess.py), never a copy of them.

    adapter = ObservationAdapter(PreprocessConfig(), world_scale=10.0)
    sample = adapter(obs)                 # one env or a batch (leading axis), numpy
    sample = jax.vmap(adapter.jax)(obs)   # the JAX backend's batched obs, jit-able

Decisions (one place, documented):

* **World scale.** The sim car is a 1:10 model; ``world_scale`` (default 10) maps its metres
  onto the real car's. It multiplies lidar ranges (before the BEV grid) and GPS positions —
  the geometry the model sees. Accelerations are NOT scaled by default (``accel_scale=1``):
  the small car's are already in a real car's range (≈ 3–4 m/s² launching, ≈ 3 m/s²
  cornering at full lock), while ×10 would give 3–4 G. Angular rates and gravity never scale.
* **lidar.** scan → :func:`etl.preprocess.scan_to_points` (angles from rl.envs.spec: +135° →
  −135°, z = 0 in the sensor frame, which *is* the ETL's vehicle frame; returns at or beyond
  ``spec.LIDAR_MAX`` are misses, not points) → :func:`etl.preprocess.bev_lidar`, the same
  function the ETL runs on Velodyne points (numpy here, ``xp=jax.numpy`` in :meth:`jax`).
  A planar scan has a single height, so the max-height channel reads (0 − z_min)/(z_max − z_min)
  wherever a cell is hit.
* **rgb.** :func:`etl.preprocess.preprocess_rgb` (OpenCV resize of the uint8 image, then
  ImageNet mean/std). The jitted path applies OpenCV's INTER_LINEAR (enlarging) / INTER_AREA
  (shrinking) as two static weight matrices and rounds to uint8 levels as OpenCV does;
  tests/test_adapter.py bounds the difference (OpenCV's fixed-point weights: ≤ 1 level).
  Absent camera → zeros with present flag 0.
* **gps.** ENU metres from the "first fix": x → east, y → north, z → up, relative to ``origin``
  (default: the track frame's origin — the start line — at spawn height), times ``world_scale``,
  i.e. metres in the real-car frame.
* **imu.** gyro = the body-frame angular velocity (rad/s), accel = accel_scale × the body-frame
  linear acceleration + the specific force of gravity (a resting, level IMU reads +9.81 m/s² on
  z, as the real one does; ``gravity=False`` drops it). PyBullet's car bounces on its wheel
  contacts, so its 100 Hz finite-difference z acceleration jitters by several m/s² around 0.
* **radar, ir** absent: present 0, zero placeholders from :func:`etl.schema.empty_sample`;
  ``offset`` zeros (every simulated sensor is sampled at the same instant), no boxes
  (``box_class`` −1, ``has_labels`` 0); ``time`` from the observation (float64).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from etl.config import BEVGrid, PreprocessConfig
from etl.preprocess import G, _cell_index, _log_density, bev_lidar, preprocess_rgb, scan_to_points
from etl.schema import IMAGENET_MEAN, IMAGENET_STD, MODALITY_INDEX, empty_sample, sample_spec
from rl.envs import spec

# rank of each observation key for ONE env (a batch adds a leading axis)
_SINGLE_RANK = {"lidar": 1, "pose": 1, "velocity": 1, "acceleration": 1, "rgb_camera": 3}


class ObservationAdapter:
    """Backend observation dict → ETL sample dict (see the module docstring for the choices).

    Args:
      pre: the ETL's PreprocessConfig the model was pretrained with.
      world_scale: sim metres → real-car metres.
      origin: (x, y, z) in sim metres that plays the drive's first GPS fix.
      gravity: add gravity's specific force to the accelerometer, as a real IMU measures it.
      accel_scale: factor on the simulated linear acceleration (1: m/s² as simulated).
      lidar_angles: ray angles (rad, CCW from forward); default the spec's 1080 rays.
    """

    def __init__(
        self,
        pre: PreprocessConfig,
        world_scale: float = 10.0,
        *,
        origin: tuple[float, float, float] = (0.0, 0.0, spec.START_Z),
        gravity: bool = True,
        accel_scale: float = 1.0,
        lidar_angles: Any = None,
    ):
        self.pre = pre
        self.world_scale = float(world_scale)
        self.origin = np.asarray(origin, np.float64)
        self.gravity = bool(gravity)
        self.accel_scale = float(accel_scale)
        angles = spec.lidar_angles() if lidar_angles is None else lidar_angles
        self.angles = np.asarray(angles, np.float32)
        self.max_range = float(spec.LIDAR_MAX)
        self.spec = sample_spec(pre)

    # ----------------------------------------------------------------- numpy (host envs)
    def __call__(self, obs: dict[str, Any]) -> dict[str, np.ndarray]:
        """One observation, or a batch with a leading axis (detected from the arrays' ranks)."""
        key = next(k for k in obs if k in _SINGLE_RANK)
        if np.ndim(obs[key]) == _SINGLE_RANK[key]:
            return self._one(obs)
        n = np.shape(obs[key])[0]
        items = [self._one({k: np.asarray(v)[i] for k, v in obs.items()}) for i in range(n)]
        return {k: np.stack([it[k] for it in items]) for k in items[0]}

    def _one(self, obs: dict[str, Any]) -> dict[str, np.ndarray]:
        out = empty_sample(self.pre)
        present = out["present"]
        if "lidar" in obs:
            pts, valid = scan_to_points(
                np.asarray(obs["lidar"], np.float32), self._angles(np.shape(obs["lidar"])[-1]),
                z=0.0,
                scale=self.world_scale, max_range=self.max_range,
            )  # fmt: skip
            out["lidar"] = bev_lidar(pts, self.pre.lidar, valid=valid)
            present[MODALITY_INDEX["lidar"]] = 1
        if "rgb_camera" in obs:
            out["rgb"] = preprocess_rgb(np.asarray(obs["rgb_camera"], np.uint8), self.pre.image)
            present[MODALITY_INDEX["rgb"]] = 1
        if "pose" in obs:
            out["gps"] = self._gps(np.asarray(obs["pose"], np.float64), np)
            present[MODALITY_INDEX["gps"]] = 1
        if "velocity" in obs and "acceleration" in obs:
            out["imu"] = self._imu(
                np.asarray(obs["pose"], np.float64) if "pose" in obs else np.zeros(6),
                np.asarray(obs["velocity"], np.float64),
                np.asarray(obs["acceleration"], np.float64),
                np,
            )
            present[MODALITY_INDEX["imu"]] = 1
        if "time" in obs:
            out["time"] = np.asarray(np.reshape(obs["time"], -1)[0], np.float64)
        return out

    # ----------------------------------------------------------------- shared maths
    def _angles(self, n: int) -> np.ndarray:
        """Ray angles for an n-ray scan: the configured ones, or every k-th of them when a
        backend casts fewer rays (the JAX backend's ``SensorConfig.lidar_rays``)."""
        if n == len(self.angles):
            return self.angles
        if len(self.angles) % n:
            raise ValueError(f"lidar has {n} rays; expected {len(self.angles)} or a divisor")
        return self.angles[:: len(self.angles) // n]

    def _gps(self, pose, xp):
        return ((pose[:3] - xp.asarray(self.origin, pose.dtype)) * self.world_scale).astype(
            xp.float32
        )

    def _imu(self, pose, velocity, acceleration, xp):
        gyro = velocity[3:6]
        accel = acceleration[0:3] * self.accel_scale
        if self.gravity:  # R^T (0, 0, g) for R = Rz(yaw) Ry(pitch) Rx(roll)
            roll, pitch = pose[3], pose[4]
            up = xp.stack(
                [-xp.sin(pitch), xp.sin(roll) * xp.cos(pitch), xp.cos(roll) * xp.cos(pitch)]
            )
            accel = accel + G * up
        return xp.concatenate([gyro, accel]).astype(xp.float32)

    # ----------------------------------------------------------------- jax (jit / vmap)
    def _scan_points_jax(self, scan):
        """ONE scan → (points in the real-car frame, valid) with jax.numpy (what the numpy
        path's :meth:`_one` computes): the ETL's own :func:`etl.preprocess.scan_to_points`."""
        import jax.numpy as jnp

        return scan_to_points(
            jnp.asarray(scan, jnp.float32), jnp.asarray(self._angles(jnp.shape(scan)[-1])),
            z=0.0, scale=self.world_scale, max_range=self.max_range, xp=jnp,
        )  # fmt: skip

    def jax(self, obs: dict[str, Any]) -> dict[str, Any]:
        """The same transform on ONE observation with jax.numpy; pure, so ``jax.jit`` and
        ``jax.vmap`` apply (vmap it over a batch). Keys and dtypes as :meth:`__call__`."""
        import jax.numpy as jnp

        out: dict[str, Any] = {k: jnp.asarray(v) for k, v in empty_sample(self.pre).items()}
        present = np.zeros(len(out["present"]), np.uint8)
        if "lidar" in obs:
            pts, valid = self._scan_points_jax(obs["lidar"])
            out["lidar"] = bev_lidar(pts, self.pre.lidar, valid=valid, xp=jnp)
            present[MODALITY_INDEX["lidar"]] = 1
        if "rgb_camera" in obs:
            out["rgb"] = preprocess_rgb_jax(obs["rgb_camera"], self.pre.image.rgb_size)
            present[MODALITY_INDEX["rgb"]] = 1
        if "pose" in obs:
            out["gps"] = self._gps(jnp.asarray(obs["pose"], jnp.float32), jnp)
            present[MODALITY_INDEX["gps"]] = 1
        if "velocity" in obs and "acceleration" in obs:
            pose = jnp.asarray(obs["pose"], jnp.float32) if "pose" in obs else jnp.zeros(6)
            out["imu"] = self._imu(
                pose,
                jnp.asarray(obs["velocity"], jnp.float32),
                jnp.asarray(obs["acceleration"], jnp.float32),
                jnp,
            )
            present[MODALITY_INDEX["imu"]] = 1
        if "time" in obs:
            # float64 only where jax_enable_x64 is on; float32 otherwise (cast on the host)
            out["time"] = jnp.reshape(jnp.asarray(obs["time"]), (-1,))[0].astype(out["time"].dtype)
        out["present"] = jnp.asarray(present)
        return out

    def jax_patches(self, obs: dict[str, Any], patch: int, k: int) -> dict[str, Any]:
        """:meth:`jax` with the lidar BEV replaced by its ``k`` patches of ``patch``² cells
        that hold the most points: ``lidar_patches`` (k, patch²·2) float32 — exactly
        ``patchify(bev)`` gathered at ``lidar_ids`` (k,) int32 (:func:`lidar_patches`) — so the
        full (H, W, 2) grid is never built. ONE observation; vmap it over a batch."""
        import jax.numpy as jnp

        out = self.jax({key: v for key, v in obs.items() if key != "lidar"})
        out.pop("lidar")
        present = out["present"]
        if "lidar" in obs:
            pts, valid = self._scan_points_jax(obs["lidar"])
            out["lidar_patches"], out["lidar_ids"] = lidar_patches(
                pts, self.pre.lidar, patch, k, valid=valid)
            present = present.at[MODALITY_INDEX["lidar"]].set(1)
        else:
            out["lidar_patches"] = jnp.zeros((k, patch * patch * 2), jnp.float32)
            out["lidar_ids"] = jnp.arange(k, dtype=jnp.int32)
        out["present"] = present
        return out


def lidar_patches(points, grid: BEVGrid, patch: int, k: int, valid=None):
    """The ``k`` patches (``patch``² cells each) of :func:`etl.preprocess.bev_lidar`'s grid that
    hold the most points, built from the points alone (jax.numpy; jit/vmap-able).

    Returns ``(patches (k, patch²·2) float32, ids (k,) int32)``: patch ``ids[i]`` (row-major
    over the patch grid) has the pixels of ``patchify(bev_lidar(points, grid), patch)[ids[i]]``
    (rows, then columns, then the two channels) — the same numbers, without building the
    (H, W, 2) grid, its 2·H·W-cell scatters and its transpose. Empty patches fill the rest when
    fewer than ``k`` hold a point (ties: lowest id first)."""
    import jax
    import jax.numpy as jnp

    h, w = grid.shape
    if h % patch or w % patch:
        raise ValueError(f"lidar_patches: BEV grid {h}x{w} is not divisible by patch {patch}")
    gh, gw = h // patch, w // patch
    if not 1 <= k <= gh * gw:
        raise ValueError(f"lidar_patches: k = {k} patches, the grid has {gh * gw}")
    points = jnp.asarray(points)
    flat, inside = _cell_index(points, grid, valid, jnp)
    row, col = flat // w, flat % w
    pid = jnp.where(inside, (row // patch) * gw + col // patch, gh * gw)
    per_patch = jnp.zeros(gh * gw + 1, jnp.float32).at[pid].add(1.0)[: gh * gw]
    _, ids = jax.lax.top_k(per_patch, k)
    ids = ids.astype(jnp.int32)
    slot_of = jnp.full(gh * gw + 1, k, jnp.int32).at[ids].set(jnp.arange(k, dtype=jnp.int32))
    slot = slot_of[pid]
    cells = patch * patch
    idx = jnp.where(slot < k, slot * cells + (row % patch) * patch + col % patch, k * cells)
    keep = inside & (slot < k)
    count = jnp.zeros(k * cells + 1, jnp.float32).at[idx].add(keep.astype(jnp.float32))
    zmax = jnp.full(k * cells + 1, -jnp.inf, jnp.float32).at[idx].max(
        jnp.where(keep, points[:, 2], -jnp.inf))
    count, zmax = count[: k * cells], zmax[: k * cells]
    height = jnp.where(count > 0, (zmax - grid.z_min) / (grid.z_max - grid.z_min), 0.0)
    pix = jnp.stack([_log_density(count, grid, jnp), jnp.clip(height, 0.0, 1.0)], axis=-1)
    return pix.reshape(k, cells * 2).astype(jnp.float32), ids


def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights that reproduce OpenCV's 1-D resize as :func:`etl.preprocess._resize`
    uses it: INTER_LINEAR (half-pixel centres, edge-clamped) when enlarging, INTER_AREA (the
    exact pixel-overlap box filter) when shrinking."""
    w = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    if n_out >= n_in:
        for i in range(n_out):
            src = (i + 0.5) * scale - 0.5
            x0 = math.floor(src)
            frac = src - x0
            if x0 < 0:
                x0, frac = 0, 0.0
            if x0 >= n_in - 1:
                x0, frac = n_in - 1, 0.0
            w[i, x0] += 1.0 - frac
            if frac > 0:
                w[i, x0 + 1] += frac
    else:
        for i in range(n_out):
            lo, hi = i * scale, (i + 1) * scale
            for j in range(math.floor(lo), min(math.ceil(hi), n_in)):
                w[i, j] = min(hi, j + 1) - max(lo, j)
            w[i] /= w[i].sum()
    return w.astype(np.float32)


def preprocess_rgb_jax(img, size: tuple[int, int]):
    """jax.numpy twin of :func:`etl.preprocess.preprocess_rgb` for uint8 (H, W, 3) images:
    OpenCV's resize as two static weight matrices (:func:`resize_weights`), rounded to uint8
    levels as OpenCV does for uint8 input, then /255 and ImageNet mean/std."""
    import jax.numpy as jnp

    x = jnp.asarray(img, jnp.float32)
    h, w = size
    if x.shape[0] != h or x.shape[1] != w:
        wh = jnp.asarray(resize_weights(x.shape[0], h))
        ww = jnp.asarray(resize_weights(x.shape[1], w))
        x = jnp.einsum("ij,jkc,lk->ilc", wh, x, ww)
        x = jnp.clip(jnp.round(x), 0.0, 255.0)
    x = x / 255.0
    return ((x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)).astype(jnp.float32)
