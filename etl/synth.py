"""Synthetic raw drives in the real CMHT layouts — the embedded default data set.

    python -m etl.synth --out cmht_raw [--drives 2 --frames 60 --format both --seed 0 --workers 1]

Each drive is a small world: a four-lane road that the ego car follows with a smooth speed
(~8–15 m/s) and yaw-rate profile, other vehicles (Car / Van / Truck boxes) driving in both
directions or parked, poles, trees and buildings beside the road, a flat ground. Every sensor
is rendered from that one world, so the same objects appear in all modalities:

- LiDAR: a 32-beam HDL-32E-like scan (ray casting against the ground, boxes and cylinders),
  fields x y z intensity ring time, in the LiDAR frame (x forward, y left, z up, 1.8 m up);
- radar: a few dozen targets on what the front radar sees (vehicles, poles, buildings, clutter)
  with the radial Doppler velocity (positive = receding), fields x y z velocity;
- RGB 1280×720 and thermal 640×480 images through calibrations like the real ones
  (LiDAR→camera extrinsic, 3×3 intrinsic); vehicles are warm in the thermal image;
- GPS (signed NMEA ddmm.mmmm around Hamilton, Ontario) and IMU (gyro rad/s, accel G);
- 3-D box labels (SUSTechPOINTS ``psr``, LiDAR frame) on a subset of the sweeps.

Two raw forms, as the real data is published:

- ``scene``: ``drive_<tod>_<weather>_<i>/drive_<tod>_<i+1>/`` with ``lidar/%08d.pcd`` (binary),
  ``camera/front|ir/%08d.jpg``, ``radar/front_points/%08d.pcd``, ``Gps_Imu/data/%08d.txt`` +
  ``timestamp.txt`` (ms, ±1–2 ms jitter, dropped frames as gaps), ``calib/``, ``label/``.
  All sensors share the frame index and time.
- ``bag``: a ROS 2 bag (sqlite3 by default, ``--storage mcap``, or ``--storage ros1`` for a
  ROS 1 ``.bag``) where each sensor has its own rate and phase, header stamps with jitter,
  log times with transport latency, and dropped messages. Calibration travels as
  ``/tf_static`` and ``sensor_msgs/CameraInfo``, and as a ``<bag>_calib/`` folder next to the
  bag laid out like a scene's ``calib/`` (what :mod:`etl.bag` reads).

IMU sign conventions follow each source: the scene files read about -1 G on z at rest, like
the real CMHT files; ``sensor_msgs/Imu`` in the bags follows REP 145 (+9.81 m/s² on z).

Ground truth (sensor times per stream, the ego trajectory in ENU, object tracks) goes to
``<out>/_truth/<drive_id>.json``, outside every drive, so the ETL cannot tell the drives from
real ones. Everything is deterministic per ``--seed`` (same seed → byte-identical files).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from etl.pcd import write_pcd
from etl.preprocess import WGS84_A, WGS84_E2, G, geodetic_to_ecef

# --------------------------------------------------------------------------- constants
ORIGIN_LAT, ORIGIN_LON, ORIGIN_ALT = 43.2288, -79.9390, 95.0  # Hamilton, Ontario
LIDAR_HEIGHT = 1.8  # LiDAR origin above the ground (m); the ground is z = -1.8 in its frame
LIDAR_ELEV = np.radians(np.linspace(-30.67, 10.67, 32))  # HDL-32E lasers, ring 0 lowest
LIDAR_N_AZ = 900  # 0.4° azimuth steps
LIDAR_PERIOD = 0.1
LIDAR_RANGE = (2.5, 100.0)  # closer returns hit the ego car's roof and are dropped
RADAR_ORIGIN = np.array([3.4, 0.0, -1.3])  # front bumper, in the LiDAR frame
RADAR_ELEV = np.radians([-1.5, 0.0, 1.5])
RADAR_AZ = np.radians(np.arange(-60.0, 60.01, 0.5))
RADAR_RANGE = 120.0
RGB_SIZE = (720, 1280)  # (height, width)
IR_SIZE = (480, 640)

# Calibration numbers like the real sample's (LiDAR→camera, row-major).
FRONT_EXTRINSIC = [
    0.0625666089119701, -0.998021964187949, -0.00613012623730141, -0.215424739527230,
    -0.151077250525747, -0.00339938678871338, -0.988516114457949, -0.120541267392768,
    0.986539955512618, 0.0627742237537781, -0.150991102417571, -0.164504810828037,
    0.0, 0.0, 0.0, 1.0,
]  # fmt: skip
FRONT_INTRINSIC = [738.264936107773, 0.0, 619.168236211166,
                   0.0, 737.794823072168, 371.029702332477, 0.0, 0.0, 1.0]  # fmt: skip
IR_EXTRINSIC = [
    0.00840510785491956, -0.999961190748392, -0.002640295249633, 0.168286110980556,
    -0.142759677144184, 0.00141339341761096, -0.989756372498170, -0.0469181408292542,
    0.989721692570005, 0.008695936758344, -0.142742257023837, -0.150966608607935,
    0.0, 0.0, 0.0, 1.0,
]  # fmt: skip
IR_INTRINSIC = [757.158013839009, 0.0, 336.551379339968,
                0.0, 757.102894126381, 272.352206300216, 0.0, 0.0, 1.0]  # fmt: skip

DATAFORMAT = (
    "latitude (ddmm.mmmm)\nlongitude (ddmm.mmmm)\n"
    "angular velocity around x (rad/s)\nangular velocity around y (rad/s)\n"
    "angular velocity around z (rad/s)\nlinear acceleration in the x direction (G)\n"
    "linear acceleration in the y direction (G)\nlinear acceleration in the z direction (G)\n"
)

CONDITIONS = (("dusk", "clear"), ("day", "clear"), ("night", "rain"), ("day", "rain"),
              ("dusk", "rain"), ("night", "clear"))  # fmt: skip

# Road cross-section (lateral offset d, metres, left positive, from the ego lane's centre).
ROAD_LEFT, ROAD_RIGHT = 12.25, -1.75
LANE_SAME, LANE_OPP = (0.0, 3.5), (7.0, 10.5)
MAT_ASPHALT, MAT_WHITE, MAT_YELLOW, MAT_GRASS, MAT_CONCRETE = range(5)
# per material: RGB colour, LiDAR intensity, thermal grey
MAT_RGB = np.array([[72, 72, 78], [215, 215, 210], [215, 185, 50], [70, 105, 50],
                    [150, 148, 140]], np.float32)  # fmt: skip
MAT_INTENSITY = np.array([9.0, 85.0, 70.0, 28.0, 22.0], np.float32)
MAT_IR = np.array([96.0, 82.0, 82.0, 52.0, 84.0], np.float32)

LIGHT = {  # sky top, sky horizon (RGB), light gain, fog distance (m)
    "day": ((95, 150, 215), (200, 215, 230), 1.0),
    "dusk": ((45, 50, 100), (235, 145, 95), 0.72),
    "night": ((6, 8, 18), (28, 30, 45), 0.35),
}

VEHICLE_TYPES = {  # size ranges l, w, h ; probability
    "Car": (((4.2, 4.9), (1.78, 1.98), (1.42, 1.70)), 0.62),
    "Van": (((4.9, 5.6), (1.95, 2.10), (1.95, 2.45)), 0.16),
    "Truck": (((6.5, 9.5), (2.35, 2.60), (2.9, 3.6)), 0.22),
}

FMT_CODE = {"scene": 1, "bag": 2}
STREAM_CODE = {"lidar": 1, "radar": 2, "rgb": 3, "ir": 4, "gps": 5, "imu": 6, "sched": 7,
               "world": 8, "noise": 9}  # fmt: skip


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _wrap(a):
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


# --------------------------------------------------------------------------- geodesy
def enu_to_geodetic(east, north, up, lat0, lon0, alt0=0.0):
    """Local ENU metres → WGS-84 latitude, longitude (degrees), altitude (m)."""
    la, lo = np.radians(lat0), np.radians(lon0)
    r = np.array([
        [-np.sin(lo), np.cos(lo), 0.0],
        [-np.sin(la) * np.cos(lo), -np.sin(la) * np.sin(lo), np.cos(la)],
        [np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)],
    ])  # fmt: skip
    enu = np.stack(np.broadcast_arrays(east, north, up), axis=-1).astype(np.float64)
    x, y, z = np.moveaxis(geodetic_to_ecef(lat0, lon0, alt0) + enu @ r, -1, 0)
    lon = np.arctan2(y, x)
    p = np.hypot(x, y)
    lat = np.arctan2(z, p * (1.0 - WGS84_E2))
    for _ in range(5):
        n = WGS84_A / np.sqrt(1.0 - WGS84_E2 * np.sin(lat) ** 2)
        alt = p / np.cos(lat) - n
        lat = np.arctan2(z, p * (1.0 - WGS84_E2 * n / (n + alt)))
    n = WGS84_A / np.sqrt(1.0 - WGS84_E2 * np.sin(lat) ** 2)
    return np.degrees(lat), np.degrees(lon), p / np.cos(lat) - n


def degrees_to_nmea(v: float) -> str:
    """Decimal degrees → signed NMEA ddmm.mmmm text with four decimals (43.22866 → 4313.7196)."""
    a = abs(float(v))
    deg = int(a)
    minutes = round((a - deg) * 60.0, 4)
    if minutes >= 60.0:
        deg, minutes = deg + 1, 0.0
    return f"{'-' if v < 0 else ''}{deg * 100 + minutes:.4f}"


# --------------------------------------------------------------------------- the world
@dataclass
class Snapshot:
    """Everything at one instant, in the LiDAR frame of the ego car."""

    t: float
    ego: dict  # x, y, yaw, v, r, a (world ENU, SI)
    boxes: np.ndarray  # (K, 7) x y zc l w h yaw — vehicles first, then buildings
    n_vehicles: int
    vehicle_ids: np.ndarray  # (n_vehicles,) index into World.vehicles
    vehicle_vel: np.ndarray  # (n_vehicles, 2) velocity in the LiDAR frame (m/s)
    box_intensity: np.ndarray
    box_rgb: np.ndarray  # (K, 3)
    box_ir: np.ndarray
    cyls: np.ndarray  # (P, 5) x y r z0 z1
    cyl_intensity: np.ndarray
    cyl_rgb: np.ndarray
    cyl_ir: np.ndarray


class World:
    """One drive's world, seeded. World frame: ENU metres from the ego's position at t = 0."""

    def __init__(self, rng: np.random.Generator, duration: float):
        self.duration = duration
        dt = 0.02
        t = np.arange(-30.0, duration + 40.0 + dt, dt)
        v0 = rng.uniform(10.5, 12.5)
        va, vp, vf = rng.uniform(0.7, 1.4, 2), rng.uniform(12, 40, 2), rng.uniform(0, 6.28, 2)
        ra, rp, rf = rng.uniform(0.012, 0.035, 2), rng.uniform(15, 50, 2), rng.uniform(0, 6.28, 2)
        w_v, w_r = 2 * np.pi / vp, 2 * np.pi / rp
        v = v0 + (va * np.sin(np.outer(t, w_v) + vf)).sum(1)
        acc = (va * w_v * np.cos(np.outer(t, w_v) + vf)).sum(1)
        r = (ra * np.sin(np.outer(t, w_r) + rf)).sum(1)

        def integrate(f):
            c = np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * dt)])
            return c - np.interp(0.0, t, c)

        yaw = rng.uniform(-np.pi, np.pi) + integrate(r)
        self.t, self.v, self.acc, self.r, self.yaw = t, v, acc, r, yaw
        self.x, self.y = integrate(v * np.cos(yaw)), integrate(v * np.sin(yaw))
        self.s = integrate(v)  # arc length along the road = the ego lane's centre line
        self.light, self.weather, self.tod = LIGHT["day"], "clear", "day"
        self._make_vehicles(rng, v0)
        self._make_statics(rng)

    # ----- ego and road
    def ego(self, t: float) -> dict:
        f = lambda a: float(np.interp(t, self.t, a))
        return {"x": f(self.x), "y": f(self.y), "yaw": f(self.yaw), "v": f(self.v),
                "r": f(self.r), "a": f(self.acc), "s": f(self.s)}  # fmt: skip

    def road_point(self, s, d):
        """Road coordinates (arc length s, lateral d) → world x, y and the road heading."""
        x, y = np.interp(s, self.s, self.x), np.interp(s, self.s, self.y)
        h = np.interp(s, self.s, self.yaw)
        return x - d * np.sin(h), y + d * np.cos(h), h

    def _road_table(self, s):
        """Centre line x, y, heading at arc lengths s (a uniform 0.25 m table, no searching)."""
        if not hasattr(self, "_rt"):
            grid = np.arange(self.s[0], self.s[-1], 0.25)
            self._rt = (grid[0], np.interp(grid, self.s, self.x), np.interp(grid, self.s, self.y),
                        np.interp(grid, self.s, self.yaw))  # fmt: skip
        s0, tx, ty, th = self._rt
        f = np.clip((s - s0) / 0.25, 0, len(tx) - 1.001)
        i = f.astype(np.int64)
        a = f - i
        lerp = lambda tab: tab[i] + a * (tab[i + 1] - tab[i])
        return lerp(tx), lerp(ty), lerp(th)

    def road_coords(self, px, py, ego: dict):
        """World points → road coordinates (s, d), by Newton steps from the ego's tangent."""
        c, sn = np.cos(ego["yaw"]), np.sin(ego["yaw"])
        s = ego["s"] + (px - ego["x"]) * c + (py - ego["y"]) * sn
        for _ in range(2):
            x, y, h = self._road_table(s)
            s = s + (px - x) * np.cos(h) + (py - y) * np.sin(h)
        x, y, h = self._road_table(s)
        d = -(px - x) * np.sin(h) + (py - y) * np.cos(h)
        return s, d

    @staticmethod
    def material(s, d):
        m = np.full(np.shape(d), MAT_GRASS, np.int8)
        m[(d > ROAD_RIGHT - 2.8) & (d < ROAD_LEFT + 2.8)] = MAT_CONCRETE
        m[(d > ROAD_RIGHT) & (d < ROAD_LEFT)] = MAT_ASPHALT
        dash = (s % 9.0) < 3.0
        for line, solid in ((ROAD_RIGHT + 0.2, True), (ROAD_LEFT - 0.2, True),
                            (1.75, False), (8.75, False)):  # fmt: skip
            m[(np.abs(d - line) < 0.07) & (solid | dash)] = MAT_WHITE
        m[(np.abs(d - 5.1) < 0.07) | (np.abs(d - 5.4) < 0.07)] = MAT_YELLOW
        return m

    # ----- objects
    def _make_vehicles(self, rng, v0):
        T = self.duration
        s_at = lambda tt: float(np.interp(tt, self.t, self.s))
        specs = []
        if rng.random() < 0.85:  # a leader in the ego lane
            specs.append(dict(lane=LANE_SAME[0], follow=rng.uniform(16, 35)))
        # the same-direction left lane: one common speed (no overtaking inside the lane);
        # faster traffic comes up from behind, slower traffic is caught up with
        v_left = v0 + rng.choice([-1, 1]) * rng.uniform(1.0, 3.5)
        ahead = v_left < v0
        c = rng.uniform(-30, 40)
        for _ in range(max(2, int(T / 12))):
            specs.append(dict(lane=LANE_SAME[1], speed=v_left, s0=c))
            c += (1 if ahead else -1) * rng.uniform(25, 70)
        # oncoming lanes: one speed per lane, meeting the ego spread over the drive
        n_opp = max(3, int(T / 5))
        v_opp = -rng.uniform(9, 14, 2)
        for k in range(n_opp):
            speed = v_opp[k % 2]
            tm = T * (k + rng.uniform(0.2, 0.8)) / n_opp + 2.0
            specs.append(dict(lane=LANE_OPP[k % 2], speed=speed, s0=s_at(tm) - speed * tm))
        # parked on the shoulder, spaced along the route
        n_park = max(2, int(s_at(T) / 120))
        for k in range(n_park):
            s0 = 12 + (s_at(T) + 40) * (k + rng.uniform(0.1, 0.9)) / n_park
            specs.append(dict(lane=-3.6, speed=0.0, s0=s0))
        names = list(VEHICLE_TYPES)
        probs = np.array([VEHICLE_TYPES[n][1] for n in names])
        self.vehicles = []
        for i, sp in enumerate(specs):
            kind = names[rng.choice(len(names), p=probs / probs.sum())]
            (lr, wr, hr), _ = VEHICLE_TYPES[kind]
            size = [rng.uniform(*lr), rng.uniform(*wr), rng.uniform(*hr)]
            colour = rng.choice([[200, 30, 35], [30, 60, 170], [225, 225, 230], [25, 25, 28],
                                 [150, 152, 160], [40, 120, 60], [230, 190, 30]])  # fmt: skip
            sp.update(obj_id=str(i + 1), obj_type=kind, size=size, rgb=colour.astype(float),
                      intensity=rng.uniform(25, 75), ir=rng.uniform(175, 215),
                      phase=rng.uniform(0, 6.28), speed=sp.get("speed", 0.0),
                      s0=sp.get("s0", 0.0))  # fmt: skip
            self.vehicles.append(sp)

    def _vehicle_s(self, t):
        out = []
        for sp in self.vehicles:
            if "follow" in sp:
                es = np.interp(t, self.t, self.s)
                out.append(es + sp["follow"] + 2.5 * np.sin(0.25 * t + sp["phase"]))
            else:
                out.append(sp["s0"] + sp["speed"] * t)
        return np.array(out)

    def vehicles_at(self, t: float):
        """World boxes (K, 7) and velocities (K, 2) of all vehicles, and which are on the map."""
        s = self._vehicle_s(t)
        ok = (s > self.s[0] + 10) & (s < self.s[-1] - 10)
        d = np.array([sp["lane"] for sp in self.vehicles])
        size = np.array([sp["size"] for sp in self.vehicles])
        x, y, h = self.road_point(s, d)
        back = np.array([sp.get("speed", 0.0) < 0 for sp in self.vehicles])
        yaw = _wrap(h + np.pi * back)
        eps = 0.05
        x1, y1, _ = self.road_point(self._vehicle_s(t + eps), d)
        x0, y0, _ = self.road_point(self._vehicle_s(t - eps), d)
        vel = np.stack([(x1 - x0) / (2 * eps), (y1 - y0) / (2 * eps)], 1)
        boxes = np.column_stack([x, y, size[:, 2] / 2, size, yaw])
        return boxes, vel, ok

    def _make_statics(self, rng):
        s_lo, s_hi = self.s[0] + 20, self.s[-1] - 20
        cyl, cyl_kind = [], []
        for side, d0 in ((0, ROAD_RIGHT - 3.8), (1, ROAD_LEFT + 2.3)):
            s = s_lo + rng.uniform(0, 20)
            while s < s_hi:
                cyl.append((s, d0 + rng.uniform(-0.2, 0.2), rng.uniform(0.12, 0.2), 0.0,
                            rng.uniform(6.0, 9.0)))  # fmt: skip
                cyl_kind.append(0)
                s += rng.uniform(22, 34)
            s = s_lo + rng.uniform(0, 30)
            while s < s_hi:  # tree trunks
                d = d0 - rng.uniform(2.5, 5.0) if side == 0 else d0 + rng.uniform(2.5, 5.0)
                cyl.append((s, d, rng.uniform(0.25, 0.45), 0.0, rng.uniform(4.0, 7.0)))
                cyl_kind.append(1)
                s += rng.uniform(15, 45)
        c = np.array(cyl)
        x, y, _ = self.road_point(c[:, 0], c[:, 1])
        self.cyls = np.column_stack([x, y, c[:, 2:]])
        kind = np.array(cyl_kind)
        self.cyl_intensity = np.where(kind == 0, 60.0, 18.0)
        self.cyl_rgb = np.where(kind[:, None] == 0, [[120, 120, 125]], [[85, 60, 40]]).astype(float)
        self.cyl_ir = np.where(kind == 0, 68.0, 90.0)

        blds = []
        for side in (-1, 1):
            s = s_lo + rng.uniform(0, 15)
            while s < s_hi:
                length, depth, height = rng.uniform(12, 35), rng.uniform(8, 16), rng.uniform(4, 14)
                edge = ROAD_RIGHT - 11.0 if side < 0 else ROAD_LEFT + 9.0
                d = edge + side * (depth / 2 + rng.uniform(0, 6))
                x, y, h = self.road_point(s + length / 2, d)
                blds.append([x, y, height / 2, length, depth, height, h])
                s += length + rng.uniform(4, 16)
        self.buildings = np.array(blds)
        n = len(blds)
        self.bld_intensity = rng.uniform(15, 45, n)
        self.bld_rgb = rng.choice([[150, 110, 90], [170, 165, 150], [110, 115, 125],
                                   [190, 180, 160], [120, 80, 70]], n).astype(float)  # fmt: skip
        self.bld_ir = rng.uniform(95, 125, n)

    def snapshot(self, t: float, radius: float = 140.0) -> Snapshot:
        ego = self.ego(t)
        c, s = np.cos(ego["yaw"]), np.sin(ego["yaw"])

        def to_lidar_xy(x, y):
            dx, dy = x - ego["x"], y - ego["y"]
            return c * dx + s * dy, -s * dx + c * dy

        vb, vvel, ok = self.vehicles_at(t)
        vx, vy = to_lidar_xy(vb[:, 0], vb[:, 1])
        keep_v = np.nonzero(ok & (np.hypot(vx, vy) < radius))[0]
        bx, by = to_lidar_xy(self.buildings[:, 0], self.buildings[:, 1])
        keep_b = np.nonzero(np.hypot(bx, by) < radius + 20)[0]
        boxes = np.concatenate([
            np.column_stack([vx, vy, vb[:, 2] - LIDAR_HEIGHT, vb[:, 3:6],
                             _wrap(vb[:, 6] - ego["yaw"])])[keep_v],
            np.column_stack([bx, by, self.buildings[:, 2] - LIDAR_HEIGHT,
                             self.buildings[:, 3:6],
                             _wrap(self.buildings[:, 6] - ego["yaw"])])[keep_b],
        ]).reshape(-1, 7)  # fmt: skip
        vel = np.column_stack([c * vvel[:, 0] + s * vvel[:, 1], -s * vvel[:, 0] + c * vvel[:, 1]])
        cx, cy = to_lidar_xy(self.cyls[:, 0], self.cyls[:, 1])
        keep_c = np.hypot(cx, cy) < radius
        cyls = np.column_stack([cx, cy, self.cyls[:, 2], self.cyls[:, 3] - LIDAR_HEIGHT,
                                self.cyls[:, 4] - LIDAR_HEIGHT])[keep_c]  # fmt: skip
        veh = [self.vehicles[i] for i in keep_v]
        return Snapshot(
            t=t, ego=ego, boxes=boxes, n_vehicles=len(keep_v), vehicle_ids=keep_v,
            vehicle_vel=vel[keep_v],
            box_intensity=np.concatenate([[v["intensity"] for v in veh],
                                          self.bld_intensity[keep_b]]),
            box_rgb=np.concatenate([np.array([v["rgb"] for v in veh]).reshape(-1, 3),
                                    self.bld_rgb[keep_b]]),
            box_ir=np.concatenate([[v["ir"] for v in veh], self.bld_ir[keep_b]]),
            cyls=cyls, cyl_intensity=self.cyl_intensity[keep_c], cyl_rgb=self.cyl_rgb[keep_c],
            cyl_ir=self.cyl_ir[keep_c],
        )  # fmt: skip

    def lidar_to_world(self, ego: dict, x, y):
        c, s = np.cos(ego["yaw"]), np.sin(ego["yaw"])
        return ego["x"] + c * x - s * y, ego["y"] + s * x + c * y


