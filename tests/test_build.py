"""etl.build and etl.dataset: shards, manifest, index, splits, determinism, resume, bad input.

Most tests run on small in-memory fake drives (a JSON spec file per drive, opened by
``open_fake`` below, so worker processes can reopen them from their path). The end-to-end
test on synthetic raw drives (etl.synth → scene reader → build → Grain) runs when those exist.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from etl import build as B
from etl.config import load_config
from etl.dataset import DatasetError, ShardSource, list_shards, load_manifest, read_index
from etl.errors import DriveError, FrameError
from etl.schema import MODALITIES, MODALITY_INDEX
from etl.sources import Drive, Stream, TimeSeries

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "preprocess.lidar.resolution=4.0",
    "preprocess.radar.grid.resolution=8.0",
    "preprocess.image.rgb_size=[16, 16]",
    "preprocess.image.ir_size=[8, 8]",
    "preprocess.max_boxes=4",
    "output.shard_size=16",
]
SETS = [a for s in SMALL for a in ("--set", s)]


def small_cfg(*extra: str):
    return load_config(None, [*SMALL, *extra])


# --------------------------------------------------------------------------- fake drives
def open_fake(path: Path, drive_id: str, cfg) -> Drive:
    """A deterministic drive from a JSON spec: {n, seed, bad_lidar, bad_rgb, error, ...}."""
    spec = json.loads(Path(path).read_text())
    if spec.get("error") == "drive":
        raise DriveError(path, "broken calibration JSON")
    if spec.get("error") == "open":
        raise ZeroDivisionError("division by zero in reader")
    n, period, seed = spec["n"], spec.get("period", 0.1), spec.get("seed", 0)
    t0 = 1000.0 + seed
    lt = t0 + np.arange(n) * period
    bad_lidar, bad_rgb = set(spec.get("bad_lidar", [])), set(spec.get("bad_rgb", []))
    crash_at, noise_at = spec.get("crash_at"), set(spec.get("noise_at", []))

    def lidar(i):
        if i in noise_at:  # what a C library prints (libjpeg's 'Corrupt JPEG data'), a warning
            os.write(2, f"libfake: corrupt block in sweep {i}\n".encode())
            warnings.warn(f"odd sweep {i}", RuntimeWarning, stacklevel=1)
        if i in bad_lidar:
            raise FrameError(f"{path}/lidar/{i:08d}.pcd", "truncated binary data")
        if i == crash_at:
            raise RuntimeError("reader bug")
        r = np.random.default_rng([seed, i])
        return r.uniform(-30, 30, (200, 4)).astype(np.float32)

    def radar(i):
        r = np.random.default_rng([seed, i, 1])
        return r.uniform(-30, 30, (10, 4)).astype(np.float32)

    def rgb(i):
        if i in bad_rgb:
            raise FrameError(f"{path}/camera/front/{i:08d}.jpg", "corrupt JPEG")
        return np.full((12, 20, 3), (seed * 7 + i) % 255, np.uint8)

    def ir(i):
        if "ir16" in spec:  # a 16-bit thermal camera: counts in [lo, hi]
            lo, hi = spec["ir16"]
            return np.linspace(lo, hi, 48).reshape(6, 8).astype(np.uint16)
        return np.full((6, 8), (seed + i) % 255, np.uint8)

    ct = lt + 0.02  # camera frames 20 ms after each sweep; frame 4 dropped
    keep = np.arange(n) != 4
    gt = t0 + np.arange(0, n * period + 0.5, 0.2)
    gps = np.stack([43.2 + 1e-5 * (gt - t0), -79.9 + 1e-5 * (gt - t0), np.zeros_like(gt)], 1)
    it = t0 + np.arange(0, n * period + 0.5, 0.01)
    imu = np.tile(np.arange(6.0), (len(it), 1))
    labels = lambda i: [  # noqa: E731
        {"obj_type": "Car", "psr": {"position": {"x": 1, "y": 2, "z": 0},
         "scale": {"x": 4, "y": 2, "z": 1.5}, "rotation": {"z": 0.1}}}
    ] if i % 3 == 0 else None  # fmt: skip
    return Drive(
        drive_id=drive_id,
        path=str(path),
        lidar=Stream(lt, lidar),
        radar=Stream(lt + 0.03, radar),
        rgb=Stream(ct[keep], lambda j: rgb(int(np.flatnonzero(keep)[j]))),
        ir=None if spec.get("no_ir") else Stream(lt - 0.01, ir),
        gps=TimeSeries(gt, gps),
        imu=TimeSeries(it, imu),
        labels=labels,
    )


def find_fake(src, layout=None) -> list[Path]:
    return sorted(Path(src).rglob("*.drive.json"))


OPENER = f"{__name__}:open_fake"


def make_drives(root: Path, specs: dict[str, dict]) -> list[B.DriveRef]:
    refs = []
    for name, spec in specs.items():
        p = root / f"{name}.drive.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(spec))
        refs.append(B.DriveRef(f"{name}.drive.json", str(p), OPENER))
    return refs


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted((out / "drives").glob("*/*.array_record"))}  # fmt: skip


@pytest.fixture
def fake_cli(monkeypatch):
    """Make ``etl.build.main`` discover fake drives (in-process, workers=1)."""
    monkeypatch.setattr(B, "FINDERS", {"fake": f"{__name__}:find_fake"})
    monkeypatch.setattr(B, "OPENERS", {"fake": OPENER})


# --------------------------------------------------------------------------- tests
def test_build_and_read_back(tmp_path):
    refs = make_drives(tmp_path / "src", {"a": {"n": 40, "seed": 1}, "b": {"n": 20, "seed": 2}})
    cfg = small_cfg("output.block_s=1.0", "output.val_fraction=0.3", "output.guard_s=0.25")
    res = B.build(refs, tmp_path / "out", cfg, progress=False)
    assert res.failed == [] and sorted(res.built) == ["a.drive.json", "b.drive.json"]
    m = load_manifest(tmp_path / "out")
    assert m["counts"]["samples"] == m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"]
    assert m["splits"]["val"]["samples"] > 0 and m["splits"]["train"]["samples"] > 0
    assert m["config_hash"] and m["normalization"]["rgb"]["size"] == [16, 16]
    assert m["sync"]["rgb"]["presence_rate"] < 1.0  # the dropped camera frame
    assert m["sync"]["rgb"]["offset_abs_max"] == pytest.approx(0.02, abs=1e-5)
    assert m["sync"]["ir"]["offset_mean"] == pytest.approx(-0.01, abs=1e-5)
    idx = read_index(tmp_path / "out")
    assert idx.num_rows == m["counts"]["samples"]
    assert {"drive", "frame", "time", "split", "shard", "record", "has_labels", "present_rgb",
            "offset_imu"} <= set(idx.column_names)  # fmt: skip
    src = ShardSource(tmp_path / "out", "train", keep_meta=True)
    train_rows = read_index(tmp_path / "out", "train").to_pylist()
    assert len(src) == len(train_rows)
    for k in (0, len(src) // 2, len(src) - 1):
        s, row = src[k], train_rows[k]
        assert (s["meta"]["drive"], s["meta"]["frame"]) == (row["drive"], row["frame"])
        assert s["lidar"].shape == (16, 16, 2) and s["rgb"].shape == (16, 16, 3)
        assert bool(s["present"][MODALITY_INDEX["rgb"]]) == row["present_rgb"]
        assert s["time"] == pytest.approx(row["time"])
        assert s["has_labels"] == (row["frame"] % 3 == 0)
    frame4 = [r for r in idx.to_pylist() if r["frame"] == 4]
    assert frame4 and not any(r["present_rgb"] for r in frame4)


def test_grain_reads_batches(tmp_path):
    import grain

    refs = make_drives(tmp_path / "src", {"a": {"n": 24, "seed": 3}})
    B.build(refs, tmp_path / "out", small_cfg("output.val_fraction=0.0"), progress=False)
    ds = grain.MapDataset.source(ShardSource(tmp_path / "out", "train")).shuffle(seed=0).batch(8)
    batch = ds[0]
    assert batch["lidar"].shape == (8, 16, 16, 2) and batch["present"].shape == (8, 6)
    assert batch["ir"].dtype == np.float32 and len(ds) == 3


def test_block_split_has_guard_and_no_leak(tmp_path):
    refs = make_drives(tmp_path / "src", {"a": {"n": 120, "seed": 4}})
    cfg = small_cfg("output.block_s=2.0", "output.val_fraction=0.3", "output.guard_s=0.5")
    B.build(refs, tmp_path / "out", cfg, progress=False)
    rows = read_index(tmp_path / "out").to_pylist()
    tr = np.array([r["time"] for r in rows if r["split"] == "train"])
    va = np.array([r["time"] for r in rows if r["split"] == "val"])
    assert len(tr) and len(va)
    assert np.min(np.abs(tr[:, None] - va[None, :])) >= 0.5 - 1e-9
    m = load_manifest(tmp_path / "out")
    assert m["drives"]["a.drive.json"]["skipped"]["split guard"] > 0
    assert {r["shard"].split("/")[-1].split("-")[0] for r in rows} == {"train", "val"}
    # the assignment is a pure function of (seed, drive, times): same again, other seed differs
    t = np.arange(0, 600, 0.1)
    s1 = B.block_split(t, "d", cfg.output)
    assert np.array_equal(s1, B.block_split(t, "d", cfg.output))
    assert not np.array_equal(s1, B.block_split(t, "d", small_cfg("output.seed=5").output))


def test_drive_split_keeps_drives_whole(tmp_path):
    refs = make_drives(tmp_path / "src", {f"d{k}": {"n": 8, "seed": k} for k in range(4)})
    cfg = small_cfg("output.split=drive", "output.val_fraction=0.25")
    B.build(refs, tmp_path / "out", cfg, progress=False)
    rows = read_index(tmp_path / "out").to_pylist()
    by_drive = {}
    for r in rows:
        by_drive.setdefault(r["drive"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_drive.values())
    assert sorted(
        len([d for d, s in by_drive.items() if s == {sp}]) for sp in ("train", "val")
    ) == [1, 3]


def test_deterministic_across_workers(tmp_path):
    specs = {"a": {"n": 40, "seed": 1, "bad_lidar": [7]}, "x/b": {"n": 30, "seed": 2}}
    refs = make_drives(tmp_path / "src", specs)
    cfg = small_cfg("output.block_s=1.0", "output.val_fraction=0.3")
    B.build(refs, tmp_path / "o1", cfg, workers=1, progress=False)
    B.build(refs, tmp_path / "o2", cfg, workers=2, progress=False)
    b1, b2 = shard_bytes(tmp_path / "o1"), shard_bytes(tmp_path / "o2")
    assert b1 and b1 == b2
    assert (tmp_path / "o1/index.parquet").read_bytes() == (
        tmp_path / "o2/index.parquet"
    ).read_bytes()


def test_resume_skips_finished_and_rebuilds_on_config_change(tmp_path):
    refs = make_drives(tmp_path / "src", {"a": {"n": 20, "seed": 1}, "b": {"n": 20, "seed": 2}})
    out = tmp_path / "out"
    cfg = small_cfg()
    r1 = B.build(refs, out, cfg, progress=False)
    assert sorted(r1.built) == ["a.drive.json", "b.drive.json"]
    first = shard_bytes(out)
    r2 = B.build(refs, out, cfg, progress=False)
    assert r2.built == [] and sorted(r2.reused) == ["a.drive.json", "b.drive.json"]
    assert shard_bytes(out) == first
    # a drive whose marker is gone (killed before it finished) is rebuilt, the other reused
    (out / "drives" / refs[1].hash / "drive.json").unlink()
    r3 = B.build(refs, out, cfg, progress=False)
    assert r3.built == ["b.drive.json"] and r3.reused == ["a.drive.json"]
    assert shard_bytes(out) == first
    cfg2 = small_cfg("preprocess.lidar.z_max=2.0")
    r4 = B.build(refs, out, cfg2, progress=False)
    assert sorted(r4.built) == ["a.drive.json", "b.drive.json"] and r4.reused == []
    assert shard_bytes(out) != first
    marker = json.loads((out / "drives" / refs[0].hash / "drive.json").read_text())
    from etl.configlib import config_hash

    assert marker["config_hash"] == config_hash(cfg2) != config_hash(cfg)


def test_changed_raw_files_are_rebuilt_and_force_rebuilds_all(tmp_path, fake_cli, capsys):
    """The resume check fingerprints each drive's raw files, not only the config (issue 14)."""
    refs = make_drives(tmp_path / "src", {"a": {"n": 20, "seed": 1}, "b": {"n": 20, "seed": 2}})
    out = tmp_path / "out"
    cfg = small_cfg()
    B.build(refs, out, cfg, progress=False)
    first = shard_bytes(out)
    marker = json.loads((out / "drives" / refs[0].hash / "drive.json").read_text())
    assert marker["inputs"] == B.input_fingerprint(refs[0].path)
    # drive b's raw data replaced (fewer frames): b is rebuilt, a reused
    Path(refs[1].path).write_text(json.dumps({"n": 14, "seed": 2}))
    r = B.build(refs, out, cfg, progress=False)
    assert r.built == ["b.drive.json"] and r.reused == ["a.drive.json"]
    assert "b.drive.json: raw files changed since it was built" in capsys.readouterr().err
    assert load_manifest(out)["drives"]["b.drive.json"]["frames"] == 14
    # --force rebuilds both, byte-identical for an unchanged drive
    rc = B.main(["--src", str(tmp_path / "src"), "--out", str(out), "--no-progress", "--force",
                 *SETS])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0 and "already built" not in err
    assert {k: v for k, v in shard_bytes(out).items() if refs[0].hash in k} == {
        k: v for k, v in first.items() if refs[0].hash in k}
    rc = B.main(["--src", str(tmp_path / "src"), "--out", str(out), "--no-progress", *SETS])
    assert rc == 0 and "2 drive(s) already built" in capsys.readouterr().err


