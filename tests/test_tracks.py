"""Track loading, the wall-mesh compiler (against racecar_gym's real Austria maps) and
procedural circuits. Tests that need ../shared/data skip when it is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from rl.tracks import (
    TrackError,
    compile_maps,
    load_track,
    procedural,
    read_scene_config,
    ring_topology,
    tracks_dir,
    world_to_pixel_array,
)

DATA = tracks_dir()
needs_austria = pytest.mark.skipif(not (DATA / "austria.zip").exists(),
                                   reason=f"racecar_gym scenes absent: {DATA}/austria.zip")


pytestmark = pytest.mark.usefixtures("private_track_cache")


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
    assert ring_topology(d) == ring_topology(real) == (1, 2)


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


def _mesh_only(name):
    if not (DATA / name).exists():
        pytest.skip(f"racecar_gym scene absent: {DATA / name}")
    return load_track(name)  # compiled once per module (the cache fixture above)


# montreal's compile once leaked across its thin, ragged spiral wall into one blob (a
# scripted car looped backwards through it: -9.72 laps, no collisions): every compiled
# track must be a ring, of a sane width, with progress rising once around its centreline.
@pytest.mark.parametrize("name", ["berlin", "montreal", "torino"])
def test_mesh_only_scenes_are_rings(name):
    t = _mesh_only(name)
    assert ring_topology(t.drivable) == (1, 2)  # one track; outside and one inner island
    c = t.centreline
    assert t.value(t.drivable, c[:, 0], c[:, 1]).all()
    width = 2 * t.value(t.obstacle_m, c[:, 0], c[:, 1])
    assert 1.0 < np.median(width) < 6.0 and np.percentile(width, 5) > 0.8, \
        np.percentile(width, [5, 50, 95])
    p, dp = _monotone_along_centreline(t)
    # monotone up to small local dips (the widest-point centreline swings through the
    # wide hairpin pocket of montreal: at most ~0.03 there) and exactly one wrap
    assert p[0] < 0.02 and p[-1] > 0.98, (p[0], p[-1])
    assert dp.min() > -0.04 and (dp < -1e-3).mean() < 0.05, (dp.min(), (dp < -1e-3).sum())
    assert dp[dp > 0].sum() < 1.1
    steps = np.linalg.norm(np.diff(c, axis=0), axis=1)
    assert steps.max() < 5.0  # a continuous loop, no jumps across a wall
    assert 0.8 < steps.sum() / t.lap_length_m < 1.25


def _prism_obj(path, rects, sides=True, height=1.0):
    """An OBJ of axis-aligned wall blocks (x0, y0, x1, y1), as an SVG extrusion has them:
    floor and top caps as triangles, side faces as quads (left out: sides=False)."""
    v, f = [], []
    for x0, y0, x1, y1 in rects:
        b = len(v) + 1
        for z in (0.0, height):
            v += [(x0, y0, z), (x1, y0, z), (x1, y1, z), (x0, y1, z)]
        f += [(b, b + 1, b + 2), (b, b + 2, b + 3), (b + 4, b + 6, b + 5), (b + 4, b + 7, b + 6)]
        if sides:
            f += [(b + k, b + (k + 1) % 4, b + 4 + (k + 1) % 4, b + 4 + k) for k in range(4)]
    path.write_text("".join(f"v {x} {y} {z}\n" for x, y, z in v)
                    + "".join("f " + " ".join(map(str, q)) + "\n" for q in f))
    return path


# a square circuit around a 0.1 m thin plate (thinner than twice the wall margin): the
# margin must thin it, never open it; walls given by their floor caps alone still count
@pytest.mark.parametrize("sides", [True, False])
def test_compiler_thin_island_and_cap_only_walls(tmp_path, sides):
    frame = [(-10.5, 2.0, 10.5, 2.5), (-10.5, -16.5, 10.5, -16.0),
             (-10.5, -16.0, -10.0, 2.0), (10.0, -16.0, 10.5, 2.0)]
    plate = [(-7.0, -7.05, 7.0, -6.95)]
    obj = _prism_obj(tmp_path / "Walls.obj", frame + plate, sides=sides)
    m = compile_maps(obj, 0.05, (-12.0, -18.0), (440, 480), (0.0, 0.0))
    d = m["drivable_area"]
    assert ring_topology(d) == (1, 2)
    area = d.sum() * 0.05**2
    # 20 m x 18 m, less the plate, plus the ~0.09 m margin along 76 m of wall
    assert 20 * 18 + 2.0 < area < 20 * 18 + 8.0, area
    # the plate is still there, all along its length (8-connected-tight, one coarse
    # line at least), and not thicker than it is
    rows = slice(440 - int((-6.85 + 18) / 0.05), 440 - int((-7.15 + 18) / 0.05) + 1)
    cols = slice(int((-6.9 + 12) / 0.05), int((6.9 + 12) / 0.05))
    band = ~d[rows, cols]
    assert band.any(0).all() and band.sum(0).max() <= 4
    assert d[440 - int((-6.75 + 18) / 0.05), cols].all()
    assert d[440 - int((-7.25 + 18) / 0.05), cols].all()


def test_compiler_rejects_a_non_ring(tmp_path):
    frame = [(-10.5, 2.0, 10.5, 2.5), (-10.5, -16.5, 10.5, -16.0),
             (-10.5, -16.0, -10.0, 2.0), (10.0, -16.0, 10.5, 2.0)]
    obj = _prism_obj(tmp_path / "Walls.obj", frame)  # an empty box, no island
    with pytest.raises(TrackError, match="not a ring"):
        compile_maps(obj, 0.05, (-12.0, -18.0), (440, 480), (0.0, 0.0))
    m = compile_maps(obj, 0.05, (-12.0, -18.0), (440, 480), (0.0, 0.0), require_ring=False)
    assert ring_topology(m["drivable_area"]) == (1, 1)


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


def test_track_lists():
    from rl.tracks import track_names

    assert track_names("austria") == ["austria"]
    assert track_names("austria, procedural:2-4") == [
        "austria", "procedural:2", "procedural:3", "procedural:4"]
    assert track_names("procedural:tight:1-2") == ["procedural:tight:1", "procedural:tight:2"]
    for bad in ("austria,,berlin", "procedural:5-2", "procedural:a-b"):
        with pytest.raises(TrackError, match="procedural|empty"):
            track_names(bad)


def test_procedural_families():
    """procedural:<family>:<seed> is another generator preset, cached apart from the
    default family's seed; unknown families and bad seeds fail with the name."""
    def _min_turn_radius_of(t):
        return procedural._min_turn_radius(np.asarray(t.centreline, np.float64))

    tight = [load_track(f"procedural:tight:{i}") for i in (1, 2)]
    default = [load_track(f"procedural:{i}") for i in (1, 2)]
    assert all(t.scene_dir != d.scene_dir for t, d in zip(tight, default, strict=True))
    assert max(_min_turn_radius_of(t) for t in tight) < min(_min_turn_radius_of(d)
                                                            for d in default)
    wide = load_track("procedural:wide:1")
    half_width = [t.obstacle_m[t.drivable].max() for t in (wide, *default, *tight)]
    assert half_width[0] > 1.2 * max(half_width[1:])  # wide: 3.5-6 m roads, others <= 3 m
    with pytest.raises(TrackError, match="unknown procedural family 'nosuch'"):
        load_track("procedural:nosuch:1")
    with pytest.raises(TrackError, match="expected procedural"):
        load_track("procedural:tight:x")


