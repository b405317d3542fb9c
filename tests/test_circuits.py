"""The "circuit" family of procedural tracks (rl.tracks.procedural): closed rings with a
hairpin, a width varying along the lap, both driving directions, deterministic per seed,
and loadable by the JAX backend. Scenes are built into a private cache folder."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rl.tracks import TrackError, load_track, procedural, ring_topology, track_names

SEEDS = (0, 11)  # short laps (small maps, quick compiles), one each way round
P = procedural.RaceCircuitParams()


pytestmark = pytest.mark.usefixtures("private_track_cache")


@pytest.fixture(scope="module")
def tracks(private_track_cache):
    return {s: load_track(f"procedural:circuit:{s}") for s in SEEDS}


def _max_turn_within(centre: np.ndarray, arc_m: float) -> float:
    """Largest heading change (degrees) between two points of a closed line at most
    `arc_m` apart along it."""
    seg = np.diff(centre, axis=0, append=centre[:1])
    th = np.unwrap(np.arctan2(seg[:, 1], seg[:, 0]))
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(seg, axis=1))])
    total = th[-1] - th[0] + np.remainder(np.arctan2(seg[0, 1], seg[0, 0]) - th[-1] + np.pi,
                                          2 * np.pi) - np.pi
    n = len(th)
    th2, s2 = np.concatenate([th, th + total]), np.concatenate([s[:-1], s[:-1] + s[-1]])
    best = 0.0
    for i in range(n):
        j = np.searchsorted(s2, s2[i] + arc_m, side="right")
        best = max(best, float(np.abs(th2[i:j] - th2[i]).max()))
    return np.degrees(best)


def _signed_area(c: np.ndarray) -> float:
    return 0.5 * float(np.sum(c[:, 0] * np.roll(c[:, 1], -1) - np.roll(c[:, 0], -1) * c[:, 1]))


def test_circuit_is_a_ring_with_a_hairpin_and_a_varying_width(tracks):
    for seed, t in tracks.items():
        assert ring_topology(t.drivable) == (1, 2), seed  # compiled, one track round one island
        c = t.centreline
        assert np.allclose(c[0], 0.0) and c[1, 0] > 0 and abs(c[1, 1]) < 1e-6  # start: +x
        assert np.linalg.norm(c[-1] - c[0]) < 0.3  # closed
        assert P.lap[0] <= t.lap_length_m <= P.lap[1]
        # one monotone lap of progress along the centreline, all of it drivable
        p = t.value(t.progress, c[:, 0], c[:, 1])
        assert t.value(t.drivable, c[:, 0], c[:, 1]).all()
        assert p[0] < 0.01 and p[-1] > 0.99
        # ... up to a few pixels: the map's progress is a Chebyshev wavefront, which a
        # hairpin's centreline can run a pixel against
        assert np.diff(p).min() > -3 * t.resolution / t.lap_length_m
        assert _max_turn_within(c, 12.0) >= 150.0, seed  # a hairpin
        with np.load(t.scene_dir / "maps" / "maps.npz") as z:
            w = z["width"]
        assert w.shape == (len(c),) and w.min() >= 1.5 - 1e-6 and w.max() <= 5.0 + 1e-6
        assert w.max() - w.min() >= P.min_width_range - 1e-6
        # the walls follow the width: twice the clearance at the centreline is the width
        # (to the 0.05 m pixels of the map)
        measured = 2 * t.value(t.obstacle_m, c[:, 0], c[:, 1])
        assert np.median(np.abs(measured - w)) < 0.1
        # the grid starts are on the track, clear of the walls
        clear = t.value(t.obstacle_m, t.starts[:, 0], t.starts[:, 1])
        assert (clear > 0.3).all()
    assert {np.sign(_signed_area(t.centreline)) for t in tracks.values()} == {-1.0, 1.0}


@pytest.mark.parametrize("family", ["circuit", "hairpin", "thinwall", "bays"])
def test_generator_guarantees_over_seeds(family):
    """No compile: the sampled centrelines of many seeds keep their promises (lap length,
    width range, hairpin, corner radius against the width, clearance between parts that
    are not adjacent) and both driving directions occur."""
    P = procedural.FAMILIES[family]
    areas = []
    tightest = []
    for seed in range(12):
        pts, w, th = procedural.circuit_centreline(seed, P)
        step = float(np.linalg.norm(pts[1] - pts[0]))
        lap = len(pts) * step
        assert P.lap[0] <= lap <= P.lap[1]
        assert P.width[0] - 1e-9 <= w.min() and w.max() <= P.width[1] + 1e-9
        # corner radius >= half the width + the margin (the walls cannot fold)
        k = np.abs(np.angle(np.exp(1j * np.diff(th)))) / step
        radius = 1.0 / np.maximum(k, 1e-9)
        assert (radius >= np.maximum(w[1:], w[:-1]) / 2 + P.fold_margin - 0.01).all()
        assert radius.min() >= P.min_radius - 0.01
        sub = slice(None, None, 4)
        assert _max_turn_within(pts[sub], P.hairpin[1]) >= P.hairpin[0] - 2.0
        tightest.append(radius.min())
        q, wq = pts[sub], w[sub]
        s = np.arange(len(q)) * step * 4
        d = np.linalg.norm(q[:, None] - q[None], axis=-1)
        sep = np.abs(s[:, None] - s[None])
        sep = np.minimum(sep, lap - sep)
        need = (wq[:, None] + wq[None]) / 2 + P.wall_gap
        far = sep > np.pi / 2 * need + 1.0
        assert (d[far] >= need[far] - 0.05).all()
        areas.append(_signed_area(pts))
    assert min(areas) < 0 < max(areas)  # clockwise and counter-clockwise both occur
    if family in ("hairpin", "thinwall", "bays"):  # tighter than "circuit" (corners >= 2.5 m)
        assert np.median(tightest) < 2.0, tightest
    thinnest = [_thinnest_wall(*procedural.circuit_centreline(seed, P)[:2], P.wall_gap)
                for seed in range(12)]
    if P.thin_wall:  # every lap runs beside a dividing wall thinner than 0.6 m
        assert max(thinnest) < 0.6, thinnest
    else:  # the others keep their 1 m wall gap between parts of the lap
        assert min(thinnest) > P.wall_gap - 0.05, thinnest


@pytest.mark.parametrize("family", ["bays", "culdesac", "hairpinbay"])
def test_bays_are_pockets_off_the_outer_wall_of_corners(family):
    """Each bay replaces a stretch of one wall by a straight run on from a corner's entry and
    a line back: every new wall point lies off the road (outside it or on its edge), at least
    wall_gap from every part of the track that is not adjacent, and bays are cut on most
    seeds, on the outer side of left and of right turns alike. "culdesac"'s pockets keep
    the road's width to their end: 0.5 m beyond the road they are ~1 m wide or more, where
    "bays"' wedges have mostly narrowed to a point."""
    P = procedural.FAMILIES[family]
    cut = {0: 0, 1: 0}
    widths: list[float] = []
    for seed in range(8):
        lap, s0 = next(procedural._circuit_laps(seed, P))
        pts, w, th = procedural._placed(lap, s0, P)
        nrm = np.stack([-np.sin(th), np.cos(th)], 1) * (w / 2)[:, None]
        old = [pts + nrm, pts - nrm]
        rng = np.random.default_rng(seed)
        new, _ = procedural._with_bays(rng, lap, s0, pts, w, th, old, P)
        for side in (0, 1):
            added = new[side][~(new[side][:, None] == old[side][None]).all(-1).any(1)]
            if not len(added):
                continue
            cut[side] += 1
            edge = np.linalg.norm(added[:, None] - pts[None], axis=-1) - w[None] / 2
            assert edge.min() >= -0.03, (seed, side, edge.min())
            # a pocket, not a dent: its far end lies >= 0.5 m off the road
            assert edge.min(1).max() >= 0.5, (seed, side)
            widths += _pocket_widths(new[side], old[side], pts, w, 0.5)
    assert cut[0] >= 2 and cut[1] >= 2, cut
    if P.bay_width > 0:  # seeds 0-7: median 1.1 m (bays: 0.54 m)
        assert np.median(widths) >= 1.0 and min(widths) >= 0.5, widths
    else:
        assert np.median(widths) < 0.7, widths


