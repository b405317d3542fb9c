"""ROS bags → :class:`etl.sources.Drive`: ROS 2 (sqlite3 ``.db3`` or ``.mcap``, as a bag
directory with ``metadata.yaml`` or a bare storage file) and ROS 1 ``.bag`` files, read with
``rosbags``.

Topics
    Found by message type, then by name: ``sensor_msgs/msg/PointCloud2`` is radar when the
    topic name contains ``radar``, else LiDAR; ``Image``/``CompressedImage`` is IR when a name
    token is ``ir``/``thermal``/``flir``/``lwir``/``infrared`` (``/flir_boson/image_raw``),
    else RGB. Never camera candidates: depth/disparity/mask/segmentation images (and
    ``…/compressedDepth``), and images a LiDAR driver publishes — a name token ``ouster``,
    ``velodyne``, ``lidar``, ``livox``, ``hesai`` or ``rslidar``, or Ouster's
    ``range_image``/``signal_image``/``reflec_image``/``nearir_image`` (mono16 renderings
    of the sweep, ``/ouster/range_image``, ``/img_node/nearir_image``). ``NavSatFix`` is GPS;
    ``Imu`` is IMU. ``cfg.bag.topics`` pins a modality to a topic (a pinned topic absent
    from the bag, or of the wrong type, is a :class:`DriveError`). Without a pin and with
    several candidates the reader picks, in this order: the highest name score (LiDAR:
    ``velodyne`` +3, ``lidar`` +2, ``points`` +1; RGB: ``rgb``/``color``/``front``/``camera``
    +1 each; GPS: ``fix``/``gps``/``gnss`` +1 each; IMU: ``imu`` +1, −2 in a LiDAR's
    namespace such as ``/ouster/imu``, the sensor's own IMU rather than the vehicle's), then
    a raw ``Image`` over a ``CompressedImage``, then the most messages, then the smallest
    topic name — and warns, naming the candidates. Topics not used are listed once in one
    warning line. The names the common drivers publish need no pin: ``/velodyne_points``,
    ``/ouster/points``, ``/camera/image_raw`` or ``/camera/image_raw/compressed``,
    ``/fix`` or ``/gps/fix``, ``/imu/data``.

Times
    A message's time is its header stamp (``sec + nanosec``: each sensor's own clock), the
    bag's receive time only where the stamp is zero (counted in a warning). Each stream is
    sorted by stamp (a bag stores messages in receive order, which transport delay can
    permute) and repeated stamps are dropped, keeping the first received; one warning line
    per topic gives both counts.

Loading (the design choice)
    ``open_bag`` reads the selected topics once to build an index: per message its receive
    time (the bag's own index key) and header stamp, parsed straight from the first 12
    serialized bytes — no deserialization. GPS and IMU are small and are decoded right there
    into :class:`TimeSeries`. Sensor payloads are *not* kept: a real bag is tens of GB.
    ``Stream.load(i)`` fetches message ``i`` through the storage's own index (a range query
    on the receive time: an indexed SQL query for sqlite3, the chunk index for MCAP and
    ROS 1) and deserializes only that message. A per-topic cursor, bounded to a window of
    the next ``_WINDOW`` messages, stays open between calls, so the build's usual in-order
    access reads each chunk about once and random access costs about one chunk. The bag is
    opened lazily once per process (a forked worker reopens it on first use; a spawned one
    calls ``open_bag`` again) and the index is memoized per process, keyed on the bag's
    files' sizes and mtimes, so calling ``open_bag`` again for the same bag does not rescan
    it; a new process does rescan once (the index is not written to disk). Caveat: a ROS 2
    bag compressed in *file* mode is decompressed by ``rosbags`` into a temporary folder on
    every open; message-mode compression costs nothing extra.

Calibration and labels
    Bags carry no calibration here: ``Calibration()`` (identity radar → vehicle, no camera
    matrices). An optional folder ``<bag stem>_calib/`` next to the bag (``drive.mcap`` →
    ``drive_calib/``; a bag directory ``drive/`` → ``drive_calib/``), laid out like a scene's
    ``calib/`` (``camera/front.json``, ``camera/ir.json``, ``radar/front_points.json``; names
    from ``cfg.scene``), overrides that; it is read by :func:`etl.scene.read_calibration`, so
    both raw forms interpret the JSON alike. Bags carry no labels (``labels`` gives None).

Decoded data follows :mod:`etl.sources`: LiDAR → float32 (N, 4) x y z intensity (intensity
0 where the cloud has no ``intensity``/``i``/``reflectivity`` field); radar → float32 (N, 4)
x y z doppler (a field named velocity, v, doppler, v_r, vr or radial_velocity; none is a
:class:`FrameError`). Fields are read at the offsets and types the message lists (any order,
padding anywhere in ``point_step``, extra fields such as ``ring``/``time``/``t`` ignored).
NaN/inf points are dropped (a Velodyne's organized cloud marks a missing return so), and so
are LiDAR points at exactly (0, 0, 0) (Ouster's organized cloud marks it so: a real return
is never at the sensor's own origin); a LiDAR sweep with no point left is a
:class:`FrameError` (a radar frame with no target is valid and returns (0, 4)).
RGB → uint8 (H, W, 3) RGB; IR → uint8/uint16 (H, W).
"""

