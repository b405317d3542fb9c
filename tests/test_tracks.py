"""Track loading, the wall-mesh compiler (against racecar_gym's real Austria maps) and
procedural circuits. Tests that need ../shared/data skip when it is absent."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest

from rl import procedural
from rl.tracks import (
    TrackError,
    compile_maps,
    load_track,
    read_scene_config,
    tracks_dir,
    world_to_pixel_array,
)

DATA = tracks_dir()
needs_austria = pytest.mark.skipif(not (DATA / "austria.zip").exists(),
                                   reason=f"racecar_gym scenes absent: {DATA}/austria.zip")


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("RACEFORMER_CACHE", str(tmp_path_factory.mktemp("rfcache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def austria():
    if not (DATA / "austria.zip").exists():
        pytest.skip(f"racecar_gym scenes absent: {DATA}/austria.zip")
    return load_track("austria")


@needs_austria
def test_load_zip_conventions(austria):
    t = austria
    assert t.name == "austria" and t.shape == (2000, 2000) and t.resolution == 0.05
    assert t.origin == (-50.0, -50.0) and t.checkpoints == 5 and t.starts.shape == (4, 6)
    assert t.world_to_pixel(0.0, 0.0) == (1000, 1000)
    r, c = world_to_pixel_array(np.array([0.0, 1.3]), np.array([0.0, 0.1]), t.origin,
                                t.resolution, t.shape)
    assert [(int(a), int(b)) for a, b in zip(r, c, strict=True)] == [
        t.world_to_pixel(0.0, 0.0), t.world_to_pixel(1.3, 0.1)]
    assert t.drivable[1000, 1000] and t.progress.dtype == np.float32
    assert 0.0 <= t.progress.min() and t.progress.max() == pytest.approx(1.0)
    # obstacle_m is metres to the wall: the wall runs at y = 0.5, the pixel centre y = -0.025
    assert t.obstacle_m[1000, 1000] == pytest.approx(0.525, abs=0.03)
    assert 60 < t.lap_length_m < 130
    assert (t.scene_dir / "meshes" / "Walls.obj").exists()


@needs_austria
def test_load_folder_matches_zip(austria, tmp_path):
    with zipfile.ZipFile(DATA / "austria.zip") as z:
        z.extractall(tmp_path)
    t = load_track(tmp_path / "austria")
    assert np.array_equal(t.drivable, austria.drivable)
    assert np.array_equal(t.progress, austria.progress)


def test_clear_errors(tmp_path):
    with pytest.raises(TrackError, match="neither"):
        load_track("no_such_track_xyz")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "bad.yml").write_text("name: bad\n")
    with pytest.raises(TrackError, match="bad.yml"):
        load_track(bad)
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(TrackError, match="not a valid zip"):
        load_track(tmp_path / "broken.zip")


@needs_austria
def test_compiler_matches_real_austria(austria):
    m = compile_maps(austria.scene_dir / "meshes" / "Walls.obj", 0.05, austria.origin,
                     austria.shape, (0.0, 0.0))
    d, real = m["drivable_area"], austria.drivable
    iou = (d & real).sum() / (d | real).sum()
    assert iou >= 0.98, iou
    both = d & real
    diff = np.abs(m["norm_distance_from_start"][both] - austria.progress[both])
    diff = np.minimum(diff, 1 - diff)  # the start line itself may sit one pixel off
    assert diff.mean() < 2e-3 and np.percentile(diff, 99) < 5e-3, (diff.mean(), diff.max())
    ob = np.abs(m["norm_distance_to_obstacle"][both] - austria.obstacle[both])
    assert ob.mean() < 0.02


# torino: its inner wall is a 0.18 m solid sliver and its mesh lacks 0.675 m of wall
# faces — the compiler must neither grow through the one nor leak through the other.
@pytest.mark.parametrize("name", ["berlin", "montreal", "torino"])
def test_compile_mesh_only_scenes(name):
    if not (DATA / name).exists():
        pytest.skip(f"racecar_gym scene absent: {DATA / name}")
    assert not read_scene_config(DATA / name)["_maps"].exists()
    t = load_track(name)
    assert t.drivable[t.world_to_pixel(0.0, 0.0)]
    for x, y in t.starts[:, :2]:
        assert t.drivable[t.world_to_pixel(x, y)]
    # closed loop: just behind the line is the end of the lap, just ahead its start
    assert t.value(t.progress, np.array([-0.2]), np.array([0.0]))[0] > 0.9
    assert t.value(t.progress, np.array([0.2]), np.array([0.0]))[0] < 0.05
    # the compiled scene is a full scene in the cache, never written into shared/
    assert (t.scene_dir / "maps" / "maps.npz").exists() and DATA not in t.scene_dir.parents
    assert 40 < t.lap_length_m < 200


def _monotone_along_centreline(t):
    c = t.centreline
    p = t.value(t.progress, c[:, 0], c[:, 1])
    return p, np.diff(p)


def test_procedural_closed_drivable_deterministic(tmp_path):
    t = load_track("procedural:3")
    assert t.drivable[t.world_to_pixel(0.0, 0.0)]
    p, dp = _monotone_along_centreline(t)
    assert (dp >= -1e-6).all() and p[0] < 0.01 and p[-1] > 0.99  # one monotone lap
    assert t.value(t.drivable, t.centreline[:, 0], t.centreline[:, 1]).all()
    assert t.obstacle_m[t.drivable].max() > 0.9  # at least ~2 m wide
    # same seed, same scene (byte-identical mesh, identical maps); other seed differs
    a = procedural.write_scene(tmp_path / "a", 3)
    b = procedural.write_scene(tmp_path / "b", 3)
    assert (a / "meshes/Walls.obj").read_bytes() == (b / "meshes/Walls.obj").read_bytes()
    with np.load(a / "maps/maps.npz") as za, np.load(b / "maps/maps.npz") as zb:
        assert all(np.array_equal(za[k], zb[k]) for k in za.files)
    assert not np.allclose(procedural.centreline(4)[0][:50], procedural.centreline(3)[0][:50])
    shutil.rmtree(tmp_path / "b")
    t2 = load_track(a)  # a written scene loads like any scene folder
    assert np.array_equal(t2.progress, t.progress)