def test_16bit_ir_outside_its_range_warns_once_per_drive(tmp_path, fake_cli, capsys):
    make_drives(tmp_path / "src", {"hot": {"n": 40, "ir16": [7000, 8000]},
                                   "cool": {"n": 10, "ir16": [7000, 7400]}})  # fmt: skip
    out = tmp_path / "out"
    rc = B.main(["--src", str(tmp_path / "src"), "--out", str(out), "--no-progress", *SETS,
                 "--set", "preprocess.image.ir16_min=6000.0",
                 "--set", "preprocess.image.ir16_max=7500.0"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0
    lines = [x for x in err.splitlines() if "outside preprocess.image.ir16_min" in x]
    assert len(lines) == 1 and lines[0].startswith("warning: hot.drive.json: ")
    assert "[6000, 7500]" in lines[0] and "7000..8000" in lines[0]
    drives = load_manifest(out)["drives"]
    assert any("ir16_min/ir16_max" in w for w in drives["hot.drive.json"]["warnings"])
    assert not any("ir16" in w for w in drives["cool.drive.json"]["warnings"])
    rc = B.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "o2"),
                 "--set", "preprocess.image.ir16_max=0.0"])
    assert rc == 2 and "preprocess.image.ir16_max: must be greater" in capsys.readouterr().err