# --------------------------------------------------------------------------- ray casting
GROUND = -2
NO_HIT = -1


def raycast(origin, dirs, az, boxes, cyls, ground_z, max_range):
    """Cast rays from ``origin`` (3,) along unit ``dirs`` (E, A, 3), whose columns have azimuth
    ``az`` (A,). Returns range (E, A) (inf = no return) and what was hit: NO_HIT, GROUND, a box
    index k, or len(boxes) + cylinder index. Each object is tested only against the columns
    its azimuth span covers, vectorized over those rays."""
    origin = np.asarray(origin, np.float64)
    dz = dirs[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        rng_ = np.where(dz < -1e-6, (ground_z - origin[2]) / dz, np.inf)
    rng_[rng_ > max_range] = np.inf
    hit = np.where(np.isfinite(rng_), GROUND, NO_HIT).astype(np.int32)

    def columns(cx, cy, half):
        rx, ry = cx - origin[0], cy - origin[1]
        dist = np.hypot(rx, ry)
        if dist - half > max_range:
            return None
        if dist <= half * 1.01:
            return np.arange(len(az))
        rel = np.abs(_wrap(az - np.arctan2(ry, rx)))
        return np.nonzero(rel <= np.arcsin(min(half / dist, 1.0)) + 0.01)[0]

    for k, (bx, by, bz, ln, wd, ht, yaw) in enumerate(boxes):
        cols = columns(bx, by, 0.5 * np.hypot(ln, wd))
        if cols is None or len(cols) == 0:
            continue
        d = dirs[:, cols]
        c, s = np.cos(yaw), np.sin(yaw)
        o = origin - (bx, by, bz)
        lo_ = (c * o[0] + s * o[1], -s * o[0] + c * o[1], o[2])
        ld = (c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1], d[..., 2])
        tn = np.full(d.shape[:2], -np.inf)
        tf = np.full(d.shape[:2], np.inf)
        for oi, di, hi in zip(lo_, ld, (ln / 2, wd / 2, ht / 2), strict=True):
            di = np.where(np.abs(di) < 1e-9, 1e-9, di)
            t1, t2 = (-hi - oi) / di, (hi - oi) / di
            tn = np.maximum(tn, np.minimum(t1, t2))
            tf = np.minimum(tf, np.maximum(t1, t2))
        t = np.where((tf >= tn) & (tn > 0), tn, np.inf)
        sub = rng_[:, cols]
        better = t < sub
        rng_[:, cols] = np.where(better, t, sub)
        hit[:, cols] = np.where(better, k, hit[:, cols])

    nb = len(boxes)
    for j, (cx, cy, r, z0, z1) in enumerate(cyls):
        cols = columns(cx, cy, r)
        if cols is None or len(cols) == 0:
            continue
        d = dirs[:, cols]
        ox, oy = origin[0] - cx, origin[1] - cy
        a = d[..., 0] ** 2 + d[..., 1] ** 2
        b = 2 * (ox * d[..., 0] + oy * d[..., 1])
        disc = b * b - 4 * a * (ox * ox + oy * oy - r * r)
        with np.errstate(invalid="ignore", divide="ignore"):
            t = (-b - np.sqrt(disc)) / (2 * a)
        z = origin[2] + t * d[..., 2]
        t = np.where((disc > 0) & (t > 0) & (z >= z0) & (z <= z1), t, np.inf)
        sub = rng_[:, cols]
        better = t < sub
        rng_[:, cols] = np.where(better, t, sub)
        hit[:, cols] = np.where(better, nb + j, hit[:, cols])
    return rng_, hit


