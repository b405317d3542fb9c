"""etl.bag on bags shaped like real ROS 2 recordings, written by rosbags' own writer.

The messages follow what the drivers publish, under the topic names they use:

* Velodyne (``velodyne_pointcloud``, ``/velodyne_points``): x y z intensity float32, ``ring``
  uint16, ``time`` float32 — both as the ROS 2 driver packs them (22-byte points, ``time`` at
  an unaligned offset) and through PCL's aligned point type (32 bytes, padding after z and
  after ring), one unorganized row; the raw ``/velodyne_packets`` (a custom message type).
* Ouster (``ouster-ros``, ``/ouster/points``): the organized 48-byte ``PointOS`` cloud (x y z,
  padding, intensity float32, ``t`` uint32, reflectivity/``ring``/ambient uint16, range
  uint32), where a pixel without a return is the point (0, 0, 0); beside it the driver's own
  ``/ouster/imu`` and its mono16 ``/ouster/{range,signal,reflec,nearir}_image``.
* A camera through image_transport: ``/camera/image_raw/compressed`` (CompressedImage, format
  ``bgr8; jpeg compressed bgr8``) and ``/camera/camera_info``.
* ``nmea_navsat_driver`` (``/fix``) or a GNSS receiver (``/gps/fix``): NavSatFix with an
  approximated diagonal covariance, the first fix NO_FIX with NaN lat/lon.
* An IMU filter: ``/imu/data`` (with orientation) and ``/imu/data_raw``.
* The usual company: ``/tf``, ``/tf_static``, ``/rosout``, ``/diagnostics``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from etl.bag import decode_pointcloud2, open_bag
from etl.config import ETLConfig

T0 = 1_717_000_000 * 10**9 + 123_456_789  # ns
DURATION = 0.5  # s

# (name, numpy type, offset); itemsize = point_step
VELODYNE_PACKED = ([("x", "<f4", 0), ("y", "<f4", 4), ("z", "<f4", 8), ("intensity", "<f4", 12),
                    ("ring", "<u2", 16), ("time", "<f4", 18)], 22)
VELODYNE_PCL = ([("x", "<f4", 0), ("y", "<f4", 4), ("z", "<f4", 8), ("intensity", "<f4", 16),
                 ("ring", "<u2", 20), ("time", "<f4", 24)], 32)
OUSTER = ([("x", "<f4", 0), ("y", "<f4", 4), ("z", "<f4", 8), ("intensity", "<f4", 16),
           ("t", "<u4", 20), ("reflectivity", "<u2", 24), ("ring", "<u2", 26),
           ("ambient", "<u2", 28), ("range", "<u4", 32)], 48)
DATATYPE = {"<u1": 2, "<u2": 4, "<u4": 6, "<f4": 7, "<f8": 8}  # sensor_msgs/PointField codes

VELODYNE_MSGS = {
    "velodyne_msgs/msg/VelodynePacket": "builtin_interfaces/Time stamp\nuint8[1206] data\n",
    "velodyne_msgs/msg/VelodyneScan": "std_msgs/Header header\n"
                                      "velodyne_msgs/VelodynePacket[] packets\n",
}
OUSTER_MSGS = {"ouster_sensor_msgs/msg/PacketMsg": "uint8[] buf\n"}


def point_dtype(layout) -> np.dtype:
    fields, step = layout
    return np.dtype({"names": [f[0] for f in fields], "formats": [f[1] for f in fields],
                     "offsets": [f[2] for f in fields], "itemsize": step})


def sweep(k: int, layout, rings: int = 8, cols: int = 24) -> np.ndarray:
    """One sweep (rings, cols) of points on a cylinder around the sensor, every field set;
    the padding bytes filled with 0xAB (never part of a value)."""
    dt = point_dtype(layout)
    raw = np.full((rings, cols, dt.itemsize), 0xAB, np.uint8)
    a = raw.view(dt)[..., 0]
    rng = np.random.default_rng(k)
    az = np.linspace(0, 2 * np.pi, cols, endpoint=False)[None, :] + 0.01 * k
    el = np.deg2rad(np.linspace(-15, 15, rings))[:, None]
    r = rng.uniform(3, 40, (rings, cols))
    a["x"], a["y"] = r * np.cos(el) * np.cos(az), r * np.cos(el) * np.sin(az)
    a["z"] = r * np.sin(el)
    a["intensity"] = rng.uniform(0, 255, (rings, cols))
    a["ring"] = np.arange(rings, dtype=np.uint16)[:, None]
    if "time" in dt.names:
        a["time"] = np.broadcast_to(az / (2 * np.pi) * 0.1, (rings, cols))
    if "t" in dt.names:  # ouster: ns since the start of the sweep, range in mm
        a["t"] = np.broadcast_to((az / (2 * np.pi) * 1e8).astype(np.uint32), (rings, cols))
        a["range"] = (r * 1000).astype(np.uint32)
        a["reflectivity"], a["ambient"] = rng.integers(0, 65535, (2, rings, cols))
        none = rng.random((rings, cols)) < 0.25  # no return: all zeros
        for f in ("x", "y", "z", "intensity", "range"):
            a[f][none] = 0
    return a


def xyzi(a: np.ndarray, zero_is_missing: bool = False) -> np.ndarray:
    out = np.stack([a["x"], a["y"], a["z"], a["intensity"]], -1).reshape(-1, 4)
    if zero_is_missing:
        out = out[(out[:, :3] != 0).any(1)]
    return out.astype(np.float32)


class Recorder:
    """Builds driver-shaped messages for one typestore (ROS 2 Humble or the latest)."""

    def __init__(self, store: Stores):
        self.ts = get_typestore(store)
        for name, text in {**VELODYNE_MSGS, **OUSTER_MSGS}.items():
            self.ts.register(get_types_from_msg(text, name))
        self.t = self.ts.types
        self.msgs: list[tuple[int, str, str, bytes]] = []  # (receive ns, topic, type, raw)

    def header(self, ns: int, frame: str):
        time = self.t["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)
        return self.t["std_msgs/msg/Header"](stamp=time, frame_id=frame)

    def add(self, recv: int, topic: str, msg) -> None:
        raw = bytes(self.ts.serialize_cdr(msg, msg.__msgtype__))
        self.msgs.append((recv, topic, msg.__msgtype__, raw))

    def cloud(self, ns: int, a: np.ndarray, layout, frame: str, dense: bool):
        pf = self.t["sensor_msgs/msg/PointField"]
        fields = [pf(name=n, offset=o, datatype=DATATYPE[t], count=1) for n, t, o in layout[0]]
        h, w = a.shape
        return self.t["sensor_msgs/msg/PointCloud2"](
            header=self.header(ns, frame), height=h, width=w, fields=fields,
            is_bigendian=False, point_step=layout[1], row_step=w * layout[1],
            data=np.frombuffer(a.tobytes(), np.uint8), is_dense=dense)

    def mono16(self, ns: int, img: np.ndarray, frame: str):
        h, w = img.shape
        return self.t["sensor_msgs/msg/Image"](
            header=self.header(ns, frame), height=h, width=w, encoding="mono16", is_bigendian=0,
            step=2 * w, data=np.frombuffer(img.astype("<u2").tobytes(), np.uint8))

    def jpeg(self, ns: int, data: bytes):
        return self.t["sensor_msgs/msg/CompressedImage"](
            header=self.header(ns, "camera_optical_frame"), format="bgr8; jpeg compressed bgr8",
            data=np.frombuffer(data, np.uint8))

    def camera_info(self, ns: int):
        return self.t["sensor_msgs/msg/CameraInfo"](
            header=self.header(ns, "camera_optical_frame"), height=48, width=64,
            distortion_model="plumb_bob", d=np.zeros(5),
            k=np.array([60.0, 0, 32, 0, 60, 24, 0, 0, 1]), r=np.eye(3).ravel(),
            p=np.array([60.0, 0, 32, 0, 0, 60, 24, 0, 0, 0, 1, 0]), binning_x=0, binning_y=0,
            roi=self.t["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0,
                                                           width=0, do_rectify=False))

    def navsat(self, ns: int, lat: float, lon: float, alt: float, status: int):
        st = self.t["sensor_msgs/msg/NavSatStatus"](status=status, service=1)
        cov = np.diag([1.2**2, 1.2**2, 2.4**2]).ravel()
        return self.t["sensor_msgs/msg/NavSatFix"](
            header=self.header(ns, "gps"), status=st, latitude=lat, longitude=lon,
            altitude=alt, position_covariance=cov, position_covariance_type=1)

    def imu(self, ns: int, row, frame: str, orientation: bool = True):
        v3, q = self.t["geometry_msgs/msg/Vector3"], self.t["geometry_msgs/msg/Quaternion"]
        ocov = np.full(9, 0.01) if orientation else np.r_[-1.0, np.zeros(8)]
        return self.t["sensor_msgs/msg/Imu"](
            header=self.header(ns, frame), orientation=q(x=0.0, y=0.0, z=0.383, w=0.924),
            orientation_covariance=ocov, angular_velocity=v3(x=row[0], y=row[1], z=row[2]),
            angular_velocity_covariance=np.diag([1e-4] * 3).ravel(),
            linear_acceleration=v3(x=row[3], y=row[4], z=row[5]),
            linear_acceleration_covariance=np.diag([1e-2] * 3).ravel())

    def tf(self, ns: int):
        t = self.t
        tr = t["geometry_msgs/msg/TransformStamped"](
            header=self.header(ns, "base_link"), child_frame_id="velodyne",
            transform=t["geometry_msgs/msg/Transform"](
                translation=t["geometry_msgs/msg/Vector3"](x=1.2, y=0.0, z=1.8),
                rotation=t["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0)))
        return t["tf2_msgs/msg/TFMessage"](transforms=[tr])

    def rosout(self, ns: int, text: str):
        time = self.t["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)
        return self.t["rcl_interfaces/msg/Log"](stamp=time, level=20, name="velodyne_driver",
                                                msg=text, file="driver.cpp", function="poll",
                                                line=1)

    def write(self, path: Path, storage: StoragePlugin) -> Path:
        self.msgs.sort(key=lambda m: m[0])
        with Writer(path, version=9, storage_plugin=storage) as w:
            conns = {}
            for _, topic, msgtype, _ in self.msgs:
                if topic not in conns:
                    conns[topic] = w.add_connection(topic, msgtype, typestore=self.ts)
            for recv, topic, _, raw in self.msgs:
                w.write(conns[topic], recv, raw)
        return path


def stamps(hz: float, phase: float) -> list[int]:
    n = int(DURATION * hz)
    return [T0 + round((phase + k / hz) * 1e9) + (k * 7919 % 13) * 10_000 for k in range(n)]


def seconds(ns) -> np.ndarray:
    ns = np.asarray(ns, np.int64)
    return (ns // 10**9).astype(np.float64) + (ns % 10**9).astype(np.float64) * 1e-9


def camera_frame(k: int) -> bytes:
    img = np.zeros((48, 64, 3), np.uint8)
    img[..., 0] = np.arange(64, dtype=np.uint8)[None, :] * 3  # blue ramp (BGR order)
    img[..., 2] = 40 * (k % 6)
    return cv2.imencode(".jpg", img)[1].tobytes()


def imu_row(k: int, scale: float = 1.0):
    return (0.01 * k * scale, -0.02 * k, 0.3, 0.1 * k, 0.2, 9.81 * scale)


def record(rec: Recorder, lidar: str, gps_topic: str) -> dict:
    """Fill ``rec`` with one drive: ``lidar`` 'velodyne' or 'ouster'. The ground truth back."""
    truth: dict = {"clouds": [], "frames": [], "gps": [], "imu": []}
    layout = {"velodyne": VELODYNE_PCL, "ouster": OUSTER}[lidar]
    for k, ns in enumerate(stamps(10, 0.013)):  # 10 Hz sweeps, stamped at the sweep's end
        a = sweep(k, layout)
        if lidar == "velodyne":
            a = a.reshape(1, -1)  # the driver's unorganized cloud: one row
            rec.add(ns + 4_000_000, "/velodyne_points",
                    rec.cloud(ns, a, layout, "velodyne", dense=True))
            pkt = rec.t["velodyne_msgs/msg/VelodynePacket"](
                stamp=rec.header(ns, "").stamp, data=np.full(1206, k, np.uint8))
            rec.add(ns + 1_000_000, "/velodyne_packets", rec.t["velodyne_msgs/msg/VelodyneScan"](
                header=rec.header(ns, "velodyne"), packets=[pkt, pkt]))
        else:
            rec.add(ns + 6_000_000, "/ouster/points",
                    rec.cloud(ns, a, layout, "os_sensor", dense=True))
            for kind in ("range", "signal", "reflec", "nearir"):
                img = (np.arange(a.size).reshape(a.shape) * (k + 1)).astype(np.uint16)
                rec.add(ns + 7_000_000, f"/ouster/{kind}_image", rec.mono16(ns, img, "os_sensor"))
            rec.add(ns + 2_000_000, "/ouster/lidar_packets",
                    rec.t["ouster_sensor_msgs/msg/PacketMsg"](buf=np.full(64, k, np.uint8)))
        truth["clouds"].append((ns, xyzi(a, zero_is_missing=lidar == "ouster")))
    for k, ns in enumerate(stamps(15, 0.021)):
        data = camera_frame(k)
        rec.add(ns + 9_000_000, "/camera/image_raw/compressed", rec.jpeg(ns, data))
        rec.add(ns + 9_000_000, "/camera/camera_info", rec.camera_info(ns))
        img = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), 1), cv2.COLOR_BGR2RGB)
        truth["frames"].append((ns, img))
    for k, ns in enumerate(stamps(5, 0.05)):
        lat, lon, alt = 43.2286 + 1e-5 * k, -79.9390 - 2e-5 * k, 91.5 + 0.1 * k
        if k == 0:  # the receiver's first sentence: no fix yet
            rec.add(ns + 20_000_000, gps_topic, rec.navsat(ns, np.nan, np.nan, np.nan, -1))
            continue
        rec.add(ns + 20_000_000, gps_topic, rec.navsat(ns, lat, lon, alt, 0))
        truth["gps"].append((ns, (lat, lon, alt)))
    for k, ns in enumerate(stamps(50, 0.002)):  # the vehicle's IMU, through an IMU filter
        rec.add(ns + 1_000_000, "/imu/data", rec.imu(ns, imu_row(k), "imu_link"))
        rec.add(ns + 1_000_000, "/imu/data_raw", rec.imu(ns, imu_row(k), "imu_link", False))
        truth["imu"].append((ns, imu_row(k)))
    if lidar == "ouster":  # the LiDAR's own IMU, at twice the rate: not the vehicle's
        for k, ns in enumerate(stamps(100, 0.004)):
            rec.add(ns + 1_000_000, "/ouster/imu", rec.imu(ns, imu_row(k, 2.0), "os_imu", False))
    rec.add(T0, "/tf_static", rec.tf(T0))
    for ns in stamps(20, 0.0):
        rec.add(ns, "/tf", rec.tf(ns))
    rec.add(T0 + 1, "/rosout", rec.rosout(T0, "Velodyne VLP-32C rotating at 600 RPM"))
    st = rec.t["diagnostic_msgs/msg/DiagnosticStatus"](level=b"\x00"[0], name="driver",
                                                     message="ok", hardware_id="lidar",
                                                     values=[])
    rec.add(T0 + 2, "/diagnostics", rec.t["diagnostic_msgs/msg/DiagnosticArray"](
        header=rec.header(T0, ""), status=[st]))
    return truth


DRIVES = {  # name: (lidar, GPS topic, storage, typestore)
    "velodyne_humble_sqlite3": ("velodyne", "/fix", StoragePlugin.SQLITE3, Stores.ROS2_HUMBLE),
    "ouster_latest_mcap": ("ouster", "/gps/fix", StoragePlugin.MCAP, Stores.LATEST),
}


@pytest.fixture(scope="module", params=sorted(DRIVES))
def driver_bag(request, tmp_path_factory):
    lidar, gps_topic, storage, store = DRIVES[request.param]
    rec = Recorder(store)
    truth = record(rec, lidar, gps_topic)
    path = rec.write(tmp_path_factory.mktemp(request.param) / "rosbag2_2024_05_29-16_26_40",
                     storage)
    return path, lidar, gps_topic, truth


def test_driver_topics_are_found_by_their_usual_names(driver_bag):
    path, lidar, gps_topic, _ = driver_bag
    drive = open_bag(path, "d", ETLConfig())
    lidar_topic = {"velodyne": "/velodyne_points", "ouster": "/ouster/points"}[lidar]
    assert drive.lidar.names[0].startswith(f"{lidar_topic}@")
    assert drive.rgb.names[0].startswith("/camera/image_raw/compressed@")
    assert drive.radar is None and drive.ir is None
    # the LiDAR's own images are not a camera, nor is its internal IMU the vehicle's
    assert not any("candidate rgb" in w for w in drive.warnings), drive.warnings
    assert not any("candidate lidar" in w or "candidate gps" in w for w in drive.warnings)
    unused = [w for w in drive.warnings if "topics not used" in w]
    assert len(unused) == 1
    for topic in ("/camera/camera_info", "/tf", "/tf_static", "/rosout", "/diagnostics",
                  "/imu/data_raw"):
        assert f"{topic} [" in unused[0]
    if lidar == "ouster":
        for topic in ("/ouster/imu", "/ouster/range_image", "/ouster/nearir_image"):
            assert f"{topic} [" in unused[0]
    else:
        assert "/velodyne_packets [velodyne_msgs/msg/VelodyneScan]" in unused[0]


def test_driver_messages_decode_to_the_recorded_values(driver_bag):
    path, lidar, _, truth = driver_bag
    drive = open_bag(path, "d", ETLConfig())

    np.testing.assert_array_equal(drive.lidar.times, seconds([ns for ns, _ in truth["clouds"]]))
    for i, (_, want) in enumerate(truth["clouds"]):
        got = drive.lidar.load(i)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)  # padding and ring/time never leak in
    if lidar == "ouster":  # a pixel without a return is no point at the sensor's origin
        assert (np.abs(drive.lidar.load(0)[:, :3]).sum(1) > 0).all()
        assert len(drive.lidar.load(0)) < 8 * 24

    np.testing.assert_array_equal(drive.rgb.times, seconds([ns for ns, _ in truth["frames"]]))
    for i in (0, 3, len(truth["frames"]) - 1):
        np.testing.assert_array_equal(drive.rgb.load(i), truth["frames"][i][1])

    np.testing.assert_array_equal(drive.gps.times, seconds([ns for ns, _ in truth["gps"]]))
    np.testing.assert_array_equal(drive.gps.values, [v for _, v in truth["gps"]])
    assert any("1 fixes with status NO_FIX" in w for w in drive.warnings)

    np.testing.assert_array_equal(drive.imu.times, seconds([ns for ns, _ in truth["imu"]]))
    np.testing.assert_array_equal(drive.imu.values, [v for _, v in truth["imu"]])


@pytest.mark.parametrize("layout", [VELODYNE_PACKED, VELODYNE_PCL, OUSTER],
                         ids=["velodyne_ros2_packed", "velodyne_pcl_aligned", "ouster_os"])
def test_pointcloud2_fields_at_their_offsets(layout):
    """Field offsets come from the message, not from an assumed packing: the same sweep in
    each driver's layout decodes to the same x y z intensity, whatever sits in the padding
    and in ring/time; the listed order of the fields does not matter."""
    rec = Recorder(Stores.ROS2_HUMBLE)
    a = sweep(3, layout)
    msg = rec.cloud(T0, a, layout, "sensor", dense=False)
    msg.fields = msg.fields[::-1]
    ouster = layout is OUSTER
    np.testing.assert_array_equal(decode_pointcloud2(msg, "lidar"), xyzi(a, ouster))
    if not ouster:  # a NaN point (a Velodyne's organized cloud without a return) is dropped
        a["x"][2, 5] = np.nan
        msg = rec.cloud(T0, a, layout, "sensor", dense=False)
        np.testing.assert_array_equal(decode_pointcloud2(msg, "lidar"),
                                      np.delete(xyzi(a), 2 * 24 + 5, axis=0))