def test_input_fingerprint_of_a_scene_folder(tmp_path):
    scene = tmp_path / "scene"
    (scene / "lidar").mkdir(parents=True)
    for i in range(8):
        (scene / "lidar" / f"{i:08d}.pcd").write_bytes(bytes(10 + i))
    fp = B.input_fingerprint(scene)
    assert fp["files"] == 8 and fp["bytes"] == sum(10 + i for i in range(8))
    assert B.input_fingerprint(scene) == fp
    for i in range(6):  # six sweeps deleted
        (scene / "lidar" / f"{i:08d}.pcd").unlink()
    fp2 = B.input_fingerprint(scene)
    assert fp2["files"] == 2 and fp2["hash"] != fp["hash"]
    f = scene / "lidar" / "00000007.pcd"  # one replaced by a file of the same size
    st = f.stat()
    f.write_bytes(bytes(range(17)))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert B.input_fingerprint(scene)["hash"] != fp2["hash"]


def test_half_written_files_are_ignored(tmp_path):
    refs = make_drives(tmp_path / "src", {"a": {"n": 20, "seed": 1}})
    out = tmp_path / "out"
    B.build(refs, out, small_cfg("output.val_fraction=0.0"), progress=False)
    n = len(ShardSource(out, "train"))
    d = out / "drives" / refs[0].hash
    # what a kill -9 mid-write leaves: a temp shard and an unlisted half shard
    (d / ".train-deadbeef-00009.array_record.tmp-123").write_bytes(b"\x00" * 100)
    (d / f"train-{refs[0].hash}-00009.array_record").write_bytes(b"garbage")
    (out / ".manifest.json.tmp-99").write_text("{")
    assert len(ShardSource(out, "train")) == n
    assert len(list_shards(out, "train")) == 2
    # a manifest is removed as soon as a rebuild starts; no manifest → a clear error
    (out / "manifest.json").unlink()
    with pytest.raises(DatasetError, match="no manifest"):
        ShardSource(out, "train")
    # a resumed build cleans the drive folder when it rebuilds it
    (d / "drive.json").unlink()
    B.build(refs, out, small_cfg("output.val_fraction=0.0"), progress=False)
    assert not list(d.glob(".*tmp*")) and len(ShardSource(out, "train")) == n


