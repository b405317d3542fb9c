"""What a raw-data reader hands to the build: one drive as time-stamped streams.

Both raw forms (scene folders: :mod:`etl.scene`; ROS bags: :mod:`etl.bag`) produce a
:class:`Drive`. The build (:mod:`etl.build`) never looks at files itself: it synchronizes
the streams' times to the LiDAR clock and calls ``Stream.load(i)`` for the frames it needs.

Conventions
- Times are float64 seconds on one clock per drive, strictly increasing within a stream
  (readers drop duplicates and out-of-order stamps, warning once with the count).
- ``Stream.load(i)`` returns raw sensor data in the sensor's own frame:
  lidar → float32 (N, 4) x y z intensity; radar → float32 (N, 4) x y z doppler_velocity;
  rgb → uint8 (H, W, 3) in RGB order; ir → uint8/uint16 (H, W).
  It raises :class:`etl.errors.FrameError` (file or message, reason) for a bad frame.
- GPS values are (N, 3) latitude, longitude (decimal degrees), altitude (m, 0 if unknown);
  IMU values are (N, 6) gyro x y z (rad/s), accel x y z (m/s²) — SI already.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class DiscoveryWarning(UserWarning):
    """A folder reached twice while searching for drives (through a symbolic link), skipped."""


def walk(src) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(src)`` that follows symbolic links (drives often sit behind one) and enters
    each real folder once: a folder whose real path was already visited (a second link to it,
    a link back up the tree) is skipped with a :class:`DiscoveryWarning` naming both paths.
    Prune ``dirs`` in place as with ``os.walk``."""
    seen: dict[str, str] = {}
    for root, dirs, files in os.walk(src, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            warnings.warn(DiscoveryWarning(
                f"{root}: the same folder as {seen[real]} (through a symbolic link): skipped"),
                stacklevel=2)  # fmt: skip
            dirs[:] = []
            continue
        seen[real] = root
        yield root, dirs, files


@dataclass
class Stream:
    times: np.ndarray  # (N,) float64 seconds, strictly increasing
    load: Callable[[int], Any]  # frame index → raw data; raises FrameError
    names: list[str] = field(default_factory=list)  # per frame: file path or bag topic@stamp


@dataclass
class TimeSeries:
    times: np.ndarray  # (N,) float64 seconds, strictly increasing
    values: np.ndarray  # (N, D) float64


@dataclass
class Calibration:
    """Transforms into the vehicle (= LiDAR) frame. Identity where the file says nothing."""

    radar_to_vehicle: np.ndarray = field(default_factory=lambda: np.eye(4))
    rgb_extrinsic: np.ndarray | None = None  # 4×4 LiDAR → camera
    rgb_intrinsic: np.ndarray | None = None  # 3×3
    ir_extrinsic: np.ndarray | None = None
    ir_intrinsic: np.ndarray | None = None


@dataclass
class Drive:
    drive_id: str  # stable name, e.g. "drive_dusk_clear_0/drive_dusk_1" (relative to --src)
    path: str  # the scene folder or bag file
    lidar: Stream | None  # the master clock; a drive without it fails
    radar: Stream | None = None
    rgb: Stream | None = None
    ir: Stream | None = None
    gps: TimeSeries | None = None
    imu: TimeSeries | None = None
    calib: Calibration = field(default_factory=Calibration)
    # LiDAR frame index → list of SUSTechPOINTS boxes, or None where that sweep is unlabelled
    labels: Callable[[int], list[dict] | None] = lambda i: None
    warnings: list[str] = field(default_factory=list)  # one line each, shown in the summary

    def streams(self) -> dict[str, Stream | None]:
        return {"lidar": self.lidar, "radar": self.radar, "rgb": self.rgb, "ir": self.ir}
