"""etl.bag: ROS 2 (sqlite3, mcap) and ROS 1 bags written here with rosbags' writers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.rosbag1 import Writer as Writer1
from rosbags.rosbag2 import StoragePlugin
from rosbags.rosbag2 import Writer as Writer2
from rosbags.typesys import Stores, get_typestore

from etl.bag import decode_pointcloud2, find_bags, open_bag
from etl.config import BagConfig, ETLConfig
from etl.errors import DriveError, FrameError

T0 = 1_700_000_000 * 10**9  # ns
MS = 1_000_000
TOPICS = {
    "lidar": "/velodyne_points",
    "radar": "/radar/front_points",
    "rgb": "/camera/front/image_raw",
    "rgbc": "/camera/front/image_raw/compressed",
    "ir": "/flir/thermal/image_raw",
    "gps": "/gps/fix",
    "imu": "/imu/data",
    "other": "/diagnostics",
}
# rate (Hz), phase (s) of each sensor's own clock
RATES = {"lidar": (10, 0.013), "radar": (13, 0.031), "rgb": (15, 0.007), "rgbc": (15, 0.007),
         "ir": (9, 0.052), "gps": (5, 0.021), "imu": (50, 0.003), "other": (2, 0.0)}
DURATION = 0.6

LIDAR_DT = np.dtype({"names": ["y", "x", "z", "intensity", "ring"],
                     "formats": ["<f4", "<f4", "<f8", "<u2", "<u2"],
                     "offsets": [0, 8, 16, 24, 26], "itemsize": 32})
RADAR_DT = np.dtype({"names": ["v_r", "x", "y", "z"], "formats": [">f4", ">f4", ">f4", ">f4"],
                     "offsets": [12, 0, 4, 8], "itemsize": 20})


def stamps(kind: str) -> np.ndarray:
    hz, phase = RATES[kind]
    n = int(DURATION * hz)
    jitter = (np.arange(n) * 7919 % 13) * 10_000  # deterministic µs-level jitter
    return T0 + np.round((phase + np.arange(n) / hz) * 1e9).astype(np.int64) + jitter


def lidar_points(k: int, n: int = 12):
    rng = np.random.default_rng(k)
    a = np.zeros((2, n // 2), LIDAR_DT)
    a["x"], a["y"] = rng.normal(0, 10, a.shape), rng.normal(0, 10, a.shape)
    a["z"] = rng.normal(0, 1, a.shape)
    a["intensity"], a["ring"] = rng.integers(0, 255, a.shape), 7
    a["x"][0, 1] = np.nan  # dropped
    return a


def radar_points(k: int, n: int = 5):
    rng = np.random.default_rng(100 + k)
    a = np.zeros(n, RADAR_DT)
    for f in ("x", "y", "z", "v_r"):
        a[f] = rng.normal(0, 5, n)
    a["z"][2] = np.inf  # dropped
    return a


def rgb_image(k: int):
    return np.random.default_rng(200 + k).integers(0, 256, (6, 8, 3), dtype=np.uint8)


def ir_image(k: int):
    return np.random.default_rng(300 + k).integers(0, 65536, (5, 7), dtype=np.uint16)


def jpeg(k: int) -> bytes:
    img = np.full((16, 16, 3), 40 * (k % 5), np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def gps_row(k: int):
    return 43.2286 + 1e-5 * k, -79.9390 - 1e-5 * k, 90.0 + k


def imu_row(k: int):
    return 0.01 * k, -0.02 * k, 0.5, 0.1 * k, 0.2, 9.80665


class BagBuilder:
    """Builds sensor_msgs messages for one typestore (ROS 2 or ROS 1 field layouts)."""

    def __init__(self, ros1: bool):
        self.ros1 = ros1
        self.ts = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)
        self.t = self.ts.types

    def header(self, ns: int):
        time = self.t["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)
        if self.ros1:
            return self.t["std_msgs/msg/Header"](seq=0, stamp=time, frame_id="f")
        return self.t["std_msgs/msg/Header"](stamp=time, frame_id="f")

    def cloud(self, ns, arr, bigendian=False, row_pad=0):
        pf = self.t["sensor_msgs/msg/PointField"]
        codes = {"f4": 7, "f8": 8, "u2": 4}
        names = list(arr.dtype.names)[::-1]  # listed in an order unlike the byte layout
        fields = [pf(name=n, offset=arr.dtype.fields[n][1],
                     datatype=codes[arr.dtype.fields[n][0].str[1:]], count=1) for n in names]
        arr2 = np.atleast_2d(arr)
        h, w = arr2.shape
        row = w * arr.dtype.itemsize + row_pad
        buf = np.zeros(h * row, np.uint8)
        width_bytes = w * arr.dtype.itemsize
        for r in range(h):
            buf[r * row: r * row + width_bytes] = np.frombuffer(arr2[r].tobytes(), np.uint8)
        return self.t["sensor_msgs/msg/PointCloud2"](
            header=self.header(ns), height=h, width=w, fields=fields, is_bigendian=bigendian,
            point_step=arr.dtype.itemsize, row_step=row, data=buf, is_dense=False)

    def image(self, ns, arr, encoding, bigendian=0, pad=0):
        h, w = arr.shape[:2]
        px = arr.dtype.itemsize * (arr.shape[2] if arr.ndim == 3 else 1)
        step = w * px + pad
        buf = np.zeros(h * step, np.uint8)
        dt = arr.dtype.newbyteorder(">" if bigendian else "<")
        rows = np.frombuffer(arr.astype(dt).tobytes(), np.uint8).reshape(h, w * px)
        buf.reshape(h, step)[:, : w * px] = rows
        return self.t["sensor_msgs/msg/Image"](
            header=self.header(ns), height=h, width=w, encoding=encoding,
            is_bigendian=bigendian, step=step, data=buf)

    def compressed(self, ns, data: bytes):
        return self.t["sensor_msgs/msg/CompressedImage"](
            header=self.header(ns), format="jpeg", data=np.frombuffer(data, np.uint8))

    def navsat(self, ns, row, status=0):
        st = self.t["sensor_msgs/msg/NavSatStatus"](status=status, service=1)
        return self.t["sensor_msgs/msg/NavSatFix"](
            header=self.header(ns), status=st, latitude=row[0], longitude=row[1],
            altitude=row[2], position_covariance=np.zeros(9), position_covariance_type=0)

    def imu(self, ns, row):
        v3, q = self.t["geometry_msgs/msg/Vector3"], self.t["geometry_msgs/msg/Quaternion"]
        return self.t["sensor_msgs/msg/Imu"](
            header=self.header(ns), orientation=q(x=0.0, y=0.0, z=0.0, w=1.0),
            orientation_covariance=np.zeros(9), angular_velocity=v3(x=row[0], y=row[1], z=row[2]),
            angular_velocity_covariance=np.zeros(9),
            linear_acceleration=v3(x=row[3], y=row[4], z=row[5]),
            linear_acceleration_covariance=np.zeros(9))

    def string(self, text):
        return self.t["std_msgs/msg/String"](data=text)

    def serialize(self, msg, msgtype) -> bytes:
        fn = self.ts.serialize_ros1 if self.ros1 else self.ts.serialize_cdr
        return bytes(fn(msg, msgtype))


MSGTYPES = {
    "lidar": "sensor_msgs/msg/PointCloud2", "radar": "sensor_msgs/msg/PointCloud2",
    "rgb": "sensor_msgs/msg/Image", "rgbc": "sensor_msgs/msg/CompressedImage",
    "ir": "sensor_msgs/msg/Image", "gps": "sensor_msgs/msg/NavSatFix",
    "imu": "sensor_msgs/msg/Imu", "other": "std_msgs/msg/String",
}


def build_messages(b: BagBuilder, kinds, extra=None):
    """[(receive ns, kind, raw bytes)] sorted by receive time; receive = stamp + a delay."""
    out = []
    for kind in kinds:
        for k, ns in enumerate(stamps(kind)):
            ns = int(ns)
            if kind == "lidar":
                msg = b.cloud(ns, lidar_points(k), row_pad=16)
            elif kind == "radar":
                msg = b.cloud(ns, radar_points(k), bigendian=True)
            elif kind == "rgb":
                msg = b.image(ns, rgb_image(k), "rgb8", pad=4)
            elif kind == "rgbc":
                msg = b.compressed(ns, jpeg(k))
            elif kind == "ir":
                msg = b.image(ns, ir_image(k), "mono16", bigendian=1)
            elif kind == "gps":
                msg = b.navsat(ns, gps_row(k), status=-1 if k == 1 else 0)
            elif kind == "imu":
                msg = b.imu(ns, imu_row(k))
            else:
                msg = b.string(f"ok {k}")
            delay = 3_000_000 + (k % 3) * 1_000_000
            out.append((ns + delay, kind, b.serialize(msg, MSGTYPES[kind])))
    out += extra or []
    out.sort(key=lambda m: m[0])
    return out


def write_bag(path: Path, storage: str, messages, topics=TOPICS):
    """storage: 'sqlite3' | 'mcap' | 'ros1'. Returns the bag path."""
    kinds = sorted({m[1] for m in messages})
    b = BagBuilder(storage == "ros1")
    if storage == "ros1":
        writer = Writer1(path)
    else:
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        writer = Writer2(path, version=9, storage_plugin=plugin)
    with writer:
        conns = {k: writer.add_connection(topics[k], MSGTYPES[k], typestore=b.ts) for k in kinds}
        for recv, kind, raw in messages:
            writer.write(conns[kind], recv, raw)
    return path


def seconds(ns):
    ns = np.asarray(ns, np.int64)
    return (ns // 10**9).astype(np.float64) + (ns % 10**9).astype(np.float64) * 1e-9


ALL = ["lidar", "radar", "rgb", "ir", "gps", "imu", "other"]


@pytest.fixture(scope="module", params=["sqlite3", "mcap", "ros1"])
def full_bag(request, tmp_path_factory):
    storage = request.param
    d = tmp_path_factory.mktemp(storage)
    b = BagBuilder(storage == "ros1")
    path = d / ("drive.bag" if storage == "ros1" else "drive")
    return write_bag(path, storage, build_messages(b, ALL))


def test_round_trip(full_bag):
    drive = open_bag(full_bag, "d0", ETLConfig())
    assert drive.drive_id == "d0" and drive.labels(0) is None
    np.testing.assert_array_equal(drive.calib.radar_to_vehicle, np.eye(4))

    np.testing.assert_array_equal(drive.lidar.times, seconds(stamps("lidar")))
    for k in range(len(drive.lidar.times)):
        a = lidar_points(k).reshape(-1)
        want = np.stack([a["x"], a["y"], a["z"], a["intensity"]], 1).astype(np.float32)
        want = want[np.isfinite(want).all(1)]
        np.testing.assert_array_equal(drive.lidar.load(k), want)
    assert drive.lidar.load(0).dtype == np.float32 and drive.lidar.load(0).shape == (11, 4)

    np.testing.assert_array_equal(drive.radar.times, seconds(stamps("radar")))
    a = radar_points(3)
    want = np.stack([a["x"], a["y"], a["z"], a["v_r"]], 1).astype(np.float32)
    np.testing.assert_array_equal(drive.radar.load(3), want[np.isfinite(want).all(1)])

    np.testing.assert_array_equal(drive.rgb.times, seconds(stamps("rgb")))
    img = drive.rgb.load(2)
    assert img.dtype == np.uint8 and img.shape == (6, 8, 3)
    np.testing.assert_array_equal(img, rgb_image(2))

    np.testing.assert_array_equal(drive.ir.times, seconds(stamps("ir")))
    ir = drive.ir.load(4)
    assert ir.dtype == np.uint16
    np.testing.assert_array_equal(ir, ir_image(4))

    gs = stamps("gps")
    keep = np.arange(len(gs)) != 1  # the NO_FIX message is skipped
    np.testing.assert_array_equal(drive.gps.times, seconds(gs[keep]))
    want = np.array([gps_row(k) for k in range(len(gs))])[keep]
    np.testing.assert_array_equal(drive.gps.values, want)
    assert any("1 fixes with status NO_FIX" in w for w in drive.warnings)

    np.testing.assert_array_equal(drive.imu.times, seconds(stamps("imu")))
    want = np.array([imu_row(k) for k in range(len(stamps("imu")))])
    np.testing.assert_array_equal(drive.imu.values, want)

    unused = [w for w in drive.warnings if "not used" in w]
    assert len(unused) == 1 and "/diagnostics" in unused[0]
    assert drive.lidar.names[0].startswith("/velodyne_points@1700000000.")


def test_random_access_matches_sequential(full_bag):
    drive = open_bag(full_bag, "d0", ETLConfig())
    n = len(drive.rgb.times)
    seq = [drive.rgb.load(i) for i in range(n)]
    for i in [n - 1, 0, 3, 2, 2, n - 2, 1]:
        np.testing.assert_array_equal(drive.rgb.load(i), seq[i])
    # interleaving streams on the same reader
    for i in range(3):
        drive.lidar.load(i), drive.radar.load(i), drive.ir.load(i)


def test_bare_storage_files(tmp_path):
    b = BagBuilder(False)
    for storage, ext in (("mcap", ".mcap"), ("sqlite3", ".db3")):
        d = write_bag(tmp_path / storage, storage, build_messages(b, ["lidar", "rgbc"]))
        bare = tmp_path / f"bare_{storage}{ext}"
        shutil.move(next(d.glob(f"*{ext}")), bare)
        drive = open_bag(bare, "bare", ETLConfig())
        np.testing.assert_array_equal(drive.lidar.times, seconds(stamps("lidar")))
        want = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg(3), np.uint8), 1), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(drive.rgb.load(3), want)
    assert find_bags(tmp_path) == sorted([tmp_path / "bare_mcap.mcap",
                                          tmp_path / "bare_sqlite3.db3", tmp_path / "mcap",
                                          tmp_path / "sqlite3"])


def test_find_bags_layouts(tmp_path):
    (tmp_path / "a" / "drive1").mkdir(parents=True)
    (tmp_path / "a" / "drive1" / "metadata.yaml").write_text("x")
    (tmp_path / "a" / "drive1" / "drive1_0.db3").write_text("x")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old.bag").write_text("x")
    (tmp_path / "b" / "old_calib").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("x")
    assert find_bags(tmp_path) == [tmp_path / "a" / "drive1", tmp_path / "b" / "old.bag"]
    assert find_bags(tmp_path / "b" / "old.bag") == [tmp_path / "b" / "old.bag"]


def test_topic_choice_and_pinning(tmp_path):
    b = BagBuilder(False)
    topics = dict(TOPICS, other="/points_filtered")
    msgs = build_messages(b, ["lidar", "imu"])
    # a second PointCloud2 topic (a lidar candidate too): same clouds, fewer messages
    extra = [(int(ns) + 1, "other", b.serialize(b.cloud(int(ns), lidar_points(9 + k)),
                                                MSGTYPES["lidar"]))
             for k, ns in enumerate(stamps("lidar")[:3])]
    msgs = sorted(msgs + extra, key=lambda m: m[0])
    mtypes = dict(MSGTYPES, other=MSGTYPES["lidar"])
    path = tmp_path / "two"
    writer = Writer2(path, version=9, storage_plugin=StoragePlugin.MCAP)
    with writer:
        conns = {k: writer.add_connection(topics[k], mtypes[k], typestore=b.ts)
                 for k in ("lidar", "imu", "other")}
        for recv, kind, raw in msgs:
            writer.write(conns[kind], recv, raw)

    drive = open_bag(path, "t", ETLConfig())
    assert len(drive.lidar.times) == len(stamps("lidar"))  # velodyne preferred
    amb = [w for w in drive.warnings if "candidate lidar topics" in w]
    assert len(amb) == 1 and "/points_filtered" in amb[0] and "using /velodyne_points" in amb[0]

    cfg = ETLConfig(bag=BagConfig(topics={"lidar": "/points_filtered"}))
    drive = open_bag(path, "t", cfg)
    assert len(drive.lidar.times) == 3
    assert not any("candidate" in w for w in drive.warnings)
    unused = [w for w in drive.warnings if "not used" in w]
    assert len(unused) == 1 and "/velodyne_points" in unused[0]
    np.testing.assert_array_equal(drive.lidar.load(1)[:, 3], lidar_points(10)["intensity"]
                                  .reshape(-1)[np.isfinite(lidar_points(10)["x"].reshape(-1))])

    with pytest.raises(DriveError, match="/no_such_topic"):
        open_bag(path, "t", ETLConfig(bag=BagConfig(topics={"radar": "/no_such_topic"})))
    with pytest.raises(DriveError, match="/imu/data"):
        open_bag(path, "t", ETLConfig(bag=BagConfig(topics={"lidar": "/imu/data"})))


def test_time_quirks(tmp_path):
    """Zero stamps fall back to the receive time; late stamps are re-sorted; repeats dropped."""
    b = BagBuilder(False)
    ts = [T0 + 10**8 * k for k in range(6)]
    msgs = []
    for k, ns in enumerate(ts):
        recv = ns + 5_000_000
        stamp = {2: ts[3], 3: ts[2], 4: ts[2]}.get(k, ns)  # swap 2/3, repeat at 4
        if k == 5:
            stamp = 0
        msgs.append((recv, "imu", b.serialize(b.imu(stamp, imu_row(k)), MSGTYPES["imu"])))
    path = write_bag(tmp_path / "q", "sqlite3", msgs)
    drive = open_bag(path, "q", ETLConfig())
    want_t = [ts[0], ts[1], ts[2], ts[3], ts[5] + 5_000_000]
    np.testing.assert_array_equal(drive.imu.times, seconds(want_t))
    np.testing.assert_array_equal(drive.imu.values[:, 0], [0.0, 0.01, 0.03, 0.02, 0.05])
    assert any("1 messages without a header stamp" in w for w in drive.warnings)
    line = [w for w in drive.warnings if "duplicate" in w]
    assert len(line) == 1 and "1 duplicate stamps dropped" in line[0]
    assert "out-of-order stamps re-sorted" in line[0]


@pytest.mark.parametrize("storage", ["mcap", "sqlite3", "ros1"])
def test_truncated_bag_is_drive_error(tmp_path, storage):
    b = BagBuilder(storage == "ros1")
    path = tmp_path / ("t.bag" if storage == "ros1" else "t")
    write_bag(path, storage, build_messages(b, ["lidar", "rgb", "imu"]))
    f = path if storage == "ros1" else next(p for p in path.iterdir() if p.suffix != ".yaml")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DriveError) as e:
        open_bag(path, "t", ETLConfig())
    assert path.name in str(e.value) and "\n" not in str(e.value)


def test_not_a_bag(tmp_path):
    f = tmp_path / "junk.mcap"
    f.write_bytes(b"this is not a bag")
    with pytest.raises(DriveError, match="junk.mcap"):
        open_bag(f, "j", ETLConfig())


def test_corrupt_messages_are_frame_errors(tmp_path):
    b = BagBuilder(False)
    msgs = build_messages(b, ["lidar", "rgbc", "rgb"])
    rgbc, rgb = stamps("rgbc"), stamps("rgb")
    bad = []
    # a JPEG whose bytes are garbage after the header
    broken = b.compressed(int(rgbc[2]) + MS, b"\xff\xd8\xff\xe0" + b"\x00" * 50 + b"\xff\xd9")
    bad.append((int(rgbc[2]) + 2 * MS, "rgbc", b.serialize(broken, MSGTYPES["rgbc"])))
    # an Image whose data is shorter than height × step
    short = b.image(int(rgb[2]) + MS, rgb_image(0), "rgb8")
    short.data = short.data[:10]
    bad.append((int(rgb[2]) + 2 * MS, "rgb", b.serialize(short, MSGTYPES["rgb"])))
    # a message cut in the middle of its serialization (its header stamp still readable)
    cut = b.serialize(b.image(int(rgb[4]) + MS, rgb_image(0), "rgb8"), MSGTYPES["rgb"])[:40]
    bad.append((int(rgb[4]) + 2 * MS, "rgb", cut))
    # too short to hold a header: skipped when indexing, the messages around it still load
    bad.append((int(stamps("lidar")[2]) + 2 * MS, "lidar", b"\x00\x01\x00\x00\x05"))
    msgs = sorted(msgs + bad, key=lambda m: m[0])

    for pin in ({"rgb": TOPICS["rgbc"]}, {"rgb": TOPICS["rgb"]}):
        path = tmp_path / pin["rgb"].strip("/").replace("/", "_")
        write_bag(path, "mcap", msgs)
        drive = open_bag(path, "c", ETLConfig(bag=BagConfig(topics=pin)))
        stamp = int(rgbc[2]) + MS
        i = int(np.searchsorted(drive.rgb.times, seconds([stamp])[0]))
        with pytest.raises(FrameError) as e:
            drive.rgb.load(i)
        msg = str(e.value)
        assert path.name in msg and pin["rgb"] in msg and f"{stamp % 10**9:09d}" in msg
        if pin["rgb"] == TOPICS["rgb"]:
            assert "truncated image" in msg
            j = int(np.searchsorted(drive.rgb.times, seconds([int(rgb[4]) + MS])[0]))
            with pytest.raises(FrameError, match="cannot read message"):
                drive.rgb.load(j)
        assert drive.rgb.load(0).shape[2] == 3  # good frames still load
        assert any("lidar topic /velodyne_points: 1 unreadable" in w for w in drive.warnings)
        np.testing.assert_array_equal(drive.lidar.times, seconds(stamps("lidar")))
        for k in (3, 1, 2, 3, 4):
            assert len(drive.lidar.load(k)) == 11


def test_forked_worker_reopens(full_bag):
    """A worker forked after open_bag (or calling it again) reads through its own handle."""
    drive = open_bag(full_bag, "d0", ETLConfig())
    drive.lidar.load(0)  # the parent's reader is open
    pid = os.fork()
    if pid == 0:  # child: exit status 0 only if every frame matches
        ok = True
        try:
            again = open_bag(full_bag, "d0", ETLConfig())
            for k in (2, 0, 1):
                a = lidar_points(k).reshape(-1)
                ok &= len(again.lidar.load(k)) == np.isfinite(a["x"]).sum()
                ok &= np.array_equal(drive.rgb.load(k), rgb_image(k))
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    np.testing.assert_array_equal(drive.rgb.load(1), rgb_image(1))  # parent unaffected


def test_pointcloud_errors_and_radar_without_targets():
    b = BagBuilder(False)
    cloud = b.cloud(T0, lidar_points(0))
    with pytest.raises(FrameError, match="velocity"):
        decode_pointcloud2(cloud, "radar", "here")
    cloud.data = cloud.data[:50]
    with pytest.raises(FrameError, match="truncated"):
        decode_pointcloud2(cloud, "lidar", "here")
    empty = b.cloud(T0, radar_points(0)[:0])
    assert decode_pointcloud2(empty, "radar").shape == (0, 4)
    with pytest.raises(FrameError, match="empty"):
        decode_pointcloud2(b.cloud(T0, lidar_points(0)[:, :0]), "lidar")


def test_optional_calibration_folder(tmp_path):
    b = BagBuilder(True)
    path = write_bag(tmp_path / "c.bag", "ros1", build_messages(b, ["lidar"]))
    calib = tmp_path / "c_calib"
    (calib / "camera").mkdir(parents=True)
    (calib / "radar").mkdir()
    ext = np.arange(16.0).tolist()
    (calib / "camera" / "front.json").write_text(
        f'{{"extrinsic": {ext}, "intrinsic": [1, 0, 2, 0, 1, 3, 0, 0, 1]}}')
    (calib / "radar" / "front_points.json").write_text(
        '{"translation": [1, 2, 3], "rotation": [0, 0, 0], "coordinatesOffset": [0, 0, 0]}')
    drive = open_bag(path, "c", ETLConfig())
    np.testing.assert_array_equal(drive.calib.rgb_extrinsic, np.arange(16.0).reshape(4, 4))
    assert drive.calib.rgb_intrinsic[1, 2] == 3 and drive.calib.ir_extrinsic is None
    np.testing.assert_array_equal(drive.calib.radar_to_vehicle[:3, 3], [1, 2, 3])
    (calib / "radar" / "front_points.json").write_text("{broken")
    with pytest.raises(DriveError, match="front_points.json"):
        open_bag(path, "c", ETLConfig())