from __future__ import annotations

import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from etl.config import ETLConfig
from etl.errors import DriveError, FrameError
from etl.sources import Calibration, Drive, Stream, TimeSeries, walk

PC2 = "sensor_msgs/msg/PointCloud2"
IMAGE = "sensor_msgs/msg/Image"
CIMAGE = "sensor_msgs/msg/CompressedImage"
NAVSAT = "sensor_msgs/msg/NavSatFix"
IMU = "sensor_msgs/msg/Imu"

MODALITIES = ("lidar", "radar", "rgb", "ir", "gps", "imu")
_TYPES = {
    "lidar": (PC2,),
    "radar": (PC2,),
    "rgb": (IMAGE, CIMAGE),
    "ir": (IMAGE, CIMAGE),
    "gps": (NAVSAT,),
    "imu": (IMU,),
}
_IR_TOKENS = {"ir", "thermal", "flir", "lwir", "infrared", "boson"}
_NOT_CAMERA_TOKENS = {"depth", "disparity", "mask", "seg", "segmentation", "label", "labels",
                      "compresseddepth"}
# a LiDAR driver's namespace: its images are renderings of the sweep, its IMU is its own
_LIDAR_TOKENS = {"ouster", "velodyne", "lidar", "livox", "hesai", "rslidar"}
_LIDAR_IMAGES = {"range_image", "signal_image", "reflec_image", "nearir_image"}  # Ouster's
_SCORES = {
    "lidar": (("velodyne", 3), ("lidar", 2), ("points", 1)),
    "rgb": (("rgb", 1), ("color", 1), ("front", 1), ("camera", 1)),
    "gps": (("fix", 1), ("gps", 1), ("gnss", 1)),
    "imu": (("imu", 1),),
}
INTENSITY_NAMES = ("intensity", "i", "reflectivity")
VELOCITY_NAMES = ("velocity", "v", "doppler", "v_r", "vr", "radial_velocity")
BAG_SUFFIXES = (".bag", ".mcap", ".db3")
_WINDOW = 64  # messages a cursor reads ahead of a restart


# --------------------------------------------------------------------------- finding bags
def _is_bag(p: Path) -> bool:
    if p.is_dir():
        return (p / "metadata.yaml").is_file()
    return p.is_file() and p.suffix in BAG_SUFFIXES


def find_bags(src) -> list[Path]:
    """Every bag under ``src``, sorted: ROS 2 bag directories (holding ``metadata.yaml``; not
    searched further), bare ``.mcap``/``.db3`` files and ROS 1 ``.bag`` files. ``src`` may
    itself be a bag. Hidden entries and ``*_calib`` folders are skipped. Symbolic links are
    followed, each real folder searched once (:func:`etl.sources.walk`)."""
    src = Path(src)
    if _is_bag(src):
        return [src]
    found: list[Path] = []
    for root, dirs, files in walk(src):
        if "metadata.yaml" in files:
            found.append(Path(root))
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.endswith("_calib"))
        found += [
            Path(root, f) for f in files if not f.startswith(".") and Path(f).suffix in BAG_SUFFIXES
        ]
    return sorted(found)