def _ray_grid(elev, az):
    ce = np.cos(elev)[:, None]
    return np.stack(np.broadcast_arrays(ce * np.cos(az), ce * np.sin(az),
                                        np.sin(elev)[:, None]), -1)  # fmt: skip


LIDAR_AZ = _wrap(np.pi - 2 * np.pi * np.arange(LIDAR_N_AZ) / LIDAR_N_AZ)  # clockwise from rear
LIDAR_DIRS = _ray_grid(LIDAR_ELEV, LIDAR_AZ)
RADAR_DIRS = _ray_grid(RADAR_ELEV, RADAR_AZ)


# --------------------------------------------------------------------------- sensors
def render_lidar(world: World, snap: Snapshot, rng: np.random.Generator):
    """One sweep → (PCD fields dict, points per vehicle index in the snapshot)."""
    r, hit = raycast(np.zeros(3), LIDAR_DIRS, LIDAR_AZ, snap.boxes, snap.cyls,
                     -LIDAR_HEIGHT, LIDAR_RANGE[1])  # fmt: skip
    keep = np.isfinite(r) & (r > LIDAR_RANGE[0]) & (rng.random(r.shape) > 0.04)
    r = np.where(keep, r, 0.0) + rng.normal(0.0, 0.015, r.shape)
    pts = LIDAR_DIRS * r[..., None]
    inten = np.zeros(r.shape, np.float32)
    g = keep & (hit == GROUND)
    gx, gy = world.lidar_to_world(snap.ego, pts[..., 0][g], pts[..., 1][g])
    inten[g] = MAT_INTENSITY[world.material(*world.road_coords(gx, gy, snap.ego))]
    nb = len(snap.boxes)
    isbox = keep & (hit >= 0) & (hit < nb)
    inten[isbox] = snap.box_intensity[hit[isbox]]
    iscyl = keep & (hit >= nb)
    inten[iscyl] = snap.cyl_intensity[hit[iscyl] - nb]
    inten = inten * rng.uniform(0.8, 1.2, r.shape) * np.exp(-r / 250.0)
    ring = np.broadcast_to(np.arange(32, dtype=np.uint16)[:, None], r.shape)
    tcol = np.arange(LIDAR_N_AZ, dtype=np.float32) * (LIDAR_PERIOD / LIDAR_N_AZ)
    tt = np.broadcast_to(tcol[None, :], r.shape)
    # firing order: azimuth by azimuth, all 32 lasers each
    kT, pT = keep.T, pts.transpose(1, 0, 2)
    sel = pT[kT]
    fields = {
        "x": sel[:, 0].astype(np.float32), "y": sel[:, 1].astype(np.float32),
        "z": sel[:, 2].astype(np.float32),
        "intensity": np.clip(np.round(inten.T[kT]), 0, 255).astype(np.float32),
        "ring": ring.T[kT], "time": tt.T[kT].astype(np.float32),
    }  # fmt: skip
    vh = hit[keep]
    counts = np.bincount(vh[(vh >= 0) & (vh < snap.n_vehicles)], minlength=snap.n_vehicles)
    return fields, counts


