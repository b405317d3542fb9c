"""The ETL's configuration: every number that decides what a sample means.

The preprocessing part (:class:`PreprocessConfig`) is shared with the simulator's observation
adapter (``rl/``): the same grid extents, normalization ranges and image sizes on both sides.
Changing any of it changes :func:`etl.configlib.config_hash`, so ``etl.build`` rebuilds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from etl import configlib


@dataclass(frozen=True)
class BEVGrid:
    """A bird's-eye-view grid in the vehicle (LiDAR) frame: x forward, y left, z up, metres."""

    x_min: float = -32.0
    x_max: float = 32.0
    y_min: float = -32.0
    y_max: float = 32.0
    resolution: float = 0.5  # metres per cell
    z_min: float = -3.0  # points outside [z_min, z_max] are dropped; height is min-maxed on it
    z_max: float = 3.0
    density_max: float = 16.0  # points per cell where the log-density channel saturates at 1

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols): rows along x (forward is row 0), cols along y (left is col 0)."""
        h = round((self.x_max - self.x_min) / self.resolution)
        w = round((self.y_max - self.y_min) / self.resolution)
        return h, w

    def check(self, prefix: str) -> None:
        """Ranges, naming the key under ``prefix`` (the grid sits in two sections)."""
        configlib.check_ranges(self, prefix, {"resolution": (0, None, True),
                                              "density_max": (0, None, True)})  # fmt: skip
        for lo, hi in (("x_min", "x_max"), ("y_min", "y_max"), ("z_min", "z_max")):
            a, b = getattr(self, lo), getattr(self, hi)
            if not b > a:
                raise configlib.ConfigError(
                    f"{prefix}.{hi}: must be greater than {lo} ({a:g}), got {b:g}")
        h, w = self.shape
        if h < 1 or w < 1:
            raise configlib.ConfigError(
                f"{prefix}.resolution: must leave at least one cell, got {self.resolution:g}")


@dataclass(frozen=True)
class RadarConfig:
    grid: BEVGrid = field(default_factory=BEVGrid)
    velocity_min: float = -30.0  # Doppler (m/s) min-max range
    velocity_max: float = 30.0

    def __post_init__(self):
        self.grid.check("preprocess.radar.grid")
        if not self.velocity_max > self.velocity_min:
            raise configlib.ConfigError(
                f"preprocess.radar.velocity_max: must be greater than velocity_min "
                f"({self.velocity_min:g}), got {self.velocity_max:g}")


@dataclass(frozen=True)
class ImageConfig:
    rgb_size: tuple[int, int] = (224, 224)  # (height, width)
    ir_size: tuple[int, int] = (224, 224)
    ir_min: float = 0.0  # raw IR pixel range mapped to [0, 1]: 8-bit (and float) images
    ir_max: float = 255.0
    # the same for 16-bit images (radiometric counts): set it to the camera's range; pixels
    # outside it are clipped, with one warning per drive
    ir16_min: float = 0.0
    ir16_max: float = 65535.0

    def __post_init__(self):  # also when built in code (tests), not loaded
        configlib.check_ranges(self, "preprocess.image", {"rgb_size": (1, None),
                                                          "ir_size": (1, None)})  # fmt: skip
        for lo, hi in (("ir_min", "ir_max"), ("ir16_min", "ir16_max")):
            a, b = getattr(self, lo), getattr(self, hi)
            if not b > a:
                raise configlib.ConfigError(
                    f"preprocess.image.{hi}: must be greater than {lo} ({a}), got {b}")


@dataclass(frozen=True)
class PreprocessConfig:
    """What one sample's arrays mean. Shared verbatim by the ETL and the simulator adapter."""

    lidar: BEVGrid = field(default_factory=BEVGrid)
    radar: RadarConfig = field(default_factory=RadarConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    max_boxes: int = 64  # labels per sample, padded

    def __post_init__(self):
        self.lidar.check("preprocess.lidar")
        configlib.check_range("preprocess.max_boxes", self.max_boxes, 1)


@dataclass(frozen=True)
class SceneLayout:
    """Folder names inside one CMHT scene folder (SUSTechPOINTS layout)."""

    lidar: str = "lidar"
    rgb: str = "camera/front"
    ir: str = "camera/ir"
    radar: str = "radar/front_points"
    gps_imu: str = "Gps_Imu"
    label: str = "label"
    calib: str = "calib"
    rgb_calib: str = "camera/front.json"
    ir_calib: str = "camera/ir.json"
    radar_calib: str = "radar/front_points.json"
    # The CMHT unit's accelerometer reads −1 G on z at rest; the contract (like sensor_msgs/Imu)
    # wants specific force with z up (+9.81 m/s² at rest). Per-axis signs applied after G → m/s².
    imu_accel_sign: tuple[float, float, float] = (1.0, 1.0, -1.0)


@dataclass(frozen=True)
class BagConfig:
    """ROS bag reading. ``topics`` pins modality → topic; unpinned modalities are discovered
    from the message type and the topic name."""

    topics: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SyncConfig:
    tolerance_s: float = 0.0  # nearest-frame tolerance; 0 = half the LiDAR period (median)
    gps_imu_max_gap_s: float = 1.0  # no interpolation across a gap longer than this (IMU)
    # GPS receivers that hold each fix for several samples (the CMHT unit repeats a fix for
    # ~3 s in its per-frame rows) make linear interpolation a staircase. With dedupe, a run
    # of identical consecutive fixes is collapsed to its first row (the time the fix
    # appeared) before the ENU interpolation, and GPS gets its own gap limit.
    gps_dedupe_repeats: bool = True
    gps_max_gap_s: float = 6.0  # no GPS interpolation across a longer gap (after dedupe;
    # the CMHT sample's new fixes are 4.2 s apart, at most 4.6 s)

    def __post_init__(self):
        configlib.check_ranges(self, "sync", {"tolerance_s": (0, None),
                                              "gps_imu_max_gap_s": (0, None, True),
                                              "gps_max_gap_s": (0, None, True)})  # fmt: skip


@dataclass(frozen=True)
class OutputConfig:
    shard_size: int = 256  # samples per ArrayRecord shard
    # "block": contiguous time blocks; "drive": whole drives
    split: Literal["block", "drive"] = "block"
    val_fraction: float = 0.1
    block_s: float = 30.0  # length of a contiguous block for the block split
    guard_s: float = 2.0  # block split: train sweeps this close to a val block are dropped
    seed: int = 0
    storage_dtype: str = "float16"  # image-like arrays on disk; decoded to float32
    # ArrayRecord chunk compression (group_size is always 1): "snappy" (default: ~0.6 ms less
    # CPU per 0.5 MB sample to write than zstd:1, a little faster to read, ~35% larger),
    # "zstd:N" (zstd:1 is ~25% smaller than snappy), or "uncompressed" (fastest, ~3× zstd:1).
    compression: str = "snappy"
    # Decode JPEGs at 1/2, 1/4 or 1/8 scale in libjpeg when the image target size is at most
    # that fraction of the source (scene folders; bag images always decode in full). Cheaper
    # by ~half per RGB frame; the pixels differ from full decode + INTER_AREA by a small,
    # tested tolerance (tests/test_etl_speed_equivalence.py). False: bit-exact full decode.
    reduced_jpeg_decode: bool = True

    def __post_init__(self):
        configlib.check_ranges(self, "output", {"shard_size": (1, None),
                                                "val_fraction": (0, 1, False, True),
                                                "block_s": (0, None, True),
                                                "guard_s": (0, None)})  # fmt: skip


@dataclass(frozen=True)
class ETLConfig:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    scene: SceneLayout = field(default_factory=SceneLayout)
    bag: BagConfig = field(default_factory=BagConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def load_config(path=None, overrides=()) -> ETLConfig:
    return configlib.load(ETLConfig, path, overrides)