# --------------------------------------------------------------------------- decoding
_PF_CODES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8"}


def _find_field(fields: dict, names: tuple[str, ...]):
    lower = {k.lower(): f for k, f in fields.items()}
    return next((lower[n] for n in names if n in lower), None)


def decode_pointcloud2(msg, kind: str, where: str = "PointCloud2") -> np.ndarray:
    """A ``sensor_msgs/PointCloud2`` → float32 (N, 4): x y z intensity (``kind='lidar'``) or
    x y z doppler (``kind='radar'``). Fields are found by name and may come in any order,
    with padding and any ``point_step``/``row_step``; points with a NaN/inf value are dropped,
    and LiDAR points at exactly (0, 0, 0) (no return, in an Ouster's organized cloud).
    """
    fields: dict[str, Any] = {}
    for f in msg.fields:
        fields.setdefault(f.name, f)
    missing = [n for n in "xyz" if n not in fields]
    if missing:
        raise FrameError(where, f"point cloud has no field {missing[0]!r}")
    if kind == "radar":
        fourth = _find_field(fields, VELOCITY_NAMES)
        if fourth is None:
            raise FrameError(
                where, f"radar cloud has no velocity field (looked for {', '.join(VELOCITY_NAMES)})"
            )
    else:
        fourth = _find_field(fields, INTENSITY_NAMES)
    chosen = [fields["x"], fields["y"], fields["z"]] + ([fourth] if fourth is not None else [])

    step = int(msg.point_step)
    if step <= 0:
        raise FrameError(where, f"bad point_step {step}")
    order = ">" if msg.is_bigendian else "<"
    formats, offsets = [], []
    for f in chosen:
        code = _PF_CODES.get(int(f.datatype))
        if code is None:
            raise FrameError(where, f"field {f.name!r} has unknown datatype {f.datatype}")
        count = max(int(f.count), 1)
        if f.offset < 0 or f.offset + np.dtype(code).itemsize * count > step:
            raise FrameError(where, f"field {f.name!r} overruns point_step {step}")
        formats.append((order + code, (count,)) if count > 1 else order + code)
        offsets.append(int(f.offset))
    dtype = np.dtype(
        {"names": ["c0", "c1", "c2", "c3"][: len(chosen)], "formats": formats,
         "offsets": offsets, "itemsize": step}
    )

    h, w = int(msg.height), int(msg.width)
    data = np.asarray(msg.data, dtype=np.uint8).reshape(-1)
    cols = np.zeros((4, h * w), np.float32)  # column-major fill, one transpose at the end
    if h * w:
        row = int(msg.row_step)
        if h == 1 and row < w * step:
            row = w * step
        if row < w * step:
            raise FrameError(where, f"row_step {row} < width {w} × point_step {step}")
        need = (h - 1) * row + w * step
        if data.size < need:
            raise FrameError(where, f"truncated cloud: {data.size} bytes, need {need}")
        pts = np.ndarray((h, w), dtype=dtype, buffer=data, strides=(row, step))
        for j in range(len(chosen)):
            col = pts[f"c{j}"]
            if col.ndim == 3:  # COUNT > 1: the first element
                col = col[..., 0]
            cols[j] = col.reshape(-1)
    keep = np.isfinite(cols).all(axis=0)  # NaN/inf in any column drops the point
    if kind != "radar":
        keep &= (cols[:3] != 0).any(axis=0)  # (0, 0, 0): a pixel without a return
    if not keep.all():
        cols = cols[:, keep]
    out = np.ascontiguousarray(cols.T)
    if kind != "radar" and len(out) == 0:
        raise FrameError(where, "empty scan (no finite points other than (0, 0, 0))")
    return out