def test_manifest_version_check(tmp_path):
    refs = make_drives(tmp_path / "src", {"a": {"n": 8}})
    B.build(refs, tmp_path / "out", small_cfg(), progress=False)
    p = tmp_path / "out/manifest.json"
    m = json.loads(p.read_text())
    p.write_text(json.dumps(m | {"schema_version": 999}))
    with pytest.raises(DatasetError, match="schema version 999"):
        ShardSource(tmp_path / "out", "train")


def test_bad_frames_counted_and_flagged(tmp_path, fake_cli, capsys):
    make_drives(tmp_path / "src", {"a": {"n": 20, "seed": 1, "bad_lidar": [2, 3], "bad_rgb": [6]}})
    out = tmp_path / "out"
    rc = B.main(["--src", str(tmp_path / "src"), "--out", str(out), "--no-progress",
                 *SETS, "--set", "output.val_fraction=0.0"])  # fmt: skip
    err = capsys.readouterr()
    assert rc == 0
    assert "lidar/00000002.pcd: truncated binary data" in err.err
    assert "camera/front/00000006.jpg: corrupt JPEG" in err.err
    assert "a.drive.json" in err.out and "Traceback" not in err.err
    d = load_manifest(out)["drives"]["a.drive.json"]
    assert d["status"] == "ok" and d["skipped"] == {"lidar: truncated binary data": 2}
    assert d["absent"] == {"rgb: corrupt JPEG": 1}
    rows = {r["frame"]: r for r in read_index(out).to_pylist()}
    assert 2 not in rows and 3 not in rows and len(rows) == 18
    assert (
        rows[6]["present_rgb"] is False
        and rows[6]["offset_rgb"] == 0.0
        and rows[6]["present_lidar"]
    )
    # --strict: the same input fails the run
    rc = B.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "o2"), "--no-progress",
                 "--strict", *SETS])  # fmt: skip
    err = capsys.readouterr()
    assert rc == 1 and "(--strict)" in err.err and "Traceback" not in err.err
    assert load_manifest(tmp_path / "o2")["drives"]["a.drive.json"]["status"] == "failed"


