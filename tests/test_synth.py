"""The synthetic drives (etl.synth): layouts, determinism and cross-modal ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from etl import synth
from etl.pcd import read_pcd
from etl.preprocess import G, geodetic_to_enu, nmea_to_degrees, project_to_image

SEED = 3
FRAMES = 24  # frames 0–19 labelled, 20–23 not (labels come in blocks of ten)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cmht_raw"
    synth.generate(out, drives=1, frames=FRAMES, fmt="both", seed=SEED, verbose=False)
    return out


def _scene(raw: Path) -> tuple[Path, dict]:
    (truth_file,) = (raw / "_truth").glob("drive_*/*.json")
    truth = json.loads(truth_file.read_text())
    return raw / truth["drive_id"], truth


def _bag_truth(raw: Path) -> dict:
    (truth_file,) = (raw / "_truth").glob("rosbag2_*.json")
    return json.loads(truth_file.read_text())


def _ego_at(truth: dict, t: float):
    e = truth["ego"]
    f = lambda k: float(np.interp(t, e["t"], e[k]))
    yaw = float(np.interp(t, e["t"], np.unwrap(e["yaw"])))
    return f("east"), f("north"), yaw, f("speed"), f("yaw_rate")


def _obj_at(obj: dict, t: float):
    tr = obj["track"]
    if not tr["t"] or not tr["t"][0] <= t <= tr["t"][-1]:
        return None
    f = lambda k: float(np.interp(t, tr["t"], tr[k]))
    return (
        f("east"),
        f("north"),
        float(np.interp(t, tr["t"], np.unwrap(tr["yaw"]))),
        f("vx"),
        f("vy"),
    )


def _to_lidar(ego, east, north):
    x0, y0, yaw = ego[:3]
    c, s = np.cos(yaw), np.sin(yaw)
    dx, dy = np.asarray(east) - x0, np.asarray(north) - y0
    return c * dx + s * dy, -s * dx + c * dy


def _times(scene: Path) -> np.ndarray:
    return np.loadtxt(scene / "Gps_Imu/data/timestamp.txt", dtype=np.int64) / 1000.0


# --------------------------------------------------------------------------- layout
def test_scene_layout(raw):
    scene, truth = _scene(raw)
    assert scene.parent.name.startswith("drive_") and scene.name.startswith("drive_")
    names = lambda d, ext: sorted(p.name for p in (scene / d).glob(f"*.{ext}"))
    want = [f"{i:08d}" for i in range(FRAMES)]
    for d, ext in (("lidar", "pcd"), ("radar/front_points", "pcd"), ("camera/front", "jpg"),
                   ("camera/ir", "jpg")):  # fmt: skip
        assert names(d, ext) == [f"{w}.{ext}" for w in want], d
    txt = [n for n in names("Gps_Imu/data", "txt") if n != "timestamp.txt"]
    assert txt == [f"{w}.txt" for w in want]
    assert len(_times(scene)) == FRAMES
    assert len((scene / "Gps_Imu/dataformat.txt").read_text().splitlines()) == 8
    for cam in ("front", "ir"):
        c = json.loads((scene / f"calib/camera/{cam}.json").read_text())
        assert len(c["extrinsic"]) == 16 and len(c["intrinsic"]) == 9
    assert set(json.loads((scene / "calib/radar/front_points.json").read_text())) == {
        "translation", "rotation", "coordinatesOffset"}  # fmt: skip
    labels = names("label", "json")
    assert labels == [f"{i:08d}.json" for i in truth["labelled_frames"]]
    assert 0 < len(labels) < FRAMES
    rgb = cv2.imread(str(scene / "camera/front/00000000.jpg"), cv2.IMREAD_UNCHANGED)
    ir = cv2.imread(str(scene / "camera/ir/00000000.jpg"), cv2.IMREAD_UNCHANGED)
    assert rgb.shape == (720, 1280, 3) and ir.shape == (480, 640)
    # the ground truth sits outside every drive, in a folder no reader takes for a drive
    truth_dir = raw / "_truth"
    assert not any((p / "lidar").exists() or (p / "Gps_Imu").exists()
                   for p in truth_dir.rglob("*") if p.is_dir())  # fmt: skip
    assert not list(truth_dir.rglob("*.db3")) and not list(truth_dir.rglob("metadata.yaml"))
    bag = raw / _bag_truth(raw)["drive_id"]
    assert (bag / "metadata.yaml").exists() and list(bag.glob("*.db3"))


def test_deterministic(raw, tmp_path):
    # the two drives (scene and bag) in two processes: the same bytes as one process wrote
    again = tmp_path / "again"
    synth.generate(again, drives=1, frames=FRAMES, fmt="both", seed=SEED, verbose=False,
                   workers=2)
    files = sorted(p.relative_to(raw) for p in raw.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (raw / f).read_bytes() == (again / f).read_bytes(), f


# --------------------------------------------------------------------------- sensors
def test_pcd_fields(raw):
    scene, _ = _scene(raw)
    lidar = read_pcd(scene / "lidar/00000005.pcd")
    assert list(lidar) == ["x", "y", "z", "intensity", "ring", "time"]
    assert 15_000 < len(lidar["x"]) < 35_000
    assert lidar["ring"].min() == 0 and lidar["ring"].max() == 31
    assert 0 <= lidar["time"].min() and lidar["time"].max() < 0.1
    ground = np.abs(lidar["z"] + synth.LIDAR_HEIGHT) < 0.1
    assert ground.mean() > 0.5  # most returns are the road
    radar = read_pcd(scene / "radar/front_points/00000005.pcd")
    assert list(radar) == ["x", "y", "z", "velocity"]
    assert 10 <= len(radar["x"]) <= 90
    assert np.all(radar["x"] > 0)  # a front radar


def test_gps_imu_round_trip(raw):
    scene, truth = _scene(raw)
    o = truth["origin"]
    for i, t in enumerate(_times(scene)):
        lines = (scene / f"Gps_Imu/data/{i:08d}.txt").read_text().split()
        assert len(lines) == 8
        lat, lon = nmea_to_degrees(float(lines[0])), nmea_to_degrees(float(lines[1]))
        assert len(lines[0].split(".")[1]) == 4
        e, n, _ = geodetic_to_enu(lat, lon, 0.0, o["lat"], o["lon"], 0.0)
        ego = _ego_at(truth, t)
        assert np.hypot(e - ego[0], n - ego[1]) < 0.6, (i, e, n, ego)
        gyro_z, acc = float(lines[4]), np.array(lines[5:], float)
        assert abs(gyro_z - ego[4]) < 0.05
        assert abs(acc[2] + 1.0) < 0.1  # the real files' sign: z reads about -1 G
        assert abs(acc[1] * G - ego[3] * ego[4]) < 0.6


def test_timestamps_jitter_and_drops(raw):
    scene, truth = _scene(raw)
    d = np.diff(_times(scene))
    assert np.all(d > 0)
    assert len(np.unique(np.round(d[d < 0.15] * 1000))) >= 2  # ms jitter
    assert (d > 0.15).sum() >= 1  # a dropped frame shows as a gap
    assert truth["streams"]["lidar"]["dropped"] >= 1


def test_labelled_vehicle_in_lidar_rgb_and_ir(raw):
    scene, truth = _scene(raw)
    world = synth.world_from_truth(truth)
    times = _times(scene)
    calib = json.loads((scene / "calib/camera/front.json").read_text())
    ext, intr = np.reshape(calib["extrinsic"], (4, 4)), np.reshape(calib["intrinsic"], (3, 3))
    ir_calib = json.loads((scene / "calib/camera/ir.json").read_text())
    ir_ext, ir_intr = (
        np.reshape(ir_calib["extrinsic"], (4, 4)),
        np.reshape(ir_calib["intrinsic"], (3, 3)),
    )
    checked = 0
    for i in truth["labelled_frames"][::2]:
        boxes = json.loads((scene / f"label/{i:08d}.json").read_text())
        pts = read_pcd(scene / f"lidar/{i:08d}.pcd")
        xyz = np.stack([pts["x"], pts["y"], pts["z"]], 1)
        for b in boxes:
            p, s, yaw = b["psr"]["position"], b["psr"]["scale"], b["psr"]["rotation"]["z"]
            c, sn = np.cos(yaw), np.sin(yaw)
            dx, dy = xyz[:, 0] - p["x"], xyz[:, 1] - p["y"]
            inside = ((np.abs(c * dx + sn * dy) <= s["x"] / 2 + 0.05)
                      & (np.abs(-sn * dx + c * dy) <= s["y"] / 2 + 0.05)
                      & (np.abs(xyz[:, 2] - p["z"]) <= s["z"] / 2 + 0.05))  # fmt: skip
            assert inside.sum() >= 4, (i, b["obj_id"])
            # the box agrees with the truth track
            obj = next(o for o in truth["objects"] if o["obj_id"] == b["obj_id"])
            st = _obj_at(obj, times[i])
            lx, ly = _to_lidar(_ego_at(truth, times[i]), st[0], st[1])
            assert np.hypot(lx - p["x"], ly - p["y"]) < 0.3
            in_view = [
                q["psr"]["position"]["x"]
                for q in boxes
                if 8 < q["psr"]["position"]["x"] < 45
                and abs(q["psr"]["position"]["y"]) < 0.3 * q["psr"]["position"]["x"]
            ]
            if not in_view or p["x"] != min(in_view):
                continue  # only the nearest vehicle in view: the others may be occluded
            # projected with the written calibration, the vehicle is where the image shows it
            corners = np.array(
                [[sx * s["x"] / 2, sy * s["y"] / 2, sz * s["z"] / 2]
                 for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]
            )  # fmt: skip
            rot = np.array([[c, -sn, 0], [sn, c, 0], [0, 0, 1]])
            corners = corners @ rot.T + [p["x"], p["y"], p["z"]]
            uv, depth = project_to_image(corners, ext, intr)
            assert np.all(depth > 0)
            (u0, v0), (u1, v1) = uv.min(0), uv.max(0)
            du, dv = 0.2 * (u1 - u0), 0.2 * (v1 - v0)  # the inner part of the projected box
            rows = slice(max(int(v0 + dv), 0), min(int(v1 - dv), 720))
            cols = slice(max(int(u0 + du), 0), min(int(u1 - du), 1280))
            assert rows.stop - rows.start > 3 and cols.stop - cols.start > 3
            rgb = cv2.cvtColor(cv2.imread(str(scene / f"camera/front/{i:08d}.jpg")),
                               cv2.COLOR_BGR2RGB).astype(float)  # fmt: skip
            snap = world.snapshot(float(times[i] - truth["clock_start_s"]))
            bg = synth.render_camera(world, snap, "rgb", np.random.default_rng(0), objects=False)
            bg = bg.astype(float)
            assert np.abs(rgb[rows, cols] - bg[rows, cols]).mean() > 8, (i, b)
            assert np.abs(rgb[-40:, 400:880] - bg[-40:, 400:880]).mean() < 8  # bare road
            body = np.array([[p["x"], p["y"], p["z"] - s["z"] / 4]])  # below the cool windows
            iu, iv = project_to_image(body, ir_ext, ir_intr)[0][0]
            assert 2 <= iu < 638 and 2 <= iv < 478
            ir = cv2.imread(str(scene / f"camera/ir/{i:08d}.jpg"), cv2.IMREAD_UNCHANGED)
            warm = ir[int(iv) - 2 : int(iv) + 3, int(iu) - 2 : int(iu) + 3].mean()
            assert warm > np.median(ir) + 40, (i, b)  # vehicles are warm
            checked += 1
    assert checked >= 2


def test_radar_doppler_matches_truth(raw):
    scene, truth = _scene(raw)
    times = _times(scene)
    ro = np.array(truth["frames"]["radar_origin_in_lidar"])
    errors = []
    for i in range(0, FRAMES, 2):
        t = times[i]
        ego = _ego_at(truth, t)
        radar = read_pcd(scene / f"radar/front_points/{i:08d}.pcd")
        pts = np.stack([radar["x"], radar["y"], radar["z"]], 1).astype(float)
        v_radar = np.array([ego[3] - ego[4] * ro[1], ego[4] * ro[0], 0.0])
        for obj in truth["objects"]:
            st = _obj_at(obj, t)
            if st is None:
                continue
            lx, ly = _to_lidar(ego, st[0], st[1])
            yaw = st[2] - ego[2]
            c, s = np.cos(yaw), np.sin(yaw)
            dx, dy = pts[:, 0] - lx, pts[:, 1] - ly
            near = ((np.abs(c * dx + s * dy) < obj["size"][0] / 2 + 0.6)
                    & (np.abs(-s * dx + c * dy) < obj["size"][1] / 2 + 0.6))  # fmt: skip
            if not near.any():
                continue
            cy, sy = np.cos(ego[2]), np.sin(ego[2])
            v_obj = np.array([cy * st[3] + sy * st[4], -sy * st[3] + cy * st[4], 0.0])
            los = pts[near] - ro
            los /= np.linalg.norm(los, axis=1, keepdims=True)
            expected = (los * (v_obj - v_radar)).sum(1)
            errors.append(np.abs(radar["velocity"][near] - expected))
    errors = np.concatenate(errors)
    assert len(errors) >= 20
    assert np.median(errors) < 0.25 and np.mean(errors < 1.0) > 0.9


# --------------------------------------------------------------------------- bags
def test_bag_streams(raw):
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_typestore

    truth = _bag_truth(raw)
    ts = get_typestore(Stores.ROS2_HUMBLE)
    stamps: dict[str, list[float]] = {}
    log_times: dict[str, list[int]] = {}
    with Reader(raw / truth["drive_id"]) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        for conn, log_ns, data in reader.messages():
            if conn.msgtype == "tf2_msgs/msg/TFMessage":
                continue
            msg = ts.deserialize_cdr(data, conn.msgtype)
            st = msg.header.stamp
            stamps.setdefault(conn.topic, []).append(st.sec + st.nanosec * 1e-9)
            log_times.setdefault(conn.topic, []).append(log_ns)
            if conn.topic == "/velodyne_points" and len(stamps[conn.topic]) == 1:
                assert [f.name for f in msg.fields] == ["x", "y", "z", "intensity", "ring",
                                                        "time"]  # fmt: skip
                assert msg.width > 15_000
    assert types["/velodyne_points"] == "sensor_msgs/msg/PointCloud2"
    assert types["/thermal/image_raw"] == "sensor_msgs/msg/Image"
    assert types["/camera/front/image_raw/compressed"] == "sensor_msgs/msg/CompressedImage"
    rates = {}
    for name, st in truth["streams"].items():
        topic = st["topic"]
        s = np.array(stamps[topic])
        assert np.allclose(s, st["times"], atol=1e-6), name  # header stamps = truth
        assert np.all(np.diff(log_times[topic]) >= 0)
        gaps = np.diff(s)
        rates[name] = 1.0 / np.median(gaps)
        assert abs(rates[name] - st["rate_hz"]) < 0.05 * st["rate_hz"], name
        assert np.std(gaps) > 0  # jitter
    assert len({round(r, 1) for r in rates.values()}) == len(rates)  # distinct rates
    assert sum(st["dropped"] for st in truth["streams"].values()) >= 2
    # each stream has its own phase
    firsts = [truth["streams"][m]["times"][0] for m in ("lidar", "radar", "rgb", "ir")]
    assert len(set(np.round(firsts, 4))) == 4


@pytest.mark.parametrize("storage", ["mcap", "ros1"])
def test_other_bag_storages(tmp_path, storage):
    from rosbags.highlevel import AnyReader

    synth.generate(tmp_path, drives=1, frames=3, fmt="bag", seed=1, storage=storage,
                   verbose=False)  # fmt: skip
    (truth_file,) = (tmp_path / "_truth").glob("*.json")
    path = tmp_path / json.loads(truth_file.read_text())["drive_id"]
    with AnyReader([path]) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
        conn = next(c for c in reader.connections if c.topic == "/gps/fix")
        _, _, data = next(reader.messages(connections=[conn]))
        fix = reader.deserialize(data, conn.msgtype)
    assert counts["/imu/data"] > 5 * counts["/velodyne_points"] > 0
    assert abs(fix.latitude - synth.ORIGIN_LAT) < 0.05


def test_geodesy_helpers():
    assert synth.degrees_to_nmea(43.22866) == "4313.7196"
    assert synth.degrees_to_nmea(-79.93905) == "-7956.3430"
    assert abs(nmea_to_degrees(float(synth.degrees_to_nmea(-79.939050))) + 79.93905) < 1e-6
    lat, lon, alt = synth.enu_to_geodetic(120.0, -340.0, 2.0, 43.2288, -79.939, 95.0)
    enu = geodetic_to_enu(lat, lon, alt, 43.2288, -79.939, 95.0)
    assert np.allclose(enu, [120.0, -340.0, 2.0], atol=1e-4)