def _lap_of(verts, radius: float = 1.0, width: float = 1.5):
    """The lap round polygon ``verts`` (counter-clockwise), every corner of ``radius``."""
    verts = np.asarray(verts, np.float64)
    n = len(verts)
    fit = procedural._fillets(np.random.default_rng(0), verts, np.full(n, width),
                              np.full(n, radius), 5.0, procedural.FAMILIES["hairpinbay"])
    return procedural._Lap(verts, *fit)


def test_hairpin_entries_flag_the_first_corner_of_each_hairpin():
    """A 20 m × 2 m stadium turns 180° at each end within ~5 m: the first corner of each
    end is a hairpin's entry, the second is not (from it the road turns 90°, then runs
    straight); a 20 m square has none; 150° is the threshold."""
    stadium = _lap_of([(0, 0), (20, 0), (20, 2), (0, 2)])
    assert procedural.hairpin_entries(stadium).tolist() == [False, True, False, True]
    # the corner list starts at vertex 0, whose corner closes the lap: the wrap is handled
    assert procedural.hairpin_entries(_lap_of([(0, 2), (0, 0), (20, 0), (20, 2)])).tolist() \
        == [True, False, True, False]
    assert not procedural.hairpin_entries(_lap_of([(0, 0), (20, 0), (20, 20), (0, 20)])).any()
    assert procedural.hairpin_entries(stadium, degrees=181.0).sum() == 0