def test_bad_drive_fails_alone(tmp_path, fake_cli, capsys):
    make_drives(tmp_path / "src", {"good": {"n": 10}, "bad": {"n": 10, "error": "drive"},
                                   "weird": {"n": 10, "error": "open"},
                                   "crash": {"n": 20, "crash_at": 17}})  # fmt: skip
    out = tmp_path / "out"
    rc = B.main(["--src", str(tmp_path / "src"), "--out", str(out), "--no-progress",
                 *SETS])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert "bad.drive.json: broken calibration JSON" in err
    assert "ZeroDivisionError: division by zero in reader" in err
    assert "RuntimeError: reader bug" in err and "Traceback" not in err
    drives = load_manifest(out)["drives"]
    assert drives["good.drive.json"]["status"] == "ok"
    assert [drives[f"{k}.drive.json"]["status"] for k in ("bad", "weird", "crash")] == [
        "failed"
    ] * 3
    assert {r["drive"] for r in read_index(out).to_pylist()} == {"good.drive.json"}
    # failed drives are retried on the next run; the good one is reused
    rc = B.main(["--src", str(tmp_path / "src"), "--out", str(out), "--no-progress",
                 *SETS])  # fmt: skip
    assert rc == 1 and "1 drive(s) already built" in capsys.readouterr().err