def render_radar(snap: Snapshot, rng: np.random.Generator):
    """Front radar targets → PCD fields x y z velocity (LiDAR frame; Doppler + = receding)."""
    r, hit = raycast(RADAR_ORIGIN, RADAR_DIRS, RADAR_AZ, snap.boxes, snap.cyls,
                     -LIDAR_HEIGHT, RADAR_RANGE)  # fmt: skip
    ei, ai = np.nonzero(np.isfinite(r) & (hit >= 0))
    h = hit[ei, ai]
    chosen = []
    for k in range(snap.n_vehicles):
        idx = np.nonzero(h == k)[0]
        if len(idx):
            dist = r[ei[idx[0]], ai[idx[0]]]
            n = int(np.clip(round(90.0 / max(dist, 5.0)), 2, 8))
            chosen.append(rng.choice(idx, min(n, len(idx)), replace=False))
    static = np.nonzero(h >= snap.n_vehicles)[0]
    if len(static):
        chosen.append(rng.choice(static, min(10, len(static)), replace=False))
    idx = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, int)
    rr = r[ei[idx], ai[idx]] + rng.normal(0, 0.12, len(idx))
    az = RADAR_AZ[ai[idx]] + np.radians(rng.normal(0, 0.3, len(idx)))
    el = RADAR_ELEV[ei[idx]]
    # clutter: ghost targets with the Doppler of the static world
    nc = int(rng.integers(3, 9))
    rr = np.concatenate([rr, rng.uniform(6, 80, nc)])
    az = np.concatenate([az, rng.uniform(RADAR_AZ[0], RADAR_AZ[-1], nc)])
    el = np.concatenate([el, np.zeros(nc)])
    u = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], 1)
    p = RADAR_ORIGIN + u * rr[:, None]
    v_radar = radar_velocity(snap.ego["v"], snap.ego["r"])
    vt = np.zeros((len(rr), 3))
    hv = np.concatenate([h[idx], np.full(nc, -1)])
    isv = (hv >= 0) & (hv < snap.n_vehicles)
    vt[isv, :2] = snap.vehicle_vel[hv[isv]]
    doppler = ((vt - v_radar) * u).sum(1)
    doppler += rng.normal(0, 0.08, len(rr)) + np.where(hv < 0, rng.normal(0, 0.3, len(rr)), 0)
    f32 = lambda a: np.asarray(a, np.float32)
    return {"x": f32(p[:, 0]), "y": f32(p[:, 1]), "z": f32(p[:, 2]), "velocity": f32(doppler)}


def radar_velocity(v: float, yaw_rate: float) -> np.ndarray:
    """Velocity of the radar (LiDAR frame) for an ego speed and yaw rate (planar motion)."""
    return np.array([v - yaw_rate * RADAR_ORIGIN[1], yaw_rate * RADAR_ORIGIN[0], 0.0])


def camera_model(extrinsic, intrinsic):
    t = np.asarray(extrinsic, np.float64).reshape(4, 4)
    k = np.asarray(intrinsic, np.float64).reshape(3, 3)
    return t, k


_BG_CACHE: dict = {}


def _background_rays(name, t, k, size, scale):
    key = (name, scale)
    if key not in _BG_CACHE:
        h, w = size[0] // scale, size[1] // scale
        v, u = np.mgrid[0:h, 0:w]
        uu, vv = (u + 0.5) * scale - 0.5, (v + 0.5) * scale - 0.5
        pix = np.stack([uu, vv, np.ones_like(uu)], -1).reshape(-1, 3)
        rays = (pix @ np.linalg.inv(k).T) @ t[:3, :3]  # camera → LiDAR frame (R^T)
        rays /= np.linalg.norm(rays, axis=1, keepdims=True)
        centre = -t[:3, :3].T @ t[:3, 3]
        _BG_CACHE[key] = (rays, centre, (h, w))
    return _BG_CACHE[key]


_FACES = {  # corner bits (ix, iy, iz) per face as [b0, b1, t1, t0]; outward normal (local)
    "front": ((1, 0, 0), (1, 1, 0), (1, 1, 1), (1, 0, 1), (1, 0, 0)),
    "rear": ((0, 1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 1), (-1, 0, 0)),
    "right": ((0, 0, 0), (1, 0, 0), (1, 0, 1), (0, 0, 1), (0, -1, 0)),
    "left": ((1, 1, 0), (0, 1, 0), (0, 1, 1), (1, 1, 1), (0, 1, 0)),
    "top": ((0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1), (0, 0, 1)),
}


def _clip_near(poly, near=0.4):
    """Sutherland–Hodgman against the camera plane z = near; poly (n, 3) camera coords."""
    out = []
    n = len(poly)
    for i in range(n):
        a, b = poly[i], poly[(i + 1) % n]
        ina, inb = a[2] >= near, b[2] >= near
        if ina:
            out.append(a)
        if ina != inb:
            out.append(a + (b - a) * ((near - a[2]) / (b[2] - a[2])))
    return np.array(out)


