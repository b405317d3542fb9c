"""The data contract: what one sample is. Defined here and nowhere else.

One sample = one LiDAR sweep (the master clock) with every other sensor aligned to it.
The ETL writes it, the Grain reader reads it, the simulator's observation adapter produces it.

Keys (channels last, float32 after decoding):

=============  ==================  =======================================================
key            shape               meaning
=============  ==================  =======================================================
lidar          (H, W, 2)           BEV of the LiDAR grid: [log-density, max height], [0, 1]
radar          (H, W, 2)           BEV of the radar grid: [log-density, Doppler], [0, 1]
rgb            (h, w, 3)           resized RGB, ImageNet mean/std normalized
ir             (h, w, 1)           resized thermal IR, min-max to [0, 1]
gps            (3,)                east, north, up in metres from the drive's first fix
imu            (6,)                gyro x y z (rad/s), accel x y z (m/s²)
present        (6,) uint8          1 where the modality is present, in MODALITIES order
offset         (6,) float32        sensor time − LiDAR time (s); 0 where absent
boxes          (max_boxes, 7)      labels x y z l w h yaw in the vehicle frame (zero-padded)
box_class      (max_boxes,) int32  index into BOX_CLASSES, −1 for padding
has_labels     () uint8            1 where this sweep carries labels
time           () float64          LiDAR time of the sweep (s)
=============  ==================  =======================================================

An absent modality is *not* zero data: its presence flag is 0, it is omitted from the record
on disk, and decoding fills a zero placeholder only so that batches keep one shape. Every
consumer must read ``present`` (the model masks absent modalities out of attention and loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from etl.config import PreprocessConfig

SCHEMA_VERSION = 1

MODALITIES: tuple[str, ...] = ("lidar", "radar", "rgb", "ir", "gps", "imu")
IMAGE_MODALITIES: tuple[str, ...] = ("lidar", "radar", "rgb", "ir")
VECTOR_MODALITIES: tuple[str, ...] = ("gps", "imu")
MODALITY_INDEX = {m: i for i, m in enumerate(MODALITIES)}

# Channel names of the image-like modalities, in order.
CHANNELS = {
    "lidar": ("density", "max_height"),
    "radar": ("density", "doppler"),
    "rgb": ("r", "g", "b"),
    "ir": ("ir",),
    "gps": ("east", "north", "up"),
    "imu": ("gyro_x", "gyro_y", "gyro_z", "accel_x", "accel_y", "accel_z"),
}

BOX_CLASSES: tuple[str, ...] = (
    "Car", "Truck", "Bus", "Van", "Pedestrian", "Cyclist", "Motorcycle", "Other",
)  # fmt: skip
VEHICLE_CLASSES: tuple[str, ...] = ("Car", "Truck", "Bus", "Van", "Motorcycle")

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def box_class_index(name: str) -> int:
    """Index of a label's obj_type in BOX_CLASSES (unknown types map to "Other")."""
    for i, c in enumerate(BOX_CLASSES):
        if c.lower() == str(name).lower():
            return i
    return BOX_CLASSES.index("Other")


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str  # decoded dtype


def sample_spec(cfg: PreprocessConfig) -> dict[str, ArraySpec]:
    """Shapes and dtypes of every key of a decoded sample under ``cfg``."""
    lh, lw = cfg.lidar.shape
    rh, rw = cfg.radar.grid.shape
    return {
        "lidar": ArraySpec((lh, lw, 2), "float32"),
        "radar": ArraySpec((rh, rw, 2), "float32"),
        "rgb": ArraySpec((*cfg.image.rgb_size, 3), "float32"),
        "ir": ArraySpec((*cfg.image.ir_size, 1), "float32"),
        "gps": ArraySpec((3,), "float32"),
        "imu": ArraySpec((6,), "float32"),
        "present": ArraySpec((len(MODALITIES),), "uint8"),
        "offset": ArraySpec((len(MODALITIES),), "float32"),
        "boxes": ArraySpec((cfg.max_boxes, 7), "float32"),
        "box_class": ArraySpec((cfg.max_boxes,), "int32"),
        "has_labels": ArraySpec((), "uint8"),
        "time": ArraySpec((), "float64"),
    }


def empty_sample(cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """A sample with every modality absent (flags 0) — the start for building one."""
    out = {k: np.zeros(s.shape, s.dtype) for k, s in sample_spec(cfg).items()}
    out["box_class"][:] = -1
    return out


def validate_sample(sample: dict[str, np.ndarray], cfg: PreprocessConfig, where: str = "") -> None:
    """Raise ValueError naming the key if ``sample`` does not match the contract."""
    spec = sample_spec(cfg)
    missing = set(spec) - set(sample)
    if missing:
        raise ValueError(f"{where}: sample lacks keys {sorted(missing)}")
    for k, s in spec.items():
        a = np.asarray(sample[k])
        if tuple(a.shape) != s.shape:
            raise ValueError(f"{where}: {k} has shape {a.shape}, contract says {s.shape}")
        if a.dtype != np.dtype(s.dtype):
            raise ValueError(f"{where}: {k} has dtype {a.dtype}, contract says {s.dtype}")
    for i, m in enumerate(MODALITIES):
        if sample["present"][i] and not np.all(np.isfinite(sample[m])):
            raise ValueError(f"{where}: {m} is flagged present but holds NaN/inf")