NOISY = {"a": {"n": 40, "seed": 1, "bad_lidar": [7], "noise_at": [3, 20]},
         "b": {"n": 30, "seed": 2, "noise_at": [5]}}
NOISE = ["warning: a.drive.json: libfake: corrupt block in sweep 3",
         "warning: a.drive.json: RuntimeWarning: odd sweep 3",
         "warning: a.drive.json: libfake: corrupt block in sweep 20",
         "warning: b.drive.json: libfake: corrupt block in sweep 5"]


def test_progress_off_a_terminal_is_plain_lines_apart_from_messages(tmp_path, capfd):
    """Two workers, stderr a file (a Slurm log): what the workers print (C libraries straight
    to fd 2, Python warnings) comes through the parent, each on a line of its own, and the
    progress is plain lines without a carriage return."""
    refs = make_drives(tmp_path / "src", NOISY)
    capfd.readouterr()
    B.build(refs, tmp_path / "out", small_cfg(), workers=2, progress=True)
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    progress = [x for x in lines if x.startswith("progress:")]
    assert progress and progress[-1].startswith("progress: 70/70 frames (100%)")
    others = [x for x in lines if not x.startswith("progress:")]
    assert not [x for x in others if "progress:" in x or "frame/s" in x]
    for line in NOISE:
        assert line in lines, (line, lines)
    assert any(x.startswith("bad frame: ") and "00000007.pcd" in x for x in lines)


def _render(stream: str) -> list[str]:
    """The lines a terminal shows after ``stream`` (carriage return, newline, cursor up)."""
    import re

    screen, row, col = [[]], 0, 0
    for tok in re.findall(r"\x1b\[(\d*)([A-Za-z])|(\r)|(\n)|([^\x1b\r\n])", stream):
        n, code, cr, nl, ch = tok
        if cr:
            col = 0
        elif nl:
            row, col = row + 1, 0
            if row == len(screen):
                screen.append([])
        elif code == "A":
            row = max(0, row - int(n or 1))
        elif ch:
            line = screen[row]
            line.extend(" " * (col - len(line) + 1))
            line[col] = ch
            col += 1
    return ["".join(x).rstrip() for x in screen]