def render_camera(world: World, snap: Snapshot, cam: str, rng: np.random.Generator,
                  objects: bool = True) -> np.ndarray:  # fmt: skip
    """Render the front RGB (H, W, 3 uint8, RGB order) or thermal (H, W uint8) image."""
    thermal = cam == "ir"
    t, k = camera_model(*((IR_EXTRINSIC, IR_INTRINSIC) if thermal else
                          (FRONT_EXTRINSIC, FRONT_INTRINSIC)))  # fmt: skip
    size = IR_SIZE if thermal else RGB_SIZE
    rays, centre, (h, w) = _background_rays(cam, t, k, size, 4)
    sky_top, sky_hor, gain = world.light
    sky_top, sky_hor = np.array(sky_top, np.float32), np.array(sky_hor, np.float32)
    down = rays[:, 2] < -1e-4
    with np.errstate(divide="ignore"):
        dist = np.where(down, (-LIDAR_HEIGHT - centre[2]) / rays[:, 2], np.inf)
    ground = down & (dist < 400)
    gx = centre[0] + rays[ground, 0] * dist[ground]
    gy = centre[1] + rays[ground, 1] * dist[ground]
    wx, wy = world.lidar_to_world(snap.ego, gx, gy)
    mat = world.material(*world.road_coords(wx, wy, snap.ego))
    fog = np.exp(-dist[ground] / (150.0 if world.weather == "rain" else 350.0))[:, None]
    elev = np.clip(rays[:, 2], 0, 0.6)[:, None] / 0.6
    if thermal:
        bg = np.full((len(rays), 1), 18.0, np.float32) + 25 * (1 - elev) ** 4
        bg[ground] = MAT_IR[mat][:, None] * fog + 40.0 * (1 - fog)
    else:
        bg = sky_hor + (sky_top - sky_hor) * np.sqrt(elev)
        bg[ground] = MAT_RGB[mat] * gain * fog + sky_hor * (1 - fog)
    bg = np.clip(bg, 0, 255).astype(np.uint8).reshape(h, w, -1)
    img = cv2.resize(bg, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    if img.ndim == 2:
        img = img[..., None]
    img = np.ascontiguousarray(img)
    if objects:
        _draw_objects(img, snap, t, k, thermal, gain, size)
    if thermal:
        img = cv2.GaussianBlur(img, (5, 5), 1.2)
    return _add_noise(img.reshape(size[0], size[1], -1), rng, 4 if thermal else 3)


_NOISE: dict = {}


def _add_noise(img: np.ndarray, rng: np.random.Generator, sigma: int) -> np.ndarray:
    """Sensor noise: a window of a fixed noise bank at a per-frame offset (saturating adds)."""
    hh, ww, c = img.shape
    key = (hh, ww, c, sigma)
    if key not in _NOISE:
        bank = np.round(_rng(2026, hh, ww, c).normal(0, sigma, (hh + 64, ww + 64, c)))
        _NOISE[key] = (np.clip(bank, 0, 255).astype(np.uint8),
                       np.clip(-bank, 0, 255).astype(np.uint8))  # fmt: skip
    pos, neg = _NOISE[key]
    oy, ox = (int(v) for v in rng.integers(0, 64, 2))
    out = cv2.add(img, pos[oy : oy + hh, ox : ox + ww])
    out = cv2.subtract(out.reshape(hh, ww, c), neg[oy : oy + hh, ox : ox + ww])
    out = out.reshape(hh, ww, c)
    return out[..., 0] if c == 1 else out


_CORNER_BITS = np.array([(i, j, m) for i in (0, 1) for j in (0, 1) for m in (0, 1)], float)


def _draw_objects(img, snap: Snapshot, t, k, thermal, gain, size):
    cyl_boxes = np.column_stack([snap.cyls[:, 0], snap.cyls[:, 1],
                                 (snap.cyls[:, 3] + snap.cyls[:, 4]) / 2, 2 * snap.cyls[:, 2],
                                 2 * snap.cyls[:, 2], snap.cyls[:, 4] - snap.cyls[:, 3],
                                 np.zeros(len(snap.cyls))])  # fmt: skip
    items = np.concatenate([snap.boxes, cyl_boxes]).reshape(-1, 7)
    nb = len(snap.boxes)
    if len(items) == 0:
        return
    rot, tr = t[:3, :3], t[:3, 3]
    # cull what the camera cannot see: all corners behind it, or projected off the image
    c, s = np.cos(items[:, 6]), np.sin(items[:, 6])
    loc = (_CORNER_BITS[None] * 2 - 1) * items[:, None, 3:6] / 2  # (N, 8, 3)
    wx = c[:, None] * loc[..., 0] - s[:, None] * loc[..., 1] + items[:, None, 0]
    wy = s[:, None] * loc[..., 0] + c[:, None] * loc[..., 1] + items[:, None, 1]
    wz = loc[..., 2] + items[:, None, 2]
    pc = np.stack([wx, wy, wz], -1) @ rot.T + tr
    z = pc[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = k[0, 0] * pc[..., 0] / z + k[0, 2]
        v = k[1, 1] * pc[..., 1] / z + k[1, 2]
    allfront = (z > 0.4).all(1)
    off = allfront & ((u.max(1) < 0) | (u.min(1) > size[1]) | (v.max(1) < 0)
                      | (v.min(1) > size[0]))  # fmt: skip
    visible = (z > 0.4).any(1) & ~off
    dist = np.hypot(items[:, 0], items[:, 1])
    light = np.array([0.3, 0.5, 0.8])
    light /= np.linalg.norm(light)
    for i in sorted(np.nonzero(visible)[0], key=lambda i: -dist[i]):  # far first (painter's)
        bx, by, bz, ln, wd, ht, yaw = items[i]
        ci, si = c[i], s[i]
        rz = np.array([[ci, -si, 0], [si, ci, 0], [0, 0, 1]])
        if i < nb:
            base = snap.box_ir[i] if thermal else snap.box_rgb[i]
        else:
            base = snap.cyl_ir[i - nb] if thermal else snap.cyl_rgb[i - nb]
        vehicle = i < snap.n_vehicles
        half = np.array([ln, wd, ht]) / 2
        for name, (*corners, normal) in _FACES.items():
            pw = ((np.array(corners) * 2 - 1) * half) @ rz.T + (bx, by, bz)
            nw = rz @ np.array(normal, float)
            pcf = pw @ rot.T + tr
            if (rot @ nw) @ (pcf[0] + pcf[2]) >= 0:
                continue  # back face
            if thermal:
                col = np.array([base * (1.05 if name == "front" and vehicle else 1.0)])
            else:
                lit = max(gain, 0.55) if vehicle else gain  # street lights on the cars at night
                col = base * lit * (0.55 + 0.45 * max(0.0, float(nw @ light)))
            _fill(img, pcf, k, col)
            if vehicle and name != "top":
                _vehicle_details(img, pcf, k, name, thermal, gain, ht > 2.8)


def _quad(pc, a0, a1, h0, h1):
    b0, b1, t0 = pc[0], pc[1], pc[3]
    return np.array([b0 + a * (b1 - b0) + hh * (t0 - b0)
                     for a, hh in ((a0, h0), (a1, h0), (a1, h1), (a0, h1))])  # fmt: skip


def _vehicle_details(img, pc, k, face, thermal, gain, truck):
    if thermal:
        _fill(img, pc, k, np.array([238.0]), quad=(0.0, 1.0, 0.0, 0.3))
        _fill(img, pc, k, np.array([125.0]), quad=(0.12, 0.88, 0.55, 0.85))
        return
    if not truck or face == "front":
        _fill(img, pc, k, np.array([35.0, 45.0, 60.0]) * max(gain, 0.5),
              quad=(0.1, 0.9, 0.55, 0.88))  # fmt: skip
    if face in ("rear", "front"):
        lamp = np.array([230.0, 20, 20]) if face == "rear" else np.array([245.0, 240, 215])
        for a0 in (0.04, 0.8):
            _fill(img, pc, k, lamp, quad=(a0, a0 + 0.16, 0.3, 0.42))


def _fill(img, pc, k, colour, quad=None):
    if quad is not None:
        pc = _quad(pc, *quad)
    poly = _clip_near(pc)
    if len(poly) < 3:
        return
    uv = poly[:, :2] / poly[:, 2:3] * (k[0, 0], k[1, 1]) + (k[0, 2], k[1, 2])
    uv = np.clip(uv, -1e5, 1e5)
    pts = np.round(uv * 16).astype(np.int32)
    cv2.fillPoly(img, [pts], [float(x) for x in colour], lineType=cv2.LINE_AA, shift=4)


def encode_jpeg(img: np.ndarray, quality: int = 92) -> bytes:
    bgr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def imu_sample(world: World, t: float, rng: np.random.Generator, bias: np.ndarray):
    """Gyro (rad/s) and specific force (m/s², z up, +g at rest) in the vehicle frame."""
    e = world.ego(t)
    gyro = np.array([0.0, 0.0, e["r"]]) + bias[:3] + rng.normal(0, [0.012, 0.012, 0.004])
    acc = np.array([e["a"], e["v"] * e["r"], G]) + bias[3:] + rng.normal(0, 0.12, 3)
    return gyro, acc


def gps_sample(world: World, t: float, rng: np.random.Generator, origin):
    e = world.ego(t)
    east, north = e["x"] + rng.normal(0, 0.08), e["y"] + rng.normal(0, 0.08)
    lat, lon, alt = enu_to_geodetic(east, north, rng.normal(0, 0.3), *origin)
    return float(lat), float(lon), float(alt)


def label_boxes(world: World, snap: Snapshot, counts: np.ndarray, min_points: int = 4):
    out = []
    for i in range(snap.n_vehicles):
        b = snap.boxes[i]
        if counts[i] < min_points or np.hypot(b[0], b[1]) > 80:
            continue
        sp = world.vehicles[snap.vehicle_ids[i]]
        out.append({
            "obj_id": sp["obj_id"], "obj_type": sp["obj_type"],
            "psr": {
                "position": {"x": float(b[0]), "y": float(b[1]), "z": float(b[2])},
                "rotation": {"x": 0, "y": 0, "z": float(b[6])},
                "scale": {"x": float(b[3]), "y": float(b[4]), "z": float(b[5])},
            },
        })  # fmt: skip
    return out


def labelled(i: int) -> bool:
    """Labels on about two thirds of the sweeps, in blocks (like an annotation campaign)."""
    return (i // 10) % 3 != 2


# --------------------------------------------------------------------------- ground truth
def _truth_common(world: World, drive_id, fmt, seed, clock0, t_end, origin, path):
    grid = np.arange(0.0, t_end + 1e-9, 0.05)
    ego = {"t": [], "east": [], "north": [], "yaw": [], "speed": [], "yaw_rate": [], "accel": []}
    tracks = {sp["obj_id"]: {"t": [], "east": [], "north": [], "yaw": [], "vx": [], "vy": []}
              for sp in world.vehicles}  # fmt: skip
    for tt in grid:
        e = world.ego(tt)
        for key, val in (("t", clock0 + tt), ("east", e["x"]), ("north", e["y"]),
                         ("yaw", _wrap(e["yaw"])), ("speed", e["v"]), ("yaw_rate", e["r"]),
                         ("accel", e["a"])):  # fmt: skip
            ego[key].append(round(float(val), 6))
        boxes, vel, ok = world.vehicles_at(tt)
        for sp, b, v, o in zip(world.vehicles, boxes, vel, ok, strict=True):
            if not o:
                continue
            tr = tracks[sp["obj_id"]]
            for key, val in (("t", clock0 + tt), ("east", b[0]), ("north", b[1]),
                             ("yaw", b[6]), ("vx", v[0]), ("vy", v[1])):  # fmt: skip
                tr[key].append(round(float(val), 6))
    return {
        "drive_id": drive_id, "format": fmt, "path": path, "seed": seed,
        "clock_start_s": clock0,
        "origin": {"lat": origin[0], "lon": origin[1], "alt": origin[2]},
        "frames": {"vehicle": "LiDAR frame: x forward, y left, z up",
                   "lidar_height_m": LIDAR_HEIGHT, "world": "ENU metres from origin",
                   "radar_origin_in_lidar": RADAR_ORIGIN.tolist(),
                   "doppler": "radial velocity, positive = receding"},
        "ego": ego,
        "objects": [{"obj_id": sp["obj_id"], "obj_type": sp["obj_type"],
                     "size": [round(x, 4) for x in sp["size"]], "lane_offset": sp["lane"],
                     "track": tracks[sp["obj_id"]]} for sp in world.vehicles],
        "calib": {"rgb_extrinsic": FRONT_EXTRINSIC, "rgb_intrinsic": FRONT_INTRINSIC,
                  "ir_extrinsic": IR_EXTRINSIC, "ir_intrinsic": IR_INTRINSIC},
    }  # fmt: skip


def _write_truth(out: Path, drive_id: str, truth: dict) -> None:
    p = out / "_truth" / f"{drive_id}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(truth, indent=1))


def _drive_setup(seed, fmt, index, duration):
    rng = _rng(seed, FMT_CODE[fmt], index, STREAM_CODE["world"])
    world = World(rng, duration)
    tod, weather = CONDITIONS[(index + seed + (fmt == "bag")) % len(CONDITIONS)]
    world.light, world.weather, world.tod = LIGHT[tod], weather, tod
    dlat, dlon = rng.uniform(-0.02, 0.02, 2)
    origin = (round(ORIGIN_LAT + dlat, 6), round(ORIGIN_LON + dlon, 6), ORIGIN_ALT)
    return world, origin, tod, weather


def world_from_truth(truth: dict) -> World:
    """Rebuild the world a drive was rendered from (for tests and debugging)."""
    g = truth["generator"]
    return _drive_setup(g["seed"], g["form"], g["index"], g["world_duration"])[0]


# --------------------------------------------------------------------------- scene form
def write_calibration(calib: Path) -> None:
    """``calib/camera/{front,ir}.json`` (LiDAR→camera extrinsic, intrinsic) and
    ``calib/radar/front_points.json`` (zeros: the radar targets are given in the LiDAR frame)."""
    (calib / "camera").mkdir(parents=True, exist_ok=True)
    (calib / "radar").mkdir(parents=True, exist_ok=True)
    for name, ext, intr in (
        ("front", FRONT_EXTRINSIC, FRONT_INTRINSIC),
        ("ir", IR_EXTRINSIC, IR_INTRINSIC),
    ):
        (calib / "camera" / f"{name}.json").write_text(
            json.dumps({"extrinsic": ext, "intrinsic": intr}, indent=4)
        )
    zeros = {"translation": [0, 0, 0], "coordinatesOffset": [0, 0, 0], "rotation": [0, 0, 0]}
    (calib / "radar" / "front_points.json").write_text(json.dumps(zeros, indent=4))


def write_scene_drive(out: Path, index: int, frames: int, seed: int) -> dict:
    rng = _rng(seed, FMT_CODE["scene"], index, STREAM_CODE["sched"])
    # frame slots at ~100.3 ms with ±1 ms jitter; a few slots dropped (gaps in timestamp.txt)
    n_drop = max(1, round(0.03 * frames)) if frames >= 10 else 0
    slots = np.arange(frames + n_drop + 1)
    drop = rng.choice(np.arange(2, len(slots) - 1), n_drop, replace=False)
    slots = np.setdiff1d(slots, drop)[:frames]
    start_ms = int(rng.integers(900_000_000, 950_000_000))
    stamps_ms = start_ms + np.round(slots * 100.3 + rng.uniform(-1.0, 1.0, frames)).astype(np.int64)
    stamps_ms[0] = start_ms
    times = (stamps_ms - start_ms) / 1000.0
    world, origin, tod, weather = _drive_setup(seed, "scene", index, float(times[-1]) + 1.0)
    drive_id = f"drive_{tod}_{weather}_{index}/drive_{tod}_{index + 1}"
    root = out / drive_id
    if root.exists():
        shutil.rmtree(root)
    subdirs = ("lidar", "camera/front", "camera/ir", "radar/front_points", "Gps_Imu/data", "label")
    dirs = {n: root / n for n in subdirs}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    (root / "Gps_Imu" / "dataformat.txt").write_text(DATAFORMAT)
    (dirs["Gps_Imu/data"] / "timestamp.txt").write_text("".join(f"{s}\n" for s in stamps_ms))
    write_calibration(root / "calib")
    bias = _rng(seed, FMT_CODE["scene"], index, STREAM_CODE["imu"]).normal(
        0, [0.01, 0.01, 0.003, 0.05, 0.05, 0.05]
    )
    n_labels = 0
    for i, t in enumerate(times):
        snap = world.snapshot(float(t))
        r = lambda code: _rng(seed, FMT_CODE["scene"], index, code, i)  # noqa: B023
        fields, counts = render_lidar(world, snap, r(STREAM_CODE["lidar"]))
        write_pcd(dirs["lidar"] / f"{i:08d}.pcd", fields, encoding="binary")
        write_pcd(
            dirs["radar/front_points"] / f"{i:08d}.pcd",
            render_radar(snap, r(STREAM_CODE["radar"])),
            encoding="binary",
        )
        (dirs["camera/front"] / f"{i:08d}.jpg").write_bytes(
            encode_jpeg(render_camera(world, snap, "rgb", r(STREAM_CODE["rgb"])))
        )
        (dirs["camera/ir"] / f"{i:08d}.jpg").write_bytes(
            encode_jpeg(render_camera(world, snap, "ir", r(STREAM_CODE["ir"])))
        )
        g = r(STREAM_CODE["gps"])
        lat, lon, _ = gps_sample(world, float(t), g, origin)
        gyro, acc = imu_sample(world, float(t), g, bias)
        acc_g = acc / G * np.array([1.0, 1.0, -1.0])  # the CMHT unit reads -1 G on z at rest
        lines = [degrees_to_nmea(lat), degrees_to_nmea(lon)]
        lines += [repr(float(x)) for x in gyro] + [f"{x:.6f}" for x in acc_g]
        (dirs["Gps_Imu/data"] / f"{i:08d}.txt").write_text("\n".join(lines) + "\n")
        if labelled(i):
            (dirs["label"] / f"{i:08d}.json").write_text(
                json.dumps(label_boxes(world, snap, counts), indent=2)
            )
            n_labels += 1
    clock0 = start_ms / 1000.0
    truth = _truth_common(world, drive_id, "scene", seed, clock0, float(times[-1]), origin,
                          drive_id)  # fmt: skip
    st = [float(x) for x in stamps_ms / 1000.0]
    truth["streams"] = {m: {"times": st, "dropped": int(n_drop)}
                        for m in ("lidar", "radar", "rgb", "ir", "gps", "imu")}  # fmt: skip
    truth["dropped_slots"] = sorted(int(x) for x in drop)
    truth["imu_convention"] = "accel in G, z reads -1 G at rest (as the real CMHT files)"
    truth["labelled_frames"] = [i for i in range(frames) if labelled(i)]
    truth["generator"] = {"form": "scene", "index": index, "seed": seed,
                          "world_duration": world.duration}  # fmt: skip
    _write_truth(out, drive_id, truth)
    return {"drive_id": drive_id, "frames": frames, "labels": n_labels, "dropped": int(n_drop)}


# --------------------------------------------------------------------------- bag form
BAG_STREAMS = {  # topic, rate (Hz), stamp jitter (s), transport latency (s), drop probability
    "lidar": ("/velodyne_points", 10.0, 0.0005, 0.012, 0.02),
    "radar": ("/radar/points", 20.0, 0.002, 0.008, 0.03),
    "rgb": ("/camera/front/image_raw/compressed", 15.0, 0.002, 0.030, 0.02),
    "ir": ("/thermal/image_raw", 8.7, 0.003, 0.020, 0.03),
    "gps": ("/gps/fix", 5.0, 0.001, 0.050, 0.02),
    "imu": ("/imu/data", 100.0, 0.0003, 0.002, 0.005),
}
MSGTYPES = {
    "lidar": "sensor_msgs/msg/PointCloud2", "radar": "sensor_msgs/msg/PointCloud2",
    "rgb": "sensor_msgs/msg/CompressedImage", "ir": "sensor_msgs/msg/Image",
    "gps": "sensor_msgs/msg/NavSatFix", "imu": "sensor_msgs/msg/Imu",
    "rgb_info": "sensor_msgs/msg/CameraInfo", "ir_info": "sensor_msgs/msg/CameraInfo",
    "tf": "tf2_msgs/msg/TFMessage",
}  # fmt: skip
FRAME_IDS = {"lidar": "velodyne", "radar": "radar_front", "rgb": "camera_front",
             "ir": "thermal", "gps": "gps", "imu": "imu_link"}  # fmt: skip


def _schedule(rng, rate, jitter, latency, drop_p, duration):
    period = 1.0 / rate
    phase = rng.uniform(0, period)
    n = int((duration - phase) / period) + 1
    k = np.arange(n)
    t = phase + k * period * (1 + rng.uniform(-2e-4, 2e-4)) + rng.normal(0, jitter, n)
    t = np.maximum.accumulate(np.clip(t, 0, duration))
    t = t[np.concatenate([[True], np.diff(t) > period * 0.3])]
    keep = rng.random(len(t)) > drop_p
    if len(t) >= 20 and keep.all():
        keep[rng.integers(1, len(t) - 1)] = False
    keep[0] = True
    dropped = int((~keep).sum())
    t = t[keep]
    log = t + latency * (1 + 0.3 * np.abs(rng.normal(size=len(t))))
    log = np.maximum.accumulate(log)
    return t, log, dropped


class _Msgs:
    """Builds rosbags message objects for a ROS 2 or ROS 1 type store."""

    def __init__(self, ros1: bool):
        from rosbags.typesys import Stores, get_typestore

        self.ros1 = ros1
        self.ts = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)
        if "tf2_msgs/msg/TFMessage" not in self.ts.types:  # the ROS 1 store lacks it
            from rosbags.typesys import get_types_from_msg

            self.ts.register(
                get_types_from_msg(
                    "geometry_msgs/TransformStamped[] transforms", "tf2_msgs/msg/TFMessage"
                )
            )
        self.T = self.ts.types
        self.seq = 0

    def serialize(self, msg) -> bytes:
        f = self.ts.serialize_ros1 if self.ros1 else self.ts.serialize_cdr
        return bytes(f(msg, msg.__msgtype__))

    def header(self, ns: int, frame_id: str):
        stamp = self.T["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)
        if self.ros1:
            self.seq += 1
            return self.T["std_msgs/msg/Header"](seq=self.seq, stamp=stamp, frame_id=frame_id)
        return self.T["std_msgs/msg/Header"](stamp=stamp, frame_id=frame_id)

    def cloud(self, ns, frame_id, fields: dict):
        pf = self.T["sensor_msgs/msg/PointField"]
        dt = np.dtype([(k, v.dtype) for k, v in fields.items()])
        rec = np.empty(len(next(iter(fields.values()))), dt)
        for k, v in fields.items():
            rec[k] = v
        code = {("f", 4): 7, ("f", 8): 8, ("u", 2): 4, ("u", 1): 2, ("i", 4): 5, ("u", 4): 6}
        pfs = [pf(name=k, offset=dt.fields[k][1], datatype=code[(v.dtype.kind, v.itemsize)],
                  count=1) for k, v in fields.items()]  # fmt: skip
        return self.T["sensor_msgs/msg/PointCloud2"](
            header=self.header(ns, frame_id), height=1, width=len(rec), fields=pfs,
            is_bigendian=False, point_step=dt.itemsize, row_step=dt.itemsize * len(rec),
            data=np.frombuffer(rec.tobytes(), np.uint8), is_dense=True)  # fmt: skip

    def compressed(self, ns, frame_id, jpeg: bytes):
        return self.T["sensor_msgs/msg/CompressedImage"](
            header=self.header(ns, frame_id),
            format="rgb8; jpeg compressed bgr8",
            data=np.frombuffer(jpeg, np.uint8),
        )

    def mono8(self, ns, frame_id, img: np.ndarray):
        return self.T["sensor_msgs/msg/Image"](
            header=self.header(ns, frame_id),
            height=img.shape[0],
            width=img.shape[1],
            encoding="mono8",
            is_bigendian=0,
            step=img.shape[1],
            data=np.ascontiguousarray(img).reshape(-1),
        )

    def navsat(self, ns, lat, lon, alt):
        status = self.T["sensor_msgs/msg/NavSatStatus"](status=0, service=1)
        return self.T["sensor_msgs/msg/NavSatFix"](
            header=self.header(ns, FRAME_IDS["gps"]),
            status=status,
            latitude=lat,
            longitude=lon,
            altitude=alt,
            position_covariance=np.diag([0.04, 0.04, 0.25]).ravel(),
            position_covariance_type=2,
        )

    def imu(self, ns, yaw, gyro, acc):
        v3 = self.T["geometry_msgs/msg/Vector3"]
        q = self.T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=float(np.sin(yaw / 2)),
                                                   w=float(np.cos(yaw / 2)))  # fmt: skip
        cov = lambda s: np.diag([s, s, s]).ravel().astype(np.float64)
        return self.T["sensor_msgs/msg/Imu"](
            header=self.header(ns, FRAME_IDS["imu"]), orientation=q,
            orientation_covariance=cov(1e-3), angular_velocity=v3(x=gyro[0], y=gyro[1],
                                                                  z=gyro[2]),
            angular_velocity_covariance=cov(2e-4), linear_acceleration=v3(x=acc[0], y=acc[1],
                                                                          z=acc[2]),
            linear_acceleration_covariance=cov(1.5e-2))  # fmt: skip

    def camera_info(self, ns, frame_id, size, intrinsic):
        k = np.asarray(intrinsic, np.float64)
        p = np.array([k[0], 0, k[2], 0, 0, k[4], k[5], 0, 0, 0, 1, 0], np.float64)
        roi = self.T["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0,
                                                         width=0, do_rectify=False)  # fmt: skip
        kw = dict(header=self.header(ns, frame_id), height=size[0], width=size[1],
                  distortion_model="plumb_bob", binning_x=0, binning_y=0, roi=roi)  # fmt: skip
        mats = {"d": np.zeros(5), "k": k, "r": np.eye(3).ravel(), "p": p}
        kw.update({(n.upper() if self.ros1 else n): v for n, v in mats.items()})
        return self.T["sensor_msgs/msg/CameraInfo"](**kw)

    def tf_static(self, ns):
        tfs = []
        for child, ext in (("camera_front", FRONT_EXTRINSIC), ("thermal", IR_EXTRINSIC),
                           ("radar_front", None)):  # fmt: skip
            if ext is None:
                pose = np.eye(4)
            else:
                pose = np.linalg.inv(np.asarray(ext).reshape(4, 4))  # camera pose in LiDAR frame
            q = _quaternion(pose[:3, :3])
            tfs.append(
                self.T["geometry_msgs/msg/TransformStamped"](
                    header=self.header(ns, "velodyne"),
                    child_frame_id=child,
                    transform=self.T["geometry_msgs/msg/Transform"](
                        translation=self.T["geometry_msgs/msg/Vector3"](*map(float, pose[:3, 3])),
                        rotation=self.T["geometry_msgs/msg/Quaternion"](*map(float, q)),
                    ),
                )
            )
        return self.T["tf2_msgs/msg/TFMessage"](transforms=tfs)


def _quaternion(r: np.ndarray):
    """Rotation matrix → (x, y, z, w)."""
    w = np.sqrt(max(0.0, 1 + r[0, 0] + r[1, 1] + r[2, 2])) / 2
    x = np.copysign(np.sqrt(max(0.0, 1 + r[0, 0] - r[1, 1] - r[2, 2])) / 2, r[2, 1] - r[1, 2])
    y = np.copysign(np.sqrt(max(0.0, 1 - r[0, 0] + r[1, 1] - r[2, 2])) / 2, r[0, 2] - r[2, 0])
    z = np.copysign(np.sqrt(max(0.0, 1 - r[0, 0] - r[1, 1] + r[2, 2])) / 2, r[1, 0] - r[0, 1])
    return x, y, z, w


def write_bag_drive(out: Path, index: int, frames: int, seed: int,
                    storage: str = "sqlite3") -> dict:  # fmt: skip
    duration = frames * LIDAR_PERIOD
    world, origin, tod, weather = _drive_setup(seed, "bag", index, duration + 1.0)
    srng = _rng(seed, FMT_CODE["bag"], index, STREAM_CODE["sched"])
    clock0 = 1_700_000_000 + int(srng.integers(0, 30_000_000)) + round(srng.uniform(0, 1), 3)
    sched = {m: _schedule(srng, *BAG_STREAMS[m][1:], duration) for m in BAG_STREAMS}
    ros1 = storage == "ros1"
    name = f"drive_{tod}_{weather}_{index}"
    drive_id = f"{name}.bag" if ros1 else f"rosbag2_{name}"
    path = out / drive_id
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    calib = out / f"{path.stem if ros1 else path.name}_calib"  # what etl.bag looks for
    if calib.exists():
        shutil.rmtree(calib)
    write_calibration(calib)
    msgs = _Msgs(ros1)
    ns_of = lambda t: int(round((clock0 + t) * 1e9))
    events = []  # (log ns, order, stream, index)
    for order, m in enumerate(BAG_STREAMS):
        t, log, _ = sched[m]
        events += [(ns_of(lg), order, m, i) for i, lg in enumerate(log)]
    events.sort()
    bias = _rng(seed, FMT_CODE["bag"], index, STREAM_CODE["imu"]).normal(
        0, [0.01, 0.01, 0.003, 0.4, 0.4, 0.4]
    )

    if ros1:
        from rosbags.rosbag1 import Writer as W1

        writer = W1(path)
    else:
        from rosbags.rosbag2 import StoragePlugin, Writer

        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        writer = Writer(path, version=9, storage_plugin=plugin)
    with writer:
        conns = {}
        topics = {m: BAG_STREAMS[m][0] for m in BAG_STREAMS}
        topics.update(rgb_info="/camera/front/camera_info", ir_info="/thermal/camera_info",
                      tf="/tf_static")  # fmt: skip
        for key, topic in topics.items():
            conns[key] = writer.add_connection(topic, MSGTYPES[key], typestore=msgs.ts)
        first = events[0][0] - 1_000_000
        writer.write(conns["tf"], first, msgs.serialize(msgs.tf_static(first)))
        for log_ns, _, m, i in events:
            t = float(sched[m][0][i])
            ns = ns_of(t)
            r = _rng(seed, FMT_CODE["bag"], index, STREAM_CODE[m], i)
            if m in ("lidar", "radar", "rgb", "ir"):
                snap = world.snapshot(t)
            if m == "lidar":
                msg = msgs.cloud(ns, FRAME_IDS[m], render_lidar(world, snap, r)[0])
            elif m == "radar":
                msg = msgs.cloud(ns, FRAME_IDS[m], render_radar(snap, r))
            elif m == "rgb":
                msg = msgs.compressed(ns, FRAME_IDS[m], encode_jpeg(
                    render_camera(world, snap, "rgb", r)))  # fmt: skip
                writer.write(
                    conns["rgb_info"],
                    log_ns,
                    msgs.serialize(msgs.camera_info(ns, FRAME_IDS[m], RGB_SIZE, FRONT_INTRINSIC)),
                )
            elif m == "ir":
                msg = msgs.mono8(ns, FRAME_IDS[m], render_camera(world, snap, "ir", r))
                writer.write(
                    conns["ir_info"],
                    log_ns,
                    msgs.serialize(msgs.camera_info(ns, FRAME_IDS[m], IR_SIZE, IR_INTRINSIC)),
                )
            elif m == "gps":
                msg = msgs.navsat(ns, *gps_sample(world, t, r, origin))
            else:
                gyro, acc = imu_sample(world, t, r, bias)
                msg = msgs.imu(ns, world.ego(t)["yaw"], gyro, acc)
            writer.write(conns[m], log_ns, msgs.serialize(msg))

    truth = _truth_common(world, drive_id, "bag", seed, clock0, duration, origin, drive_id)
    truth["streams"] = {
        m: {"topic": BAG_STREAMS[m][0], "rate_hz": BAG_STREAMS[m][1],
            "times": [ns_of(float(x)) / 1e9 for x in sched[m][0]],
            "log_times": [ns_of(float(x)) / 1e9 for x in sched[m][1]],
            "dropped": sched[m][2]}
        for m in BAG_STREAMS
    }  # fmt: skip
    truth["imu_convention"] = "sensor_msgs/Imu, m/s², z reads +g at rest (REP 145)"
    truth["generator"] = {"form": "bag", "index": index, "seed": seed,
                          "world_duration": world.duration}  # fmt: skip
    truth["time_base"] = "header.stamp (s); the bag's log time is later by the transport latency"
    _write_truth(out, drive_id, truth)
    counts = {m: len(sched[m][0]) for m in BAG_STREAMS}
    return {
        "drive_id": drive_id,
        "frames": counts["lidar"],
        "messages": counts,
        "dropped": {m: sched[m][2] for m in BAG_STREAMS},
    }


# --------------------------------------------------------------------------- CLI
def _write_job(out: Path, form: str, index: int, frames: int, seed: int, storage: str) -> dict:
    """One drive written (a process of its own under ``generate(workers > 1)``)."""
    t0 = time.perf_counter()
    if form == "scene":
        s = write_scene_drive(out, index, frames, seed)
    else:
        s = write_bag_drive(out, index, frames, seed, storage)
    s["seconds"] = round(time.perf_counter() - t0, 2)
    return s


def generate(out, drives: int = 2, frames: int = 60, fmt: str = "both", seed: int = 0,
             storage: str = "sqlite3", verbose: bool = True, workers: int = 1) -> list[dict]:
    """Write ``drives`` drives of each requested form under ``out``; returns their summaries.
    ``workers`` > 1: that many drives at a time, each in a process of its own (every drive is
    seeded by its own index, so the files are the same bytes as one process writes)."""
    if fmt not in ("scene", "bag", "both"):
        raise ValueError(f"format must be scene, bag or both, not {fmt!r}")
    if storage not in ("sqlite3", "mcap", "ros1"):
        raise ValueError(f"storage must be sqlite3, mcap or ros1, not {storage!r}")
    if frames < 2 or drives < 1 or workers < 1:
        raise ValueError("need at least 1 drive, 2 frames and 1 worker")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [("scene", i) for i in range(drives) if fmt in ("scene", "both")]
    jobs += [("bag", i) for i in range(drives) if fmt in ("bag", "both")]
    args = [(out, form, i, frames, seed, storage) for form, i in jobs]
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: the caller (rl.study) may have started JAX's threads
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx)
        results = (f.result() for f in [pool.submit(_write_job, *a) for a in args])
    else:
        pool, results = None, (_write_job(*a) for a in args)
    summaries = []
    try:
        for n, ((form, _), s) in enumerate(zip(jobs, results, strict=True), 1):
            summaries.append(s)
            if verbose:
                print(f"[{n}/{len(jobs)}] {form:5s} {s['drive_id']}: {s['frames']} sweeps, "
                      f"dropped {s['dropped']}, {s['seconds']:.1f} s", file=sys.stderr)  # fmt: skip
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return summaries


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m etl.synth", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (e.g. cmht_raw)")
    p.add_argument("--drives", type=int, default=2, help="drives per form (default 2)")
    p.add_argument("--frames", type=int, default=60, help="LiDAR sweeps per drive (default 60)")
    p.add_argument("--format", choices=("scene", "bag", "both"), default="both")
    p.add_argument(
        "--storage",
        choices=("sqlite3", "mcap", "ros1"),
        default="sqlite3",
        help="bag storage: ROS 2 sqlite3 (.db3), ROS 2 mcap, or a ROS 1 .bag",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1,
                   help="drives written at a time, each in its own process (same bytes)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        generate(a.out, a.drives, a.frames, a.format, a.seed, a.storage, workers=a.workers)
    except (ValueError, OSError) as e:
        print(f"etl.synth: error: {e}", file=sys.stderr)
        return 2
    print(f"etl.synth: wrote {a.out} in {time.perf_counter() - t0:.1f} s "
          f"(ground truth in {Path(a.out) / '_truth'})", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