def test_hairpinbay_cuts_its_pockets_at_hairpins_and_keeps_only_laps_with_one(tmp_path):
    """"hairpinbay" is "culdesac" with its hairpins' bay probability 1 (and its own random
    stream): over seeds 0-11 its first laps get a bay at a hairpin's entry, where with that
    probability 0 none does; and a seed whose first lap has none is skipped for its next
    lap that has one."""
    import dataclasses
    hb = procedural.FAMILIES["hairpinbay"]
    culdesac = procedural.FAMILIES["culdesac"]
    assert dataclasses.replace(hb, bay_hairpin=None, stream=culdesac.stream) == culdesac
    no = dataclasses.replace(hb, bay_hairpin=0.0)

    def hairpin_bays(seed, p, skip=0):
        laps = procedural._circuit_laps(seed, p)
        for _ in range(skip):
            next(laps)
        lap, s0 = next(laps)
        pts, w, th = procedural._placed(lap, s0, p)
        nrm = np.stack([-np.sin(th), np.cos(th)], 1) * (w / 2)[:, None]
        rng = np.random.default_rng(np.random.SeedSequence(  # write_circuit_scene's
            [seed, procedural.CIRCUIT_VERSION, p.stream, 1]))
        return procedural._with_bays(rng, lap, s0, pts, w, th, [pts + nrm, pts - nrm], p)[1]

    with_one = [hairpin_bays(s, hb) for s in range(12)]
    assert sum(hairpin_bays(s, no) for s in range(12)) == 0
    assert sum(k > 0 for k in with_one) >= 4, with_one
    seed = next(s for s, k in enumerate(with_one) if k == 0)
    out = procedural.write_circuit_scene(tmp_path / "x", seed, hb)
    with np.load(out / "maps" / "maps.npz") as z:
        stored = z["centreline"]
    firsts = [procedural.circuit_centreline(seed, hb, n=hb.samples, skip=i)[0]
              for i in range(4)]
    kept = next(i for i, c in enumerate(firsts) if np.allclose(stored, c.astype(np.float32)))
    expected = next(i for i in range(4) if hairpin_bays(seed, hb, skip=i) > 0)
    assert kept == expected >= 1  # the laps before, without a hairpin bay, were skipped


def _pocket_widths(new_wall, old_wall, pts, w, beyond: float) -> list[float]:
    """Each pocket that ``new_wall`` cuts into ``old_wall`` (a run of new points, with the
    stretch of old wall it replaced): twice the largest clearance to the new wall at points
    inside it and ``beyond`` m or more off the road — the pocket's width at that depth."""
    from matplotlib.path import Path as Polygon

    def index_in_old(q):
        return int(np.flatnonzero((old_wall == q).all(-1))[0])

    added = ~(new_wall[:, None] == old_wall[None]).all(-1).any(1)
    widths = []
    idx = np.flatnonzero(added)
    for run in np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if len(idx) else []:
        a, b = index_in_old(new_wall[run[0] - 1]), index_in_old(new_wall[run[-1] + 1])
        ring = np.concatenate([new_wall[run[0] - 1:run[-1] + 2], old_wall[a + 1:b][::-1]])
        lo, hi = ring.min(0), ring.max(0)
        g = np.stack(np.meshgrid(*(np.arange(u, v, 0.05) for u, v in zip(lo, hi, strict=True))),
                     -1).reshape(-1, 2)
        g = g[Polygon(ring).contains_points(g)]
        g = g[(np.linalg.norm(g[:, None] - pts[None], axis=-1) - w[None] / 2).min(1) >= beyond]
        widths.append(0.0 if not len(g) else
                      2 * float(np.linalg.norm(g[:, None] - new_wall[None], axis=-1).min(1).max()))
    return widths


def _thinnest_wall(pts: np.ndarray, w: np.ndarray, wall_gap: float) -> float:
    """The thinnest wall (m, road edge to road edge) between two parts of a closed centreline
    that are not adjacent (more than π/2 × their clearance apart along the lap, + 1 m)."""
    q, wq = pts[::4], w[::4]
    step = float(np.linalg.norm(pts[1] - pts[0])) * 4
    s = np.arange(len(q)) * step
    lap = len(q) * step
    sep = np.abs(s[:, None] - s[None])
    sep = np.minimum(sep, lap - sep)
    half = (wq[:, None] + wq[None]) / 2
    gap = np.linalg.norm(q[:, None] - q[None], axis=-1) - half
    return float(gap[sep > np.pi / 2 * (half + wall_gap) + 1.0].min())