def test_progress_on_a_terminal_keeps_messages_above_the_bar(tmp_path):
    """The same build on a terminal (a pseudo-terminal): one tqdm bar, and no line the
    terminal shows holds both a message and the bar."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    refs = make_drives(tmp_path / "src", NOISY)
    code = (
        "import sys; sys.path[:0] = [{tests!r}, {root!r}]\n"
        "import test_build as T\n"
        "from etl.build import DriveRef, build\n"
        "refs = [DriveRef(*r) for r in {refs!r}]\n"
        "build(refs, {out!r}, T.small_cfg(), workers=2, progress=True)\n"
    ).format(tests=str(ROOT / "tests"), root=str(ROOT), out=str(tmp_path / "out"),
             refs=[(r.drive_id, r.path, "test_build:open_fake") for r in refs])
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, cols
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            assert ready, "no output for 120 s"
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        assert proc.wait(timeout=60) == 0
    shown = _render(b"".join(chunks).decode("utf-8", errors="replace"))
    for x in shown:
        assert not ("frame/s" in x and ("warning" in x or "libfake" in x or "bad frame" in x)), x
    bars = [x for x in shown if "frame/s" in x]
    assert bars and "70/70" in bars[-1], shown
    for line in NOISE:
        assert line in shown, (line, shown)


def test_cli_errors_are_one_line(tmp_path, fake_cli, capsys):
    assert B.main(["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "source folder not found" in capsys.readouterr().err
    make_drives(tmp_path / "src", {"a": {"n": 10}})
    (tmp_path / "afile").write_text("x")
    assert B.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert "--out is a file" in err and "rerun to resume" not in err
    rc = B.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                 "--num-shards", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--num-shards 0: must be ≥ 1" in err and "rerun" not in err
    rc = B.main(
        ["--src", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "output.shard_sz=3"]
    )
    assert rc == 2 and "output.shard_sz: unknown key" in capsys.readouterr().err


def test_sharded_build_then_merge(tmp_path):
    refs = make_drives(tmp_path / "src", {f"d{k}": {"n": 10, "seed": k} for k in range(3)})
    cfg = small_cfg()
    for i in range(2):
        r = B.build(refs, tmp_path / "out", cfg, shard_index=i, num_shards=2, progress=False)
        assert r.manifest is None
    assert not (tmp_path / "out/manifest.json").exists()
    m = B.merge(tmp_path / "out", cfg, refs)
    assert m["counts"]["drives"]["ok"] == 3 and m["counts"]["samples"] == 30
    B.build(refs, tmp_path / "whole", cfg, progress=False)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "whole")


HAVE_SYNTH = all(importlib.util.find_spec(m) for m in ("etl.synth", "etl.scene", "etl.bag"))


@pytest.fixture(scope="module")
def synth_build(tmp_path_factory):
    """etl.synth (one scene drive, one bag) → python -m etl.build, once for the e2e tests."""
    tmp = tmp_path_factory.mktemp("e2e")
    raw, out = tmp / "raw", tmp / "out"
    r = subprocess.run([sys.executable, "-m", "etl.synth", "--out", str(raw), "--drives", "1",
                        "--frames", "16", "--format", "both"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    args = ["--src", str(raw), "--out", str(out), "--no-progress", "--workers", "2", *SETS]
    r = subprocess.run([sys.executable, "-m", "etl.build", *args, "--set", "output.val_fraction=0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    return raw, out, r.stdout


@pytest.mark.skipif(not HAVE_SYNTH, reason="etl.synth / etl.scene / etl.bag not available yet")
def test_end_to_end_synth_build_grain(synth_build):
    import grain

    raw, out, stdout = synth_build
    m = load_manifest(out)
    assert m["counts"]["drives"] == {"ok": 2, "skipped": 0, "failed": 0}
    assert len(m["drives"]) == 2 and "total:" in stdout
    ds = grain.MapDataset.source(ShardSource(out, "train")).shuffle(seed=1).batch(4)
    batch = ds[0]
    assert batch["lidar"].shape == (4, 16, 16, 2) and batch["rgb"].shape == (4, 16, 16, 3)
    assert batch["present"][:, MODALITY_INDEX["lidar"]].all()
    assert batch["lidar"][..., 0].max() > 0  # the synthetic scan hit something
    assert batch["offset"].shape == (4, len(MODALITIES))
    n = sum(len(b["time"]) for b in ds)
    assert n == m["splits"]["train"]["samples"] == read_index(out).num_rows


@pytest.mark.skipif(not HAVE_SYNTH, reason="etl.synth / etl.scene / etl.bag not available yet")
def test_sync_matches_synthetic_ground_truth(synth_build):
    from etl.sync import default_tolerance, interpolate, nearest_within

    raw, out, _ = synth_build
    rows = read_index(out).to_pylist()
    for truth_file in sorted((raw / "_truth").rglob("*.json")):
        truth = json.loads(truth_file.read_text())
        drive = truth_file.relative_to(raw / "_truth").with_suffix("").as_posix()
        mine = sorted((r for r in rows if r["drive"] == drive), key=lambda r: r["frame"])
        assert mine, drive
        st = {k: np.asarray(v["times"], np.float64) for k, v in truth["streams"].items()}
        t = np.array([r["time"] for r in mine])
        li = np.searchsorted(st["lidar"], t - 1e-6)
        np.testing.assert_allclose(st["lidar"][li], t, atol=2e-6)  # sweeps are the truth's
        tol = default_tolerance(st["lidar"])
        for mod in ("radar", "rgb", "ir"):
            idx, off = nearest_within(t, st[mod], tol)
            got_p = np.array([r[f"present_{mod}"] for r in mine])
            got_o = np.array([r[f"offset_{mod}"] for r in mine])
            assert (got_p == (idx >= 0)).all(), (drive, mod)
            np.testing.assert_allclose(got_o, off, atol=2e-5, err_msg=f"{drive} {mod}")
            assert np.abs(got_o).max() <= tol + 1e-6
        for mod in ("gps", "imu"):
            _, ok, off = interpolate(t, st[mod], np.zeros((len(st[mod]), 1)), 1.0)
            got_p = np.array([r[f"present_{mod}"] for r in mine])
            assert (got_p == ok).all(), (drive, mod)
            got_o = np.array([r[f"offset_{mod}"] for r in mine])
            np.testing.assert_allclose(got_o, off, atol=2e-5, err_msg=f"{drive} {mod}")
        if truth["format"] == "scene":  # one clock, one frame index: every offset is 0
            assert all(abs(r["offset_rgb"]) < 1e-6 for r in mine)


@pytest.mark.skipif(not HAVE_SYNTH, reason="etl.synth / etl.scene / etl.bag not available yet")
def test_kill_9_mid_build_leaves_nothing_half_written(synth_build, tmp_path):
    import os
    import signal
    import time

    from array_record.python.array_record_module import ArrayRecordReader

    raw, ref_out, _ = synth_build
    out = tmp_path / "out"
    args = [sys.executable, "-m", "etl.build", "--src", str(raw), "--out", str(out),
            "--no-progress", *SETS, "--set", "output.val_fraction=0", "--set",
            "output.shard_size=4"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("drives/*/*.array_record")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    with pytest.raises(DatasetError, match="no manifest"):
        ShardSource(out, "train")
    for shard in out.glob("drives/*/*.array_record"):  # every complete-named shard is whole
        r = ArrayRecordReader(str(shard))
        assert r.num_records() > 0
        r.close()
    assert subprocess.run(args, cwd=ROOT, capture_output=True, timeout=120).returncode == 0
    m = load_manifest(out)
    assert m["counts"]["samples"] == load_manifest(ref_out)["counts"]["samples"]
    assert len(ShardSource(out, "train")) == m["counts"]["samples"]


def test_drive_without_usable_sweeps_is_skipped_not_failed(tmp_path, capsys):
    refs = make_drives(tmp_path / "src", {"a": {"n": 5, "bad_lidar": [0, 1, 2, 3, 4]},
                                          "b": {"n": 5}})  # fmt: skip
    res = B.build(refs, tmp_path / "out", small_cfg(), progress=False)
    assert res.failed == [] and res.bad_frames == 5
    d = res.manifest["drives"]
    assert d["a.drive.json"]["status"] == "skipped" and d["b.drive.json"]["status"] == "ok"
    assert "no usable sweeps" in d["a.drive.json"]["reason"]
    # --merge-only rewrites the manifest from the per-drive outputs alone
    (tmp_path / "out/manifest.json").unlink()
    rc = B.main(["--out", str(tmp_path / "out"), "--merge-only", *SETS])
    assert rc == 0 and "a.drive.json" in capsys.readouterr().out
    assert load_manifest(tmp_path / "out")["counts"]["samples"] == 5