def test_tile_tracks_keeps_every_track_and_track_0_in_place():
    from rl.tracks import tile_tracks

    tracks = [load_track(f"procedural:{i}") for i in range(3)]
    tiled, offsets = tile_tracks(tracks)
    assert np.allclose(offsets[0], 0.0)
    assert tiled.drivable.sum() == sum(t.drivable.sum() for t in tracks)
    for t, (dx, dy) in zip(tracks, offsets, strict=True):
        # every track's drivable pixels, progress and clearance land where its offset says
        rows, cols = np.nonzero(t.drivable)
        x, y = t.pixel_to_world(rows, cols)
        np.testing.assert_array_equal(tiled.value(tiled.progress, x + dx, y + dy),
                                      t.progress[rows, cols])
        np.testing.assert_array_equal(tiled.value(tiled.obstacle_m, x + dx, y + dy),
                                      t.obstacle_m[rows, cols])
    # islands: no drivable pixel of one tile touches another tile's
    from scipy import ndimage

    assert ndimage.label(tiled.drivable)[1] == 3
    with pytest.raises(TrackError, match="tile_tracks: no tracks"):
        tile_tracks([])


@pytest.mark.parametrize("module", ["rl.tracks.scene", "rl.tracks.compile",
                                    "rl.tracks.procedural", "rl.tracks.track", "rl.tracks"])
def test_tracks_modules_import_standalone(module):
    """Each module of the rl.tracks package imports first in a fresh interpreter."""
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("member", ["../escape.txt", "/etc/escape.txt", "a/../../escape.txt"])
def test_zip_member_outside_the_folder_is_refused_leaving_nothing(tmp_path, monkeypatch, member):
    """A zipped track whose member would land outside the extraction folder: one line naming
    the archive and the member (no traceback from the command line), and no folder left in the
    cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RACEFORMER_CACHE", str(cache))
    zpath = tmp_path / "evil.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("evil/evil.yml", "name: evil\nmap: {resolution: 0.05, origin: [0, 0]}\n")
        z.writestr(member, "x")
    with pytest.raises(TrackError, match=rf"evil\.zip: refused member '{member}'"):
        load_track(zpath)
    assert [p.name for p in (cache / "tracks").iterdir()] == []
    assert not (tmp_path / "escape.txt").exists()

    r = subprocess.run([sys.executable, "-m", "rl.plan", "--tracks", str(zpath)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RACEFORMER_CACHE": str(cache)})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "evil.zip: refused member" in lines[0] and member in lines[0], \
        r.stderr
    assert [p.name for p in (cache / "tracks").iterdir()] == []