def test_same_seed_same_bytes_other_seed_differs(tracks, tmp_path):
    t = tracks[SEEDS[0]]
    a = procedural.write_circuit_scene(tmp_path / t.name, SEEDS[0])
    for f in ("maps/maps.npz", "maps/starts.npz", "meshes/Walls.obj", f"{t.name}.yml"):
        assert (a / f).read_bytes() == (t.scene_dir / f).read_bytes(), f
    other = tracks[SEEDS[1]]
    assert other.drivable.shape != t.drivable.shape or \
        not np.array_equal(other.drivable, t.drivable)
    c0, _, _ = procedural.circuit_centreline(SEEDS[0])
    c1, _, _ = procedural.circuit_centreline(SEEDS[1])
    assert len(c0) != len(c1) or not np.allclose(c0, c1)


def test_a_lap_that_does_not_compile_is_redrawn(tmp_path, monkeypatch):
    """A lap whose compiled drivable area is not a ring is replaced by the seed's next
    admissible lap, deterministically, instead of failing."""
    real = procedural.compile_maps
    calls = []

    def first_fails(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise TrackError("the compiled drivable area is not a ring")
        return real(*args, **kw)

    monkeypatch.setattr(procedural, "compile_maps", first_fails)
    out = procedural.write_circuit_scene(tmp_path / "x", 10)
    with np.load(out / "maps" / "maps.npz") as z:
        stored = z["centreline"]
    second, _, _ = procedural.circuit_centreline(10, n=P.samples, skip=1)
    assert len(calls) == 2 and np.allclose(stored, second.astype(np.float32))


def test_names_cache_and_jax_env(tracks):
    assert track_names("procedural:circuit:1-3") == [
        "procedural:circuit:1", "procedural:circuit:2", "procedural:circuit:3"]
    assert len(track_names("austria,procedural:circuit:1-1000")) == 1001
    t = tracks[SEEDS[0]]
    assert t.scene_dir.parent.name == f"procedural-circuit-v{procedural.CIRCUIT_VERSION}"
    assert t.scene_dir == procedural.scene_path(SEEDS[0], "circuit")  # cached: not rebuilt
    from rl.envs.jax_env import JaxRacecar, make_params
    from rl.envs.spec import TaskConfig

    env = JaxRacecar(TaskConfig())
    params = make_params(t)
    _, state = jax.jit(env.reset)(jax.random.PRNGKey(0), params)
    x, y = (float(v) for v in state.pos)  # racecar_gym's automatic grid, by the origin
    assert abs(x) < 2.0 and abs(y) < 1.0 and float(state.yaw) == 0.0
    assert t.value(t.obstacle_m, x, y) > 0.25 and not bool(state.collision)
    assert int(state.lap) == 1 and float(state.progress) < 0.05  # just past the line


def test_prebuild_cli_builds_the_cache_and_names_a_bad_track(capsys):
    """python -m rl.tracks fills the cache ahead of a run (a pool's thousands of maps) and
    names, on one line, a track it could not build, building the others (exit 1)."""
    from rl.tracks.__main__ import main

    assert main(["procedural:hairpin:3,no_such_track", "--workers", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rl.tracks: no_such_track: TrackError")
    out = procedural.scene_path(3, "hairpin")  # built: the cache has it
    assert (out / "maps" / "maps.npz").exists()
    assert out.parent.name == f"procedural-circuit-v{procedural.CIRCUIT_VERSION}"
    assert main(["procedural:hairpin:3"]) == 0  # cached: nothing to do
    assert main(["procedural:hairpin:x-y"]) == 2


def test_prebuild_workers_build_into_the_cache_of_the_call(tmp_path, monkeypatch):
    """The workers are forkserver children (no fork of a process running JAX), and the
    forkserver keeps the environment it started with: each call's workers still build into
    the RACEFORMER_CACHE of that call."""
    from rl.tracks.__main__ import build

    built = {}
    for name, track in (("a", "procedural:4"), ("b", "procedural:5")):
        monkeypatch.setenv("RACEFORMER_CACHE", str(tmp_path / name))
        assert build([track, "procedural:6"], 2, log=lambda _: None) == []
        built[name] = sorted(p.parents[1].name for p in (tmp_path / name).rglob("maps.npz"))
    assert built == {"a": ["procedural_4", "procedural_6"], "b": ["procedural_5", "procedural_6"]}
