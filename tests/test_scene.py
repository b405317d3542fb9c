"""Camera images, CMHT scene folders (a small hand-made one) and the real CMHT sample."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from etl.config import ETLConfig, SceneLayout
from etl.errors import DriveError, FrameError
from etl.images import decode_image, read_image
from etl.pcd import write_pcd
from etl.preprocess import G
from etl.scene import SceneWarning, find_scenes, open_scene, read_calibration, scene_frames

SAMPLE = Path(__file__).parents[1].parent / "shared/data/cmht_sample"
SAMPLE_SCENE = SAMPLE / "drive_dusk_clear_0/drive_dusk_1"


# --------------------------------------------------------------------------- images
def _rgb_image(h=48, w=64):
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2, 0] = 255  # left half red (RGB order)
    img[:, w // 2 :, 2] = 255  # right half blue
    return img


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_read_rgb_is_rgb_order(tmp_path, ext):
    p = tmp_path / f"a{ext}"
    cv2.imwrite(str(p), cv2.cvtColor(_rgb_image(), cv2.COLOR_RGB2BGR))
    img = read_image(p, "rgb")
    assert img.dtype == np.uint8 and img.shape == (48, 64, 3)
    assert img[10, 5, 0] > 200 and img[10, 5, 2] < 50
    assert img[10, 60, 2] > 200 and img[10, 60, 0] < 50
    assert np.array_equal(read_image(p.read_bytes(), "rgb"), img)


def test_read_ir_modes(tmp_path):
    ir16 = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "ir16.png"), ir16)
    out = read_image(tmp_path / "ir16.png", "ir")
    assert out.dtype == np.uint16 and np.array_equal(out, ir16)
    ir8 = np.tile(np.arange(40, dtype=np.uint8) * 6, (30, 1))
    cv2.imwrite(str(tmp_path / "ir8.jpg"), ir8)
    out = read_image(tmp_path / "ir8.jpg", "ir")
    assert out.dtype == np.uint8 and out.shape == (30, 40)
    assert np.abs(out.astype(int) - ir8).max() < 8
    cv2.imwrite(str(tmp_path / "irc.png"), np.dstack([ir8] * 3))  # grey stored as colour
    out = read_image(tmp_path / "irc.png", "ir")
    assert out.shape == (30, 40) and np.array_equal(out, ir8)
    # grey image asked for as rgb: expanded to 3 channels
    assert read_image(tmp_path / "ir8.jpg", "rgb").shape == (30, 40, 3)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_and_corrupt_images(tmp_path, ext):
    p = tmp_path / f"a{ext}"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(p), rng.integers(0, 256, (120, 160, 3)).astype(np.uint8))
    data = p.read_bytes()
    q = tmp_path / f"cut{ext}"
    q.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(FrameError, match="truncated") as e:
        read_image(q)
    assert str(e.value).startswith(str(q) + ": ")
    q.write_bytes(data[:20] + bytes(len(data) - 20))  # header kept, body zeroed
    with pytest.raises(FrameError):
        read_image(q, "ir")
    q.write_bytes(b"")
    with pytest.raises(FrameError, match="empty file"):
        read_image(q)
    q.write_bytes(b"definitely not an image")
    with pytest.raises(FrameError, match="cannot decode"):
        read_image(q)
    with pytest.raises(FrameError, match="cannot read"):
        read_image(tmp_path / "missing.jpg")
    with pytest.raises(ValueError):
        decode_image(data, "depth")


# --------------------------------------------------------------------------- a small scene
# frame:      0    1    2    3    4    5    6     7     8     9
STAMPS_MS = [1000, 1100, 1200, 1200, 1400, 1350, 1500, 1900, 2000, 2100]
# frame 3 duplicates 2, frame 5 steps back: both dropped; the 1500 → 1900 gap stays a gap.
KEPT = [0, 1, 2, 4, 6, 7, 8, 9]


def _gps_lines(i):
    return [4313.7196 + i * 0.001, -7956.343 - i * 0.001, 0.01, 0.02, 0.03 * i, 0.1, -0.2, -1.0]


def _write_scene(root: Path, *, lidar=True, stray=True) -> Path:
    scene = root / "drive_a" / "drive_a_1"
    data = scene / "Gps_Imu" / "data"
    data.mkdir(parents=True)
    (data / "timestamp.txt").write_text("\n".join(str(s) for s in STAMPS_MS))
    for i in range(10):
        if i == 6:
            continue  # missing GPS file
        text = "\n".join(repr(v) for v in _gps_lines(i))
        if i == 7:
            text = "4313.7\n-7956.3\n0.1"  # broken: 3 values
        (data / f"{i:08d}.txt").write_text(text)
    rng = np.random.default_rng(0)
    if lidar:
        (scene / "lidar").mkdir()
        for i in range(10):
            if i == 8:
                continue  # dropped sweep
            n = 100 + i
            f = {
                "x": rng.normal(0, 10, n).astype(np.float32),
                "y": rng.normal(0, 10, n).astype(np.float32),
                "z": rng.normal(0, 1, n).astype(np.float32),
                "intensity": np.full(n, i, np.float32),
                "ring": rng.integers(0, 32, n).astype(np.uint16),
            }
            write_pcd(scene / "lidar" / f"{i:08d}.pcd", f, "binary")
        (scene / "lidar" / "00000001.pcd").write_bytes(b"VERSION 0.7\nFIELDS x")  # corrupt
    radar = scene / "radar" / "front_points"
    radar.mkdir(parents=True)
    for i in (0, 2, 4):
        f = {k: np.arange(5, dtype=np.float32) for k in "xyz"}
        f["velocity"] = np.full(5, -3.0 * i, np.float32)
        write_pcd(radar / f"{i:08d}.pcd", f, "binary_compressed")
    front = scene / "camera" / "front"
    front.mkdir(parents=True)
    for i in (0, 1, 2, 9):
        cv2.imwrite(str(front / f"{i:08d}.jpg"), cv2.cvtColor(_rgb_image(), cv2.COLOR_RGB2BGR))
    (front / "notes.txt").write_text("not a frame")
    # no camera/ir folder at all
    cam = scene / "calib" / "camera"
    cam.mkdir(parents=True)
    ext = np.eye(4)
    ext[:3, 3] = [0.1, 0.2, 0.3]
    (cam / "front.json").write_text(json.dumps(
        {"extrinsic": ext.ravel().tolist(), "intrinsic": [700, 0, 640, 0, 700, 360, 0, 0, 1]}
    ))  # fmt: skip
    if stray:
        (cam / "front (copy).json").write_text("{ not even json")
    (scene / "calib" / "radar").mkdir()
    (scene / "calib" / "radar" / "front_points.json").write_text(json.dumps(
        {"translation": [1.0, 0, 0.5], "rotation": [0, 0, np.pi / 2],
         "coordinatesOffset": [0.25, 0, 0]}
    ))  # fmt: skip
    label = scene / "label"
    label.mkdir()
    box = {"obj_id": "1", "obj_type": "Car", "psr": {
        "position": {"x": 5, "y": 1, "z": 0}, "rotation": {"x": 0, "y": 0, "z": 0.3},
        "scale": {"x": 4, "y": 2, "z": 1.5}}}  # fmt: skip
    (label / "00000000.json").write_text(json.dumps([box, box]))
    (label / "00000002.json").write_text(json.dumps([box, {"obj_id": "2"}]))  # one malformed
    (label / "00000004.json").write_text("[{broken")
    return scene


def test_find_scenes(tmp_path):
    s1 = _write_scene(tmp_path / "raw")
    s2 = tmp_path / "raw" / "b" / "c" / "scene2"
    (s2 / "lidar").mkdir(parents=True)
    (tmp_path / "raw" / "empty" / "x").mkdir(parents=True)
    assert find_scenes(tmp_path / "raw") == [s2, s1]  # sorted paths
    assert find_scenes(s1) == [s1]
    lay = SceneLayout(lidar="velodyne", gps_imu="nope")
    assert find_scenes(tmp_path / "raw", lay) == []


def test_small_scene(tmp_path):
    scene = _write_scene(tmp_path)
    d = open_scene(scene, "drive_a/drive_a_1", ETLConfig())
    assert d.drive_id == "drive_a/drive_a_1" and d.path == str(scene)
    w = "\n".join(d.warnings)
    assert "2 frames with duplicate or backward timestamps dropped" in w
    assert "front (copy).json: ignored calibration file" in w
    assert "camera/ir: missing ir folder" in w
    assert "2 of 8 GPS/IMU files skipped" in w and "00000006.txt" in w
    assert "1 files not named like a rgb frame" in w
    assert all("\n" not in x for x in d.warnings)

    # LiDAR: frames with a file, kept stamps only; gap 1.5 → 1.9 s preserved
    frames = scene_frames(d)
    assert frames["lidar"] == [0, 1, 2, 4, 6, 7, 9]
    np.testing.assert_allclose(d.lidar.times, [1.0, 1.1, 1.2, 1.4, 1.5, 1.9, 2.1])
    assert np.all(np.diff(d.lidar.times) > 0)
    pts = d.lidar.load(0)
    assert pts.dtype == np.float32 and pts.shape == (100, 4) and (pts[:, 3] == 0).all()
    assert d.lidar.load(3)[0, 3] == 4  # index 3 → frame 4
    with pytest.raises(FrameError) as e:
        d.lidar.load(1)
    assert str(e.value).startswith(d.lidar.names[1] + ": ")
    assert d.lidar.names[1].endswith("lidar/00000001.pcd")

    # radar (binary_compressed), rgb; ir absent
    assert frames["radar"] == [0, 2, 4]
    np.testing.assert_array_equal(d.radar.load(2)[:, 3], -12.0)
    assert frames["rgb"] == [0, 1, 2, 9]
    img = d.rgb.load(3)
    assert img.shape == (48, 64, 3) and img[5, 5, 0] > 200
    assert d.ir is None

    # GPS / IMU: frames 3, 5 (bad stamps), 6 (missing), 7 (broken) skipped
    np.testing.assert_allclose(d.gps.times, [1.0, 1.1, 1.2, 1.4, 2.0, 2.1])
    assert d.gps.values.shape == (6, 3) and d.imu.values.shape == (6, 6)
    np.testing.assert_allclose(d.gps.values[0], [43.228660, -79.939050, 0.0], atol=1e-6)
    # z flipped into the contract's z-up specific force (the file's −1 G at rest → +G)
    np.testing.assert_allclose(d.imu.values[0], [0.01, 0.02, 0.0, 0.1 * G, -0.2 * G, G])
    np.testing.assert_allclose(d.imu.values[3, 2], 0.12)  # frame 4's gyro z

    # calibration
    np.testing.assert_allclose(d.calib.rgb_extrinsic[:3, 3], [0.1, 0.2, 0.3])
    assert d.calib.rgb_intrinsic[0, 2] == 640 and d.calib.ir_extrinsic is None
    r = d.calib.radar_to_vehicle
    np.testing.assert_allclose(r[:3, 3], [1.25, 0, 0.5])
    np.testing.assert_allclose(r[:3, :3] @ [1, 0, 0], [0, 1, 0], atol=1e-12)

    # labels: by LiDAR stream index
    assert len(d.labels(0)) == 2
    assert d.labels(1) is None
    with pytest.warns(SceneWarning, match="1 malformed boxes dropped"):
        assert len(d.labels(2)) == 1
    with pytest.warns(SceneWarning, match="00000004.json: broken label JSON"):
        assert d.labels(3) is None
    assert d.labels(99) is None


def test_scene_gps_only_flag_and_missing_lidar(tmp_path):
    scene = _write_scene(tmp_path, lidar=False)
    d = open_scene(scene, "a", gps_imu=False)
    assert d.lidar is None and d.gps is None and d.imu is None
    assert any("missing lidar folder" in x for x in d.warnings)
    assert d.labels(0) is not None and d.labels(1) is None  # keyed by frame number here


def test_scene_drive_errors(tmp_path):
    scene = _write_scene(tmp_path)
    (scene / "calib" / "radar" / "front_points.json").write_text('{"translation": [1, 2')
    with pytest.raises(DriveError, match=r"front_points\.json: broken calibration JSON"):
        open_scene(scene, "a")  # the radar mount is used: a broken one fails the drive
    (scene / "calib" / "radar" / "front_points.json").unlink()
    (scene / "Gps_Imu" / "data" / "timestamp.txt").write_text("1000\n11OO\n")
    with pytest.raises(DriveError, match="bad timestamp '11OO'"):
        open_scene(scene, "a")
    (scene / "Gps_Imu" / "data" / "timestamp.txt").unlink()
    with pytest.raises(DriveError, match="timestamp.txt: no timestamp.txt"):
        open_scene(scene, "a")
    with pytest.raises(DriveError, match="scene folder not found"):
        open_scene(tmp_path / "nowhere", "a")


def test_read_calibration_without_folder(tmp_path):
    warn: list[str] = []
    cal = read_calibration(tmp_path / "calib", warn=warn)
    assert np.array_equal(cal.radar_to_vehicle, np.eye(4)) and cal.rgb_extrinsic is None
    assert len(warn) == 1


# --------------------------------------------------------------------------- the real sample
needs_sample = pytest.mark.skipif(
    not SAMPLE_SCENE.is_dir(), reason=f"real CMHT sample not present at {SAMPLE_SCENE}"
)


@pytest.fixture(scope="module")
def real():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in the sample should warn at open
        return open_scene(SAMPLE_SCENE, "drive_dusk_clear_0/drive_dusk_1")


@needs_sample
def test_real_sample_found():
    assert find_scenes(SAMPLE) == [SAMPLE_SCENE]


@needs_sample
def test_real_sample_gps_imu(real):
    assert len(real.gps.times) == 4929 and len(real.imu.times) == 4929
    # first fix 4313.7323, -7956.3434 (NMEA ddmm.mmmm)
    np.testing.assert_allclose(real.gps.values[0, 0], 43 + 13.7323 / 60, atol=1e-9)
    assert abs(real.gps.values[0, 0] - 43.22887) < 1e-5
    np.testing.assert_allclose(real.gps.values[0, 1], -(79 + 56.3434 / 60), atol=1e-9)
    assert (real.gps.values[:, 2] == 0).all()
    lat = real.gps.values[:, 0]
    assert 43.2 < lat.min() and lat.max() < 43.3
    # accel converted G → m/s² (z flipped to z-up): the first file says -0.938949 G on z
    np.testing.assert_allclose(real.imu.values[0, 5], 0.938949 * G, rtol=1e-12)
    np.testing.assert_allclose(real.imu.values[0, 2], 0.47384781620435007)
    assert 8.0 < np.median(real.imu.values[:, 5]) < 11.0  # gravity in m/s², not in G


@needs_sample
def test_real_sample_issue_numbers():
    from etl.preprocess import nmea_to_degrees

    np.testing.assert_allclose(nmea_to_degrees(4313.7196), 43.228660, atol=5e-7)
    np.testing.assert_allclose(nmea_to_degrees(-7956.343), -79.939050, atol=5e-7)


@needs_sample
def test_real_sample_timestamps_gaps_kept(real):
    t = real.gps.times
    assert np.all(np.diff(t) > 0)
    np.testing.assert_allclose(t[0], 923330.9)
    dt = np.diff(t)
    assert np.median(dt) == pytest.approx(0.1, abs=1e-6)
    assert (dt > 0.15).sum() == 246  # dropped frames stay gaps; nothing invented
    assert dt.max() == pytest.approx(0.903, abs=1e-6)


@needs_sample
def test_real_sample_labels_and_calibration(real):
    labelled = [i for i in range(4929) if real.labels(i) is not None]
    assert len(labelled) == 3377
    b = real.labels(labelled[0])
    assert b and {"obj_id", "obj_type", "psr"} <= set(b[0])
    stray = [w for w in real.warnings if "front (copy).json" in w]
    assert len(stray) == 1 and "ignored" in stray[0]
    np.testing.assert_allclose(real.calib.rgb_intrinsic[0, 0], 738.264936107773)
    np.testing.assert_allclose(real.calib.rgb_extrinsic[0, 3], -0.215424739527230)
    np.testing.assert_allclose(real.calib.ir_intrinsic[0, 2], 336.551379339968)
    np.testing.assert_allclose(real.calib.radar_to_vehicle, np.eye(4))
    # the sample carries no sensor files: those streams are absent, each with a warning
    assert real.lidar is None and real.rgb is None
    assert sum("missing" in w for w in real.warnings) == 4


def test_one_spiked_timestamp_drops_one_frame(tmp_path):
    """A single stamp ×10 (a spike) drops that frame only, not every later one (issue 14)."""
    scene = _write_scene(tmp_path)
    stamps = [1000 + 100 * i for i in range(12)]
    stamps[3] *= 10  # frame 3: 13000 ms, far ahead of the rest of the drive
    (scene / "Gps_Imu" / "data" / "timestamp.txt").write_text("\n".join(map(str, stamps)))
    d = open_scene(scene, "a")
    w = [x for x in d.warnings if "timestamp.txt" in x]
    assert len(w) == 1 and "1 frames with duplicate or backward" in w[0] and "frame 3)" in w[0]
    frames = scene_frames(d)
    assert frames["lidar"] == [0, 1, 2, 4, 5, 6, 7, 9]  # 3: spike; 1 corrupt but listed; 8: none
    assert np.all(np.diff(d.lidar.times) > 0)
    # a backward spike (stamp ÷ 10) and a real gap: only the spike goes, the gap stays
    stamps = [1000 + 100 * i for i in range(10)]
    stamps[5] //= 10
    stamps[7:] = [s + 5000 for s in stamps[7:]]
    (scene / "Gps_Imu" / "data" / "timestamp.txt").write_text("\n".join(map(str, stamps)))
    d = open_scene(scene, "a")
    assert scene_frames(d)["lidar"] == [0, 1, 2, 3, 4, 6, 7, 9]
    np.testing.assert_allclose(d.lidar.times[-2:], [6.7, 6.9])


# --------------------------------------------------------------------------- build notices
SMALL_SETS = ["--set", "preprocess.image.rgb_size=[16, 16]", "--set",
              "preprocess.image.ir_size=[8, 8]", "--set", "output.shard_size=2"]  # fmt: skip


def test_repairs_are_one_line_per_drive_and_counted(tmp_path, capsys):
    """Trailing PCD bytes, NaN points, bad labels: one line per drive and kind, whatever the
    chunking; counted in the manifest; no Python warning text on stderr."""
    from etl import build as B

    scene = _write_scene(tmp_path / "raw")
    for p in sorted((scene / "lidar").glob("*.pcd")):
        if p.name != "00000001.pcd":  # (the corrupt one stays a bad frame)
            p.write_bytes(p.read_bytes() + b"\x00" * 7)
    nan = {k: np.array([1.0, np.nan, 3.0], np.float32) for k in ("x", "y", "z", "intensity")}
    write_pcd(scene / "lidar" / "00000009.pcd", nan, "binary")
    out = tmp_path / "out"
    rc = B.main(["--src", str(tmp_path / "raw"), "--out", str(out), "--no-progress",
                 *SMALL_SETS])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    trailing = [x for x in err.splitlines() if "trailing bytes" in x]
    assert len(trailing) == 1 and trailing[0].startswith("warning: drive_a/drive_a_1: ")
    assert "7 bytes after the last point ignored" in trailing[0]
    assert "warnings.warn" not in err and "UserWarning" not in err and "PCDWarning" not in err
    notices = json.loads((out / "manifest.json").read_text())["drives"]["drive_a/drive_a_1"][
        "notices"
    ]
    assert notices["trailing bytes"] == 5  # frames 0, 2, 4, 6, 7 (8 missing, 1 corrupt, 9 NaN)
    assert notices["NaN/inf points"] == 1
    assert notices["bad labels"] == 2  # one malformed box, one broken label file


@pytest.mark.parametrize("text,reason", [
    ('{"extrinsic": ' + json.dumps(list(range(15))) + "}", "extrinsic needs 16 finite numbers"),
    ('{"intrinsic": [1, 2, 3]}', "intrinsic needs 9 finite numbers"),
    ('{"extrinsic": [1, 2, 3', "broken calibration JSON"),
    ("[1, 2]", "not a JSON object"),
])
def test_broken_camera_calibration_is_ignored_with_one_warning(tmp_path, text, reason):
    """Camera calibration is not used by the sample: a broken file warns once, the drive and
    its good calibration (the radar mount, the other camera) are kept."""
    scene = _write_scene(tmp_path, stray=False)
    ir = scene / "calib" / "camera" / "ir.json"
    ir.write_text(text)
    d = open_scene(scene, "a")
    lines = [w for w in d.warnings if "ir.json" in w]
    assert len(lines) == 1 and lines[0].startswith(f"{ir}: ") and reason in lines[0]
    assert "ir camera calibration ignored" in lines[0]
    assert d.calib.ir_extrinsic is None and d.calib.ir_intrinsic is None
    np.testing.assert_allclose(d.calib.rgb_extrinsic[:3, 3], [0.1, 0.2, 0.3])
    np.testing.assert_allclose(d.calib.radar_to_vehicle[:3, 3], [1.25, 0, 0.5])
    assert d.lidar is not None and len(d.lidar.times) == 7


def test_drives_behind_symlinks_are_found_once(tmp_path, capsys):
    """A drive folder reached through a symbolic link is found (named by its path under
    --src); a second link to the same folder, or a link back up the tree, is skipped with a
    note naming the duplicate; the build then builds it."""
    from etl import build as B

    _write_scene(tmp_path / "disk")  # disk/drive_a/drive_a_1
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a_link").symlink_to(tmp_path / "disk" / "drive_a", target_is_directory=True)
    (raw / "b_link").symlink_to(tmp_path / "disk" / "drive_a", target_is_directory=True)
    (raw / "loop").symlink_to(raw, target_is_directory=True)
    refs, notes = B.discover(raw)
    assert [r.drive_id for r in refs] == ["a_link/drive_a_1"]
    assert refs[0].path == str(raw / "a_link" / "drive_a_1")
    dup = [n for n in notes if "b_link" in n]
    assert len(dup) == 1 and dup[0].startswith(f"{raw / 'b_link'}: the same folder as ")
    assert str(raw / "a_link") in dup[0] and "skipped" in dup[0]
    assert any(n.startswith(f"{raw / 'loop'}: the same folder as {raw}") for n in notes)
    rc = B.main(["--src", str(raw), "--out", str(tmp_path / "out"), "--no-progress",
                 *SMALL_SETS])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"note: {raw / 'b_link'}: the same folder as" in err
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert list(m["drives"]) == ["a_link/drive_a_1"] and m["counts"]["samples"] > 0


# --------------------------------------------------------------------------- timestamp units
@pytest.mark.parametrize(("stamps", "unit"), [
    ([f"{1650000000 + s / 1000:.3f}" for s in STAMPS_MS], "s"),  # float Unix seconds
    ([f"{s / 1000:.1f}" for s in STAMPS_MS], "s"),  # float seconds from the drive start
    ([str(1650000000000000 + s * 1000) for s in STAMPS_MS], "µs"),  # integer Unix µs
    ([str(s * 1_000_000) for s in STAMPS_MS], "ns"),  # integer ns from the drive start
])
def test_timestamp_unit_inferred_from_the_values(tmp_path, stamps, unit):
    """Float seconds (or µs, ns) in timestamp.txt are converted, not taken as ms; one note per
    drive names the unit where it is not milliseconds."""
    scene = _write_scene(tmp_path)
    (scene / "Gps_Imu" / "data" / "timestamp.txt").write_text("\n".join(stamps) + "\n")
    d = open_scene(scene, "a")
    t = d.lidar.times
    expect = np.array(STAMPS_MS, np.float64)[[0, 1, 2, 4, 6, 7, 9]] / 1000  # lidar frames
    np.testing.assert_allclose(t - t[0], expect - expect[0], atol=1e-6)
    notes = [w for w in d.warnings if "timestamps read as" in w]
    assert len(notes) == 1 and f"read as {unit}, not ms" in notes[0], d.warnings
    assert "timestamp.txt" in notes[0]
    # the release's integer ms: no note
    (scene / "Gps_Imu" / "data" / "timestamp.txt").write_text("\n".join(map(str, STAMPS_MS)))
    assert not [w for w in open_scene(scene, "a").warnings if "timestamps read as" in w]


@pytest.mark.parametrize("stamps", [
    [f"{5.0 * i:.1f}" for i in range(10)],  # spaced 5: 5 s or 5 ms, and no Unix time
    [str(10**13 * i) for i in range(10)],  # spaced 1e13: no frame period in any unit
])
def test_timestamp_unit_ambiguous_fails_naming_the_file(tmp_path, stamps):
    scene = _write_scene(tmp_path)
    (scene / "Gps_Imu" / "data" / "timestamp.txt").write_text("\n".join(stamps) + "\n")
    with pytest.raises(DriveError, match=r"timestamp\.txt: timestamp unit unknown") as e:
        open_scene(scene, "a")
    assert "\n" not in str(e.value)