_RAW_ENCODINGS = {  # encoding → (dtype, channels, channel order)
    "rgb8": (np.uint8, 3, "rgb"),
    "bgr8": (np.uint8, 3, "bgr"),
    "rgba8": (np.uint8, 4, "rgb"),
    "bgra8": (np.uint8, 4, "bgr"),
    "mono8": (np.uint8, 1, "mono"),
    "8uc1": (np.uint8, 1, "mono"),
    "mono16": (np.uint16, 1, "mono"),
    "16uc1": (np.uint16, 1, "mono"),
}


def _as_kind(img: np.ndarray, channel_order: str, kind: str) -> np.ndarray:
    """(H, W[, C]) in RGB/BGR/mono order → RGB uint8 (H, W, 3) or IR (H, W) uint8/uint16."""
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3:
        img = img[:, :, :3]
        if channel_order == "bgr":
            img = img[:, :, ::-1]
        if kind == "ir":
            return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
        return np.ascontiguousarray(img, dtype=np.uint8)
    img = np.ascontiguousarray(img)
    if kind == "ir":
        return img
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    return np.repeat(img[:, :, None], 3, axis=2)


def decode_image(msg, kind: str, where: str = "Image") -> np.ndarray:
    """A ``sensor_msgs/Image`` or ``CompressedImage`` → RGB uint8 (H, W, 3) for
    ``kind='rgb'``, uint8/uint16 (H, W) for ``kind='ir'``. Raw encodings: rgb8, bgr8, rgba8,
    bgra8, mono8, 8UC1, mono16, 16UC1 (byte order from ``is_bigendian``); compressed images
    (JPEG, PNG, …) through ``cv2.imdecode``."""
    data = np.asarray(msg.data, dtype=np.uint8).reshape(-1)
    if hasattr(msg, "format"):  # CompressedImage
        if data.size == 0:
            raise FrameError(where, "empty compressed image")
        if data[:2].tobytes() == b"\xff\xd8" and b"\xff\xd9" not in data[-64:].tobytes():
            raise FrameError(where, "truncated JPEG (no end-of-image marker)")
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        if img is None:
            raise FrameError(where, f"cannot decode compressed image (format {msg.format!r})")
        return _as_kind(img, "bgr", kind)

    enc = msg.encoding.lower()
    spec = _RAW_ENCODINGS.get(enc)
    if spec is None:
        raise FrameError(where, f"unsupported image encoding {msg.encoding!r}")
    base, c, order = spec
    dt = np.dtype(base).newbyteorder(">" if msg.is_bigendian else "<")
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    px = c * dt.itemsize
    if h <= 0 or w <= 0:
        raise FrameError(where, f"empty image {h}×{w}")
    if step < w * px:
        raise FrameError(where, f"step {step} < width {w} × {px} bytes")
    need = (h - 1) * step + w * px
    if data.size < need:
        raise FrameError(where, f"truncated image: {data.size} bytes, need {need}")
    img = np.ndarray((h, w, c), dtype=dt, buffer=data, strides=(step, px, dt.itemsize))
    return _as_kind(img.astype(base), order, kind)


# --------------------------------------------------------------------------- the bag handle
def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}"


def _stamp_parser(is2: bool) -> Callable[[bytes], int]:
    """Header stamp (ns) straight from the serialized bytes: every type read here starts with
    a std_msgs/Header. CDR: 4-byte encapsulation (byte 1 odd → little endian), int32 sec,
    uint32 nanosec. ROS 1: uint32 seq, uint32 sec, uint32 nsec, little endian."""
    le, be = struct.Struct("<iI"), struct.Struct(">iI")
    ros1 = struct.Struct("<II")

    def cdr(raw) -> int:
        sec, nsec = (le if raw[1] & 1 else be).unpack_from(raw, 4)
        return sec * 1_000_000_000 + nsec

    def ros1_stamp(raw) -> int:
        sec, nsec = ros1.unpack_from(raw, 4)
        return sec * 1_000_000_000 + nsec

    return cdr if is2 else ros1_stamp


def _safe_stamp(parse: Callable[[bytes], int], raw) -> int:
    try:
        return parse(raw)
    except (struct.error, IndexError):
        return -1  # too short to hold a header: never matches a kept message


def _msg_stamp(msg) -> int:
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


@dataclass
class _Cursor:
    gen: Any  # the open generator of (connection, receive time, raw) for one topic
    pos: int  # index (in receive order) of the message it yields next


@dataclass
class _Topic:
    """One selected topic's index: per message in receive order, and the kept sorted order."""

    name: str
    msgtype: str
    modality: str
    recv: np.ndarray  # (M,) int64 ns, receive time, bag order (non-decreasing)
    stamp: np.ndarray  # (M,) int64 ns, header stamp as serialized (0 = unset)
    order: np.ndarray  # (N,) int64: kept frame i → position in receive order
    times: np.ndarray  # (N,) float64 s
    values: np.ndarray | None = None  # gps/imu: (N, D)


class _Bag:
    """A lazily opened reader, reopened in a new process; per-topic cursors under a lock."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.RLock()
        self.pid = -1
        self.reader = None
        self.cursors: dict[str, _Cursor] = {}
        self.stamp_of: Callable[[bytes], int] = _stamp_parser(True)
        self.stamp_by_deser: set[str] = set()  # topics whose stamp needs deserialization

    def open(self):
        if self.reader is not None and self.pid == os.getpid():
            return self.reader
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore

        # Bags that embed no type definitions (older ROS 2 sqlite3) fall back to Humble's.
        reader = AnyReader([self.path], default_typestore=get_typestore(Stores.ROS2_HUMBLE))
        reader.open()
        self.reader, self.pid, self.cursors = reader, os.getpid(), {}
        self.stamp_of = _stamp_parser(reader.is2)
        return reader

    def close(self) -> None:
        with self.lock:
            if self.reader is not None and self.pid == os.getpid():
                try:
                    self.reader.close()
                except Exception:
                    pass
            self.reader, self.cursors = None, {}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def connections(self, topic: str):
        return self.open().topics[topic].connections

    def stamp(self, topic: str, raw, msgtype: str) -> int:
        """Header stamp in ns; raises on a message too short or corrupt to hold one."""
        if topic in self.stamp_by_deser:
            return _msg_stamp(self.reader.deserialize(raw, msgtype))
        return self.stamp_of(raw)

    def stamp_or_none(self, topic: str, raw, msgtype: str) -> int | None:
        try:
            return self.stamp(topic, raw, msgtype)
        except Exception:
            return None

    def fetch(self, t: _Topic, p: int, where: str):
        """The raw bytes of the message at receive-order position ``p`` of topic ``t``."""
        want = (int(t.recv[p]), int(t.stamp[p]))
        with self.lock:
            self.open()
            cur = self.cursors.get(t.name)
            if cur is not None and cur.pos <= p <= cur.pos + _WINDOW // 2:
                for conn, recv, raw in cur.gen:
                    cur.pos += 1
                    if cur.pos == p + 1:
                        if (recv, self.stamp_or_none(t.name, raw, t.msgtype)) == want:
                            return conn, raw
                        break
            # (Re)start at the message's receive time through the storage's index.
            # The window bounds the work of a restart (MCAP: the chunks it spans; sqlite3:
            # the rows it sorts); in-order access restarts once per _WINDOW messages.
            stop = int(t.recv[min(p + _WINDOW, len(t.recv) - 1)]) + 1
            gen = self.reader.messages(
                connections=self.connections(t.name), start=want[0], stop=stop
            )
            cur = _Cursor(gen, int(np.searchsorted(t.recv, want[0], "left")))
            self.cursors[t.name] = cur
            for conn, recv, raw in gen:
                cur.pos += 1
                if recv != want[0]:
                    break
                if self.stamp_or_none(t.name, raw, t.msgtype) == want[1]:
                    return conn, raw
            self.cursors.pop(t.name, None)
            raise FrameError(where, "message not found in the bag (changed since indexing?)")


# --------------------------------------------------------------------------- topic selection
def _tokens(name: str) -> set[str]:
    return {x for x in re.split(r"[^a-z0-9]+", name.lower()) if x}


def _candidate_modalities(name: str, msgtype: str | None) -> list[str]:
    if msgtype == PC2:
        return ["radar"] if "radar" in name.lower() else ["lidar"]
    if msgtype in (IMAGE, CIMAGE):
        tok = _tokens(name)
        if tok & (_NOT_CAMERA_TOKENS | _LIDAR_TOKENS) or _is_lidar_image(name):
            return []
        return ["ir"] if tok & _IR_TOKENS else ["rgb"]
    if msgtype == NAVSAT:
        return ["gps"]
    if msgtype == IMU:
        return ["imu"]
    return []


def _is_lidar_image(name: str) -> bool:
    return any(part in _LIDAR_IMAGES for part in name.lower().split("/"))


def _rank_key(modality: str, name: str, msgtype: str, count: int):
    score = sum(s for word, s in _SCORES.get(modality, ()) if word in name.lower())
    if modality == "imu" and _tokens(name) & _LIDAR_TOKENS:
        score -= 2  # the LiDAR's internal IMU (/ouster/imu): the vehicle's is preferred
    return (-score, 0 if msgtype != CIMAGE else 1, -count, name)


def _select_topics(path: Path, topics: dict, pins: dict[str, str], warn) -> dict[str, str]:
    """modality → topic name."""
    chosen: dict[str, str] = {}
    for modality, topic in pins.items():
        if modality not in MODALITIES:
            raise DriveError(
                path, f"bag.topics: unknown modality {modality!r} (one of {', '.join(MODALITIES)})"
            )
        if topic not in topics:
            have = ", ".join(sorted(topics)) or "none"
            raise DriveError(
                path, f"pinned {modality} topic {topic!r} is not in the bag (topics: {have})"
            )
        if topics[topic].msgtype not in _TYPES[modality]:
            raise DriveError(
                path,
                f"pinned {modality} topic {topic!r} has type {topics[topic].msgtype}, "
                f"expected {' or '.join(_TYPES[modality])}",
            )
        chosen[modality] = topic
    pinned = set(chosen.values())
    for modality in MODALITIES:
        if modality in chosen:
            continue
        cands = [
            name
            for name, info in topics.items()
            if name not in pinned and modality in _candidate_modalities(name, info.msgtype)
        ]
        if not cands:
            continue
        cands.sort(key=lambda n: _rank_key(modality, n, topics[n].msgtype, topics[n].msgcount))
        chosen[modality] = cands[0]
        if len(cands) > 1:
            warn(
                f"{len(cands)} candidate {modality} topics ({', '.join(cands)}); "
                f"using {cands[0]} (pin one with bag.topics.{modality})"
            )
    unused = sorted(set(topics) - set(chosen.values()))
    if unused:
        listed = ", ".join(f"{n} [{topics[n].msgtype}]" for n in unused)
        warn(f"{len(unused)} topics not used: {listed}")
    return chosen


# --------------------------------------------------------------------------- indexing
def _seconds(ns: np.ndarray) -> np.ndarray:
    """int64 ns → float64 s as ``sec + nanosec * 1e-9``."""
    ns = np.asarray(ns, np.int64)
    return (ns // 1_000_000_000).astype(np.float64) + (ns % 1_000_000_000).astype(
        np.float64
    ) * 1e-9


def _gps_row(msg) -> tuple[float, float, float, int]:
    return float(msg.latitude), float(msg.longitude), float(msg.altitude), int(msg.status.status)


def _imu_row(msg) -> tuple[float, ...]:
    g, a = msg.angular_velocity, msg.linear_acceleration
    return float(g.x), float(g.y), float(g.z), float(a.x), float(a.y), float(a.z)


def _index(bag: _Bag, chosen: dict[str, str], warn) -> dict[str, _Topic]:
    reader = bag.open()
    by_topic = {topic: modality for modality, topic in chosen.items()}
    recv: dict[str, list[int]] = {t: [] for t in by_topic}
    stamp: dict[str, list[int]] = {t: [] for t in by_topic}
    rows: dict[str, list] = {t: [] for t in by_topic}
    bad: dict[str, int] = dict.fromkeys(by_topic, 0)
    checked: set[str] = set()
    conns = [c for t in by_topic for c in reader.topics[t].connections]
    width = {"gps": 4, "imu": 6}
    for conn, t_recv, raw in reader.messages(connections=conns):
        topic = conn.topic
        modality = by_topic[topic]
        msg = None
        try:
            if topic not in checked:  # first message: is the byte-level stamp right?
                msg = reader.deserialize(raw, conn.msgtype)
                if _safe_stamp(bag.stamp_of, raw) != _msg_stamp(msg):
                    bag.stamp_by_deser.add(topic)
                checked.add(topic)
            row = None
            if modality in width:
                msg = msg or reader.deserialize(raw, conn.msgtype)
                row = _gps_row(msg) if modality == "gps" else _imu_row(msg)
            s = bag.stamp(topic, raw, conn.msgtype)
        except Exception:
            # kept in the arrays (so positions match the bag's message order), never used
            bad[topic] += 1
            s, row = -1, (None if modality not in width else (np.nan,) * width[modality])
        recv[topic].append(t_recv)
        stamp[topic].append(s)
        if modality in width:
            rows[topic].append(row)

    out: dict[str, _Topic] = {}
    for topic, modality in by_topic.items():
        what = f"{modality} topic {topic}"
        if bad[topic]:
            warn(f"{what}: {bad[topic]} unreadable messages skipped")
        r = np.asarray(recv[topic], np.int64)
        s = np.asarray(stamp[topic], np.int64)
        values = (
            np.asarray(rows[topic], np.float64).reshape(-1, width[modality])
            if modality in width
            else None
        )
        keep = s >= 0
        if modality == "gps" and len(r):
            no_fix = values[:, 3] == -1
            nonfinite = ~np.isfinite(values[:, :2]).all(axis=1) & ~no_fix & keep
            if no_fix.any():
                warn(f"{what}: {int(no_fix.sum())} fixes with status NO_FIX skipped")
            if nonfinite.any():
                warn(f"{what}: {int(nonfinite.sum())} fixes with NaN/inf lat/lon skipped")
            keep &= ~no_fix & ~nonfinite
            values = values[:, :3]
            values[:, 2] = np.where(np.isfinite(values[:, 2]), values[:, 2], 0.0)
        if modality == "imu" and len(r):
            nonfinite = ~np.isfinite(values).all(axis=1) & keep
            if nonfinite.any():
                warn(f"{what}: {int(nonfinite.sum())} samples with NaN/inf skipped")
            keep &= ~nonfinite
        t_ns = np.where(s > 0, s, r)
        if (s[keep] == 0).any():
            warn(
                f"{what}: {int((s[keep] == 0).sum())} messages without a header stamp; "
                "used the bag receive time"
            )
        pos = np.flatnonzero(keep)
        pos = pos[np.argsort(t_ns[pos], kind="stable")]
        if len(pos):
            in_bag = t_ns[np.sort(pos)]
            late = int((in_bag[1:] < np.maximum.accumulate(in_bag)[:-1]).sum())
            # repeats judged on the float64 seconds handed out (≈ 0.24 µs apart at 1.7e9 s),
            # so that the stream's times are strictly increasing as floats
            first = np.r_[True, np.diff(_seconds(t_ns[pos])) > 0]
            dup = int((~first).sum())
            pos = pos[first]
            if late or dup:
                warn(
                    f"{what}: {late} out-of-order stamps re-sorted, "
                    f"{dup} duplicate stamps dropped"
                )
        else:
            warn(f"{what}: no usable messages")
        out[topic] = _Topic(
            name=topic,
            msgtype=reader.topics[topic].msgtype,
            modality=modality,
            recv=r,
            stamp=s,
            order=pos.astype(np.int64),
            times=_seconds(t_ns[pos]),
            values=None if values is None else values[pos],
        )
    return out


# --------------------------------------------------------------------------- calibration
def _calib_dir(path: Path) -> Path:
    stem = path.name if path.is_dir() else path.stem
    return path.parent / f"{stem}_calib"


def _read_calibration(path: Path, cfg: ETLConfig, warn: list[str]) -> Calibration:
    """Identity unless ``<bag stem>_calib/`` exists next to the bag; that folder is read by
    the scene reader's parser (:func:`etl.scene.read_calibration`), so both forms agree."""
    root = _calib_dir(path)
    if not root.is_dir():
        return Calibration()
    from etl.scene import read_calibration

    return read_calibration(root, cfg.scene, warn)


# --------------------------------------------------------------------------- open_bag
@dataclass
class _Indexed:
    bag: _Bag
    topics: dict[str, _Topic]
    by_modality: dict[str, str]
    warnings: list[str] = field(default_factory=list)


_CACHE: OrderedDict[tuple, _Indexed] = OrderedDict()
_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()


def _fingerprint(path: Path) -> tuple:
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


def _stamp_name(ns: int) -> str:
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def _make_load(indexed: _Indexed, t: _Topic, path: Path) -> Callable[[int], np.ndarray]:
    bag = indexed.bag
    decode = decode_pointcloud2 if t.msgtype == PC2 else decode_image

    def load(i: int) -> np.ndarray:
        p = int(t.order[i])
        ns = int(t.stamp[p]) if t.stamp[p] > 0 else int(t.recv[p])
        where = f"{path} {t.name}@{_stamp_name(ns)}"
        try:
            conn, raw = bag.fetch(t, p, where)
            msg = bag.reader.deserialize(raw, conn.msgtype)
        except FrameError:
            raise
        except Exception as e:
            raise FrameError(where, f"cannot read message ({_one_line(e)})") from None
        return decode(msg, t.modality, where)

    return load


def open_bag(path, drive_id: str, cfg: ETLConfig) -> Drive:
    """One bag → a :class:`Drive` (see the module docstring for the rules). A bag that cannot
    be opened or read is a :class:`DriveError` naming the file and the reason."""
    path = Path(path)
    pins = dict(cfg.bag.topics)
    try:
        key = (str(path.resolve()), _fingerprint(path), tuple(sorted(pins.items())))
    except OSError as e:
        raise DriveError(path, f"cannot read bag ({_one_line(e)})") from None
    with _CACHE_LOCK:
        indexed = _CACHE.get(key)
        if indexed is not None:
            _CACHE.move_to_end(key)
    if indexed is None:
        bag = _Bag(path)
        warnings: list[str] = []

        def warn(line: str) -> None:
            warnings.append(f"{path}: {line}")

        try:
            with bag.lock:
                reader = bag.open()
                by_modality = _select_topics(path, reader.topics, pins, warn)
                topics = _index(bag, by_modality, warn)
        except DriveError:
            bag.close()
            raise
        except Exception as e:
            bag.close()
            raise DriveError(path, f"cannot read bag ({_one_line(e)})") from None
        indexed = _Indexed(bag, topics, by_modality, warnings)
        with _CACHE_LOCK:
            _CACHE[key] = indexed
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)

    streams: dict[str, Any] = {}
    for modality, topic in indexed.by_modality.items():
        t = indexed.topics[topic]
        if len(t.order) == 0:
            continue
        if modality in ("gps", "imu"):
            streams[modality] = TimeSeries(times=t.times, values=t.values)
        else:
            names = [
                f"{topic}@{_stamp_name(int(s) if s > 0 else int(r))}"
                for s, r in zip(t.stamp[t.order], t.recv[t.order], strict=True)
            ]
            streams[modality] = Stream(times=t.times, load=_make_load(indexed, t, path),
                                       names=names)
    warnings = list(indexed.warnings)
    calib = _read_calibration(path, cfg, warnings)
    return Drive(
        drive_id=drive_id,
        path=str(path),
        calib=calib,
        warnings=warnings,
        **{m: streams.get(m) for m in MODALITIES},
    )
