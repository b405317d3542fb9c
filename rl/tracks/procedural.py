"""Seeded random closed circuits, written as racecar_gym scenes.

    path = scene_path(7)          # builds (once, cached) and returns the scene folder
    track = load_track("procedural:7")
    track = load_track("procedural:circuit:7")

Families ``procedural:[<family>:]<seed>`` (FAMILIES). The default, "tight" and "wide": a
star-shaped closed curve r(θ) — a periodic cubic spline through 7–12 jittered radii — so it
never crosses itself; its curvature radius is kept above ``min_turn_radius`` (resampled
deterministically otherwise) so that the walls at ±width/2 cannot fold; one width per track.

"circuit" (RaceCircuitParams, versioned apart by CIRCUIT_VERSION): what real circuits have and
star-shaped curves cannot. A jittered polygon of 4–7 corners gets one or two hairpin
"fingers" (out of or into the polygon: two long straights into a V or U tip turning
154–186°) and up to two chicanes or S-bends inserted into its edges; every corner becomes
a circular arc (fillet) and every edge a straight. The road width is drawn per corner
(1.5–5 m) and blends smoothly along the straights, so the walls are offset curves with a
variable half-width; every corner's radius stays above the car's reach (2.5 m) and half
its width plus a margin, and every two parts of the track that are not adjacent keep
their walls 1 m apart — which also rules out self-intersection. A lap that breaks a rule
(or lacks a hairpin of >= 150° within 12 m, a 10 m start straight, a lap length of
60–200 m) is redrawn from the same random stream, as is one whose compiled drivable
area is not a ring; half the seeds run clockwise.

Either way the curve is moved so that the start is at the origin with the driving
direction +x (for "circuit": on its longest straight), and written in the scene format of
rl.tracks.scene (yml, sdf, meshes/Walls.obj with 1 m walls, maps/maps.npz compiled from
those walls by rl.tracks.compile with the centreline and width alongside,
maps/starts.npz), so it loads exactly like racecar_gym's own. Same seed, same bytes.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.interpolate import CubicSpline

from rl.tracks.compile import compile_maps, save_maps
from rl.tracks.scene import TrackError, cache_dir

VERSION = 2
DEFAULT_TRACK = "procedural:0"


@dataclass(frozen=True)
class CircuitParams:
    radius: tuple[float, float] = (9.0, 15.0)  # mean radius range, m
    n_ctrl: tuple[int, int] = (7, 12)  # control points of the radial spline
    jitter: float = 0.38  # relative radial perturbation
    width: tuple[float, float] = (2.0, 3.0)  # track width range, m
    min_turn_radius: float = 2.5  # m, at the centreline
    resolution: float = 0.05
    samples: int = 1024  # centreline points


def centreline(seed: int, params: CircuitParams = CircuitParams()):
    """(samples, 2) centreline starting at the origin heading +x, and the width."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, VERSION]))
    width = float(rng.uniform(*params.width))
    for _ in range(200):
        n = int(rng.integers(params.n_ctrl[0], params.n_ctrl[1] + 1))
        theta = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * (2 * np.pi / n)
        theta = np.sort(theta)
        r_mean = rng.uniform(*params.radius)
        r = r_mean * (1.0 + rng.uniform(-params.jitter, params.jitter, n))
        t_knots = np.append(theta, theta[0] + 2 * np.pi)
        spline = CubicSpline(t_knots, np.append(r, r[0]), bc_type="periodic")
        t = theta[0] + np.linspace(0.0, 2 * np.pi, params.samples, endpoint=False)
        rr = spline(t)
        if rr.min() < 2.0 * width:
            continue
        pts = np.stack([rr * np.cos(t), rr * np.sin(t)], 1)
        if _min_turn_radius(pts) < params.min_turn_radius + width / 2:
            continue
        break
    else:  # pragma: no cover - the parameters above always find one quickly
        raise RuntimeError(f"procedural seed {seed}: no admissible circuit in 200 draws")
    if rng.random() < 0.5:  # clockwise half of the time
        pts = pts[::-1]
    # start at a random point, move it to the origin, rotate its heading onto +x
    k = int(rng.integers(len(pts)))
    pts = np.roll(pts, -k, axis=0)
    head = pts[1] - pts[-1]
    a = -np.arctan2(head[1], head[0])
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = (pts - pts[0]) @ rot.T
    return pts, width


def _min_turn_radius(pts: np.ndarray) -> float:
    d1 = (np.roll(pts, -1, 0) - np.roll(pts, 1, 0)) / 2
    d2 = np.roll(pts, -1, 0) - 2 * pts + np.roll(pts, 1, 0)
    k = np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]) / np.maximum(
        np.linalg.norm(d1, axis=1) ** 3, 1e-12)
    return float(1.0 / max(k.max(), 1e-9))


def _normals(pts):
    d = np.roll(pts, -1, 0) - np.roll(pts, 1, 0)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return np.stack([-d[:, 1], d[:, 0]], 1)  # left of the driving direction


def wall_loops(pts, width):
    nrm = _normals(pts)
    return pts + nrm * width / 2, pts - nrm * width / 2


def write_obj(path: Path, loops, height: float = 1.0) -> None:
    """Each closed polyline becomes a ribbon of vertical quads (two triangles each)."""
    lines = ["# raceformer procedural walls", "o Walls"]
    vcount = 0
    faces = []
    for loop in loops:
        n = len(loop)
        for x, y in loop:
            lines.append(f"v {x:.6f} {y:.6f} 0.000000")
            lines.append(f"v {x:.6f} {y:.6f} {height:.6f}")
        for i in range(n):
            j = (i + 1) % n
            a, b = vcount + 2 * i + 1, vcount + 2 * i + 2  # bottom, top (1-based)
            c, d = vcount + 2 * j + 1, vcount + 2 * j + 2
            faces.append(f"f {a} {c} {d}")
            faces.append(f"f {a} {d} {b}")
        vcount += 2 * n
    path.write_text("\n".join(lines + faces) + "\n")


_SDF = """<?xml version="1.0" encoding="UTF-8"?>
<sdf version="1.6">
  <world name="{name}">
    <gravity>0 0 -9.8</gravity>
    <model name="walls">
      <static>1</static>
      <pose frame="">0 0 0 0 0 0</pose>
      <link name="link_d0">
        <collision concave="yes" name="collision_0">
          <geometry><mesh><scale>1 1 1</scale><uri>meshes/Walls.obj</uri></mesh></geometry>
        </collision>
        <visual name="visual">
          <geometry><mesh><scale>1 1 1</scale><uri>meshes/Walls.obj</uri></mesh></geometry>
        </visual>
      </link>
    </model>
    <model name="floor">
      <static>1</static>
      <pose frame="">0 0 0 0 0 0</pose>
      <link name="link_d0">
        <collision concave="yes" name="collision_0">
          <geometry><mesh><scale>1 1 1</scale><uri>meshes/Floor.obj</uri></mesh></geometry>
        </collision>
        <visual name="visual">
          <geometry><mesh><scale>1 1 1</scale><uri>meshes/Floor.obj</uri></mesh></geometry>
        </visual>
      </link>
    </model>
  </world>
</sdf>
"""

_YML = """name: {name}
sdf: {name}.sdf
map:
  resolution: {res}
  origin: [{ox:.6f}, {oy:.6f}, 0.0]
  maps: maps/maps.npz
  starting_grid: maps/starts.npz
  checkpoints: 5

physics:
  gravity: -9.81

simulation:
  time_step: 0.01
  rendering: False
"""


def write_scene(out: Path, seed: int, params: CircuitParams = CircuitParams()) -> Path:
    """Write the scene of `seed` into folder `out` (created); returns out."""
    pts, width = centreline(seed, params)
    inner, outer = wall_loops(pts, width)
    _write_scene_files(out, [inner, outer], width / 2, params.resolution,
                       {"centreline": pts.astype(np.float32),
                        "width": np.array([width], np.float32)})
    return out


def _write_scene_files(out: Path, loops, half_start: float, res: float, extra: dict,
                       sub: int = 3) -> None:
    """The scene folder of closed wall polylines `loops` (the start at the origin facing +x,
    the track `2 * half_start` wide there): yml, sdf, meshes, starts and compiled maps (with
    the arrays of `extra`; walls rasterized `sub` times finer than `res`, as compile_maps).
    Raises TrackError when the compiled track is not a ring."""
    name = out.name
    allp = np.concatenate(loops)
    lo = np.round(np.floor((allp.min(0) - 3.0) / res) * res, 6)  # exactly as the yml says
    hi = allp.max(0) + 3.0
    shape = (int(np.ceil((hi[1] - lo[1]) / res)), int(np.ceil((hi[0] - lo[0]) / res)))
    (out / "meshes").mkdir(parents=True, exist_ok=True)
    (out / "maps").mkdir(exist_ok=True)
    write_obj(out / "meshes" / "Walls.obj", loops)
    (out / "meshes" / "Floor.obj").write_text(
        "o Floor\n"
        f"v {lo[0]:.3f} {lo[1]:.3f} 0\nv {hi[0]:.3f} {lo[1]:.3f} 0\n"
        f"v {hi[0]:.3f} {hi[1]:.3f} 0\nv {lo[0]:.3f} {hi[1]:.3f} 0\nf 1 2 3\nf 1 3 4\n")
    (out / f"{name}.sdf").write_text(_SDF.format(name=name))
    (out / f"{name}.yml").write_text(_YML.format(name=name, res=res, ox=lo[0], oy=lo[1]))
    half = half_start
    starts = np.array([[1.3, 0.3 * half, 0.05, 0, 0, 0], [1.0, -0.3 * half, 0.05, 0, 0, 0],
                       [0.5, 0.3 * half, 0.05, 0, 0, 0], [0.2, -0.3 * half, 0.05, 0, 0, 0]])
    np.savez(out / "maps" / "starts.npz", data=starts)
    maps = compile_maps(out / "meshes" / "Walls.obj", res, (float(lo[0]), float(lo[1])), shape,
                        (0.0, 0.0), sub=sub)
    save_maps(out / "maps" / "maps.npz", maps, res, shape, extra=extra)


# ---------------------------------------------------------------------------------------------
# The "circuit" family: a random polygon with hairpin fingers and chicanes, its corners
# replaced by circular arcs (fillets), the road width varying along the lap.

CIRCUIT_VERSION = 1


@dataclass(frozen=True)
class RaceCircuitParams:
    target_lap: tuple[float, float] = (65.0, 190.0)  # drawn lap length, m
    lap: tuple[float, float] = (60.0, 200.0)  # accepted lap length, m
    mean_width: tuple[float, float] = (2.0, 4.0)  # a track's typical road width, m
    width: tuple[float, float] = (1.5, 5.0)  # the road width anywhere, m
    width_spread: float = 1.25  # ± m around the typical width, per corner
    min_width_range: float = 0.8  # m: the width varies at least this much along the lap
    hairpin_width: float = 4.0  # m, widest road at a hairpin
    min_radius: float = 2.5  # m, centreline (the car's tightest turn is 1.75 m)
    fold_margin: float = 0.75  # m: a corner's radius >= its width / 2 + this
    wall_gap: float = 1.0  # m between the walls of two parts of the track that are not adjacent
    width_slope: float = 0.15  # m of width change per m of straight, on average, at most
    hairpin: tuple[float, float] = (150.0, 12.0)  # required: degrees of turn within m of arc
    start_straight: float = 10.0  # m: the longest straight, which holds the start
    resolution: float = 0.05
    step: float = 0.1  # m between wall-mesh vertices along the centreline
    samples: int = 1024  # stored centreline points
    # the maps' walls rasterized this many times finer than `resolution` (compile_maps):
    # 1 compiles ~4x faster, for pools of thousands, and differs from 3 in ~0.2 % of the
    # drivable pixels (the walls' edges, a pixel either way)
    compile_sub: int = 3
    # the random stream a family's seeds draw from (with the seed and CIRCUIT_VERSION): a
    # family that only loosens a constraint would otherwise repeat another's tracks seed for
    # seed (every lap admissible under a 1 m wall gap is admissible under a thinner one too)
    stream: int = 7
    # required, if set: (t, l) — somewhere along the lap a dividing wall thinner than t m
    # between parts of the track that are not adjacent, over at least l m of road
    thin_wall: tuple[float, float] | None = None
    # if set: (probability, shortest, longest) — each corner of >= 60° gets, with that
    # probability, a bay: its outer wall runs on straight for 1.5-4 m before it turns back
    # to the road, leaving a dead-end pocket where the road seems to go on (berlin's last
    # corner has one: lidar policies trained on bay-free circuits end their laps there)
    bays: tuple[float, float, float] | None = None
    # a bay's dead end: 0 — its wall turns straight back to the road (a wedge that narrows to
    # a point); f > 0 — it first runs across, f × the road's width toward the corner's inside,
    # so the pocket keeps the approach's width to its end (berlin's pocket is such a box,
    # ~1.5 m wide and ~2.5 m deep; where the full width does not fit, 0.8 f, then 0.6 f)
    bay_width: float = 0.0
    # if set: the probability of a bay at the entry of each hairpin — a corner from whose
    # start the road turns >= 150° within 9 m (hairpin_entries) — in place of `bays`' (the
    # other corners keep it), and a lap is kept only if at least one hairpin got its bay.
    # Berlin's pocket lies straight on from the start of a ~150° turn round a thin wall's
    # tip, a shape "culdesac" makes in one lap of three (seeds 0-59: 20)
    bay_hairpin: float | None = None


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class _Feature(NamedTuple):
    """Vertices to insert into a polygon edge: `local` (k, 2) as (along, out) m from the
    feature's centre on the edge ("out": away from the polygon's inside), their widths and
    radii (nan: drawn with the polygon's corners), the length of edge they span and the
    length they add to the lap."""
    local: np.ndarray
    widths: list
    radii: list
    span: float
    added: float


def _r_min(p: RaceCircuitParams, width: float) -> float:
    return max(p.min_radius, width / 2 + p.fold_margin)


def _finger(rng, p: RaceCircuitParams, width, depth: float) -> _Feature:
    """A hairpin finger `depth` m deep: mouth, tip (one vertex, "V", or two, "U") and mouth
    again; out of the polygon, or into it (negative depth)."""
    w_tip = min(width(), p.hairpin_width)
    r_tip = _r_min(p, w_tip) + rng.uniform(0.0, 0.8)
    alpha = np.radians(rng.uniform(-6.0, 26.0))  # the legs converge by alpha towards the tip
    d = abs(depth)
    v_tip = alpha > np.radians(14) and d > r_tip / np.tan(alpha / 2) + 6.0 \
        and rng.random() < 0.6
    cap = 0.0 if v_tip else 2 * r_tip * np.tan((np.pi - alpha) / 4) + rng.uniform(0.1, 1.5)
    mouth = cap + 2 * d * np.tan(alpha / 2)
    skew = rng.uniform(-0.2, 0.2) * d
    tips = [(skew - cap / 2, depth)] + ([] if v_tip else [(skew + cap / 2, depth)])
    local = np.array([(-mouth / 2, 0.0), *tips, (mouth / 2, 0.0)])
    w_mouth = [width(), width()]
    r_mouth = [_r_min(p, w) + rng.uniform(0.0, 5.0) for w in w_mouth]
    return _Feature(local, [w_mouth[0]] + [w_tip] * len(tips) + [w_mouth[1]],
                    [r_mouth[0]] + [r_tip] * len(tips) + [r_mouth[1]], mouth,
                    float(np.linalg.norm(np.diff(local, axis=0), axis=1).sum() - mouth))


def _swerve(rng, p: RaceCircuitParams, width, chicane: bool) -> _Feature:
    """A chicane (short, narrow, tight) or an S-bend (long, wide, open): the road steps
    sideways and back."""
    length = rng.uniform(6.0, 10.0) if chicane else rng.uniform(12.0, 24.0)
    off = (rng.uniform(1.2, 2.5) if chicane else rng.uniform(2.5, 5.0)) * rng.choice([-1, 1])
    w = [width()] * 2
    r = [_r_min(p, w[0]) + rng.uniform(0.0, 2.5)] * 2 if chicane else [np.nan] * 2
    return _Feature(np.array([(-length / 2, off), (length / 2, -off)]), w, r, length, 0.0)


def _circuit_polygon(rng, p: RaceCircuitParams):
    """A random polygon, counter-clockwise: a jittered star of 4-7 corners with one or two
    hairpin fingers (outward or inward) and up to two chicanes or S-bends inserted into its
    edges, scaled to a drawn lap length. Returns vertices (m, 2), their widths and preset
    radii (nan: to draw, under the returned largest radius)."""
    lap = float(np.exp(rng.uniform(*np.log(p.target_lap))))  # log-uniform
    n = int(rng.integers(4, 6 + (lap > 110) + (lap > 150)))
    ang = (np.arange(n) + rng.uniform(-0.25, 0.25, n)) * (2 * np.pi / n) + rng.uniform(0, 7)
    rad = rng.uniform(0.6, 1.0, n)
    base = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1) * [rng.uniform(1.0, 1.7), 1.0]
    mean_w = rng.uniform(*p.mean_width)

    def width():
        return float(np.clip(mean_w + rng.uniform(-p.width_spread, p.width_spread), *p.width))

    fingers = [_finger(rng, p, width, (lap * rng.uniform(0.06, 0.12) + 5.0)
                       * (1 if rng.random() < 0.6 else -1))
               for _ in range(1 + int(rng.random() < 0.4))]
    swerves = [_swerve(rng, p, width, rng.random() < 0.6)
               for _ in range(int(rng.integers(0, 3)))]
    # the arcs cut the corners: the polygon is ~10% longer than the lap
    base *= max(1.1 * lap - sum(f.added for f in fingers), 0.4 * lap) / np.linalg.norm(
        np.roll(base, -1, 0) - base, axis=1).sum()
    edge_len = np.linalg.norm(np.roll(base, -1, 0) - base, axis=1)
    on_edge: dict[int, _Feature] = {}
    for k, f in enumerate(fingers + swerves):  # fingers on the longest free edges
        free = [i for i in range(n) if i not in on_edge and edge_len[i] >= f.span + 12.0]
        if free:
            on_edge[max(free, key=lambda i: edge_len[i]) if k < len(fingers)
                    else free[int(rng.integers(len(free)))]] = f
    verts, widths, radii = [], [], []
    for i in range(n):
        a, b = base[i], base[(i + 1) % n]
        verts.append(a)
        widths.append(width())
        radii.append(np.nan)
        if i in on_edge:
            f, ell = on_edge[i], edge_len[i]
            e = (b - a) / ell
            out = np.array([e[1], -e[0]])  # right of a counter-clockwise edge: outside
            u = rng.uniform(f.span / 2 + 6.0, ell - f.span / 2 - 6.0)
            verts += list(a + (u + f.local[:, :1]) * e + f.local[:, 1:] * out)
            widths += f.widths
            radii += f.radii
    return (np.asarray(verts), np.asarray(widths, np.float64), np.asarray(radii, np.float64),
            float(np.clip(lap / 12, 5.0, 18.0)))


def _fillets(rng, verts, widths, radii, r_max, p: RaceCircuitParams):
    """Radii for the corners without one (log-uniform up to `r_max`), shrunk where two
    corners' arcs would overlap on an edge, and widths evened out along short straights.
    Returns (turn, radius, tangent length, straight length, widths) per vertex (straight i
    runs from corner i to i + 1), or None when the corners cannot fit."""
    e = np.roll(verts, -1, 0) - verts
    ell = np.linalg.norm(e, axis=1)
    if ell.min() < 0.5:
        return None
    e /= ell[:, None]
    e_in = np.roll(e, 1, 0)
    turn = np.arctan2(e_in[:, 0] * e[:, 1] - e_in[:, 1] * e[:, 0], (e_in * e).sum(1))
    if np.abs(turn).max() > np.radians(172.0):
        return None
    r_min = np.maximum(p.min_radius, widths / 2 + p.fold_margin)
    drawn = np.exp(rng.uniform(np.log(r_min), np.log(np.maximum(r_min, r_max))))
    r = np.where(np.isnan(radii), drawn, radii)
    tan = np.tan(np.abs(turn) / 2)
    t = r * tan
    t_min = r_min * tan
    m = len(verts)
    for i in range(m):  # shrink the arcs on over-full edges, by their slack (t only shrinks)
        j = (i + 1) % m
        excess = t[i] + t[j] - ell[i]
        if excess <= 0:
            continue
        slack = np.array([t[i] - t_min[i], t[j] - t_min[j]])
        if slack.sum() < excess:
            return None
        cut = excess * slack / slack.sum()
        t[i] -= cut[0]
        t[j] -= cut[1]
    r = np.where(tan > 1e-9, t / np.maximum(tan, 1e-12), r)
    straight = np.maximum(ell - t - np.roll(t, -1), 0.0)
    w = widths.copy()
    for _ in range(2 * m):  # a width change needs straight to happen on: narrow the wider end
        changed = False
        for i in range(m):
            j = (i + 1) % m
            room = p.width_slope * straight[i]
            if abs(w[i] - w[j]) > room + 1e-9:
                k = i if w[i] > w[j] else j
                w[k] = min(w[i], w[j]) + room
                changed = True
        if not changed:
            break
    return turn, r, t, straight, w


class _Lap:
    """A closed centreline of arcs and straights: position, heading and width at arc
    length s (vectorized)."""

    def __init__(self, verts, turn, r, t, straight, w):
        e = _unit(np.roll(verts, -1, 0) - verts)
        e_in = np.roll(e, 1, 0)
        self.turn, self.r, self.w, self.straight = turn, r, w, straight
        self.arc = r * np.abs(turn)
        th_in = np.arctan2(e_in[0, 1], e_in[0, 0]) + np.concatenate([[0.0], np.cumsum(turn)])
        self.th_in = th_in[:-1]  # unwrapped heading entering each corner
        self.th_total = th_in[-1] - th_in[0]
        self.p_in = verts - t[:, None] * e_in
        self.p_out = verts + t[:, None] * e
        lengths = np.stack([self.arc, straight], 1).ravel()  # arc 0, straight 0, arc 1, ...
        self.starts = np.concatenate([[0.0], np.cumsum(lengths)[:-1]])
        self.length = float(lengths.sum())

    def at(self, s):
        s = np.mod(s, self.length)
        piece = np.clip(np.searchsorted(self.starts, s, side="right") - 1, 0,
                        len(self.starts) - 1)
        i, on_straight = piece // 2, piece % 2 == 1
        u = s - self.starts[piece]
        k = np.where(self.turn[i] >= 0, 1.0, -1.0) / self.r[i]
        th0 = self.th_in[i]
        th_arc = th0 + k * u
        arc_pt = self.p_in[i] + np.stack([np.sin(th_arc) - np.sin(th0),
                                          np.cos(th0) - np.cos(th_arc)], 1) / k[:, None]
        th_str = th0 + self.turn[i]
        str_pt = self.p_out[i] + u[:, None] * np.stack([np.cos(th_str), np.sin(th_str)], 1)
        j = (i + 1) % len(self.r)
        x = np.clip(u / np.maximum(self.straight[i], 1e-9), 0.0, 1.0)
        w_str = self.w[i] + (self.w[j] - self.w[i]) * x * x * (3 - 2 * x)
        pts = np.where(on_straight[:, None], str_pt, arc_pt)
        heading = np.where(on_straight, th_str, th_arc)
        return pts, heading, np.where(on_straight, w_str, self.w[i])


def _admissible(lap: _Lap, p: RaceCircuitParams, ds: float = 0.4) -> bool:
    """Lap length in range, a hairpin, a long enough start straight, a width that varies,
    and walls that keep `wall_gap` from every part of the track that is not adjacent
    (which also rules out self-intersection)."""
    if not p.lap[0] <= lap.length <= p.lap[1] or lap.straight.max() < p.start_straight:
        return False
    if lap.w.max() - lap.w.min() < p.min_width_range:
        return False
    n = int(np.ceil(lap.length / ds))
    s = np.arange(n) * (lap.length / n)
    pts, th, w = lap.at(s)
    k = int(round(p.hairpin[1] / (lap.length / n)))
    th_ext = np.concatenate([th, th[:k] + lap.th_total])
    swing = max(np.abs(th_ext[j:j + n] - th).max() for j in range(1, k + 1))
    if swing < np.radians(p.hairpin[0]):
        return False
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    sep = np.abs(s[:, None] - s[None])
    sep = np.minimum(sep, lap.length - sep)
    need = (w[:, None] + w[None]) / 2 + p.wall_gap
    apart = sep > np.pi / 2 * need
    if np.any((d < need) & apart):
        return False
    if p.thin_wall is not None:  # road beside a wall thinner than t: enough arc of it
        t, length = p.thin_wall
        beside = np.any((d < need - p.wall_gap + t) & apart, axis=1)
        return beside.sum() * (lap.length / n) >= length
    return True


def _circuit_laps(seed: int, p: RaceCircuitParams):
    """Admissible laps of `seed`, one after the other (deterministic): (lap, start arc
    length). About one polygon in two or three is admissible."""
    # the stream (7 by default) keeps these families' draws apart from the star-shaped
    # families' and from each other's
    rng = np.random.default_rng(np.random.SeedSequence([seed, CIRCUIT_VERSION, p.stream]))
    for _ in range(10_000):
        verts, widths, radii, r_max = _circuit_polygon(rng, p)
        if rng.random() < 0.5:  # clockwise: mirror the counter-clockwise polygon
            verts = verts * [1.0, -1.0]
        fit = _fillets(rng, verts, widths, radii, r_max, p)
        if fit is None:
            continue
        lap = _Lap(verts, *fit)
        if not _admissible(lap, p):
            continue
        i = int(np.argmax(lap.straight))  # start on the longest straight
        ell = lap.straight[i]
        s0 = lap.starts[2 * i + 1] + float(np.clip(rng.uniform(0.25, 0.5) * ell, 4.0, ell - 8.0))
        yield lap, s0
    raise RuntimeError(f"procedural circuit {seed}: no admissible lap in 10000 draws "
                       f"({p})")  # pragma: no cover - the defaults take ~2.5 draws a lap


def circuit_centreline(seed: int, params: RaceCircuitParams = RaceCircuitParams(), n=None,
                       skip: int = 0):
    """The centreline (n, 2) from the start at the origin heading +x, the width (n,) and
    the heading (n,) (radians from +x, continuous but for one 2π wrap) along it, of the
    `skip`-th admissible lap of `seed`; n points, every `params.step` m unless given."""
    laps = _circuit_laps(seed, params)
    for _ in range(skip):
        next(laps)
    lap, s0 = next(laps)
    return _placed(lap, s0, params, n)


def _placed(lap: _Lap, s0: float, p: RaceCircuitParams, n=None):
    n = int(round(lap.length / p.step)) if n is None else n
    pts, th, w = lap.at(s0 + np.arange(n) * (lap.length / n))
    a = -th[0]
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return (pts - pts[0]) @ rot.T, w, th - th[0]


def write_circuit_scene(out: Path, seed: int,
                        params: RaceCircuitParams = RaceCircuitParams()) -> Path:
    """Write the "circuit" scene of `seed` into folder `out`; a lap whose compiled drivable
    area is not a ring (or, where ``params.bay_hairpin`` is set, whose hairpins took no bay)
    is skipped for the next admissible one of the same seed."""
    failed = None
    for lap, s0 in itertools.islice(_circuit_laps(seed, params), 20):
        pts, w, th = _placed(lap, s0, params)
        nrm = np.stack([-np.sin(th), np.cos(th)], 1) * (w / 2)[:, None]
        centre, w_c, _ = _placed(lap, s0, params, params.samples)
        loops = [pts + nrm, pts - nrm]
        if params.bays is not None:
            bay_rng = np.random.default_rng(np.random.SeedSequence([seed, CIRCUIT_VERSION,
                                                                    params.stream, 1]))
            loops, at_hairpins = _with_bays(bay_rng, lap, s0, pts, w, th, loops, params)
            if params.bay_hairpin is not None and not at_hairpins:
                failed = TrackError("no hairpin of the lap has room for a bay")
                continue  # the family requires one: the next lap
        try:
            _write_scene_files(out, loops, float(w[0]) / 2, params.resolution,
                               {"centreline": centre.astype(np.float32),
                                "width": w_c.astype(np.float32)}, sub=params.compile_sub)
            return out
        except TrackError as e:  # not a ring: the next lap
            failed = e
            shutil.rmtree(out, ignore_errors=True)
    raise TrackError(f"procedural circuit {seed}: 20 laps in a row were rejected (the "
                     f"last: {failed})") from failed


def _with_bays(rng, lap: _Lap, s0: float, pts, w, th, loops, p: RaceCircuitParams):
    """The wall loops (left, right) with bays (``p.bays``) cut into the outer wall of corners:
    from the corner's entry A the wall runs straight on to B (the approach's heading), across
    to E (``p.bay_width`` of the road's width toward the corner's inside; E = B where it is
    0), then back to a point C of the old wall that E sees without crossing the road. A bay is left
    out where it would come within ``p.wall_gap`` of a part of the track that is not adjacent,
    where it would reach round the lap's end, or where it would be a dent (< 0.5 m deep).
    Returns the loops and how many bays were cut at a hairpin's entry (hairpin_entries),
    where ``p.bay_hairpin``, if set, is the probability instead of ``p.bays``'."""
    prob, shortest, longest = p.bays
    hairpins = hairpin_entries(lap)
    at_hairpins = 0
    n = len(pts)
    ds = lap.length / n
    left, right = (np.asarray(x) for x in loops)
    cuts: dict[int, list] = {0: [], 1: []}
    taken_until = -1
    corners = np.argsort(np.mod(lap.starts[0::2] - s0, lap.length))
    for c in corners:
        pick = prob if p.bay_hairpin is None or not hairpins[c] else p.bay_hairpin
        if abs(lap.turn[c]) < np.radians(60.0) or rng.random() >= pick:
            continue
        k = int(np.mod(lap.starts[2 * c] - s0, lap.length) / ds)
        side = 1 if lap.turn[c] > 0 else 0  # a left turn's outer wall is the right one
        wall = (left, right)[side]
        length = rng.uniform(shortest, longest)
        reach = int(3 * length / ds)
        if k <= taken_until or k < 10 or k + reach + 10 >= n:
            continue
        a = wall[k]
        b = a + length * np.array([np.cos(th[k]), np.sin(th[k])])
        near = slice(max(0, k - 60), min(n, k + reach + 60))
        if not _clear(a, b, pts[near], w[near]):
            continue
        # the dead end's corner e: across toward the corner's inside by bay_width of the
        # road's width (less where that would cross the road), or b itself (a wedge)
        e = b
        if p.bay_width > 0:
            inside = np.sign(lap.turn[c]) * np.array([-np.sin(th[k]), np.cos(th[k])])
            tries = (b + f * p.bay_width * w[k] * inside for f in (1.0, 0.8, 0.6))
            e = next((q for q in tries if _clear(b, q, pts[near], w[near])), None)
            if e is None:
                continue
        ok = [j for j in range(k + 2, k + reach)
              if _clear(e, wall[j], pts[near], w[near], ends=slice(1, -1))]
        if not ok:
            continue
        j_max = ok[0]
        while j_max + 1 in ok:
            j_max += 1
        j = k + max(2, int(rng.uniform(0.5, 0.9) * (j_max - k)))
        path = [a, b, e] if p.bay_width > 0 else [a, b]
        poly = np.concatenate([_segment(u, v, p.step)
                               for u, v in zip(path, [*path[1:], wall[j]], strict=True)])
        arc = np.abs(np.arange(n) - k) * ds
        far = np.minimum(arc, lap.length - arc) > 2 * length + 5.0
        gap = np.linalg.norm(poly[:, None] - pts[None, far], axis=-1) - w[None, far] / 2
        if gap.size and gap.min() < p.wall_gap:
            continue
        edge = np.linalg.norm(poly[:, None] - pts[None], axis=-1) - w[None] / 2
        if edge.min() < -0.02:  # cuts the road between the points checked above
            continue
        if edge.min(1).max() < 0.5:  # a pocket the car could drive into, not a dent
            continue
        cuts[side].append((k, j, poly))
        taken_until = j
        at_hairpins += bool(hairpins[c])
    out = []
    for side, wall in enumerate((left, right)):
        for k, j, poly in sorted(cuts[side], key=lambda x: -x[0]):
            wall = np.concatenate([wall[:k], poly, wall[j + 1:]])
        out.append(wall)
    return out, at_hairpins


def hairpin_entries(lap: _Lap, degrees: float = 150.0, within: float = 9.0) -> np.ndarray:
    """Per corner of ``lap``: whether the road turns >= ``degrees`` in that corner's
    direction within ``within`` m of arc from the corner's start (a hairpin's first corner:
    a "V" tip's only one, a "U" tip's first of two)."""
    u = np.linspace(0.0, within, 91)
    s = lap.starts[0::2][:, None] + u[None]
    th = lap.at(s.ravel())[1].reshape(s.shape) + np.where(s >= lap.length, lap.th_total, 0.0)
    swept = np.sign(lap.turn)[:, None] * (th - th[:, :1])
    return swept.max(1) >= np.radians(degrees) - 1e-9


def _off_road(q, pts, w, margin: float = -0.02) -> bool:
    """Every point of ``q`` outside the road of centreline ``pts`` (or within ``-margin`` of
    its edge: a point on the wall counts; widths ``w``)."""
    return bool((np.linalg.norm(q[:, None] - pts[None], axis=-1) - w[None] / 2).min() > margin)


def _clear(u, v, pts, w, ends: slice = slice(1, None)) -> bool:
    """The segment u → v off the road (:func:`_off_road`), checked at ``ends`` of 12 evenly
    spaced points (default: all but u)."""
    return _off_road(u + np.linspace(0.0, 1.0, 12)[ends, None] * (v - u), pts, w)


def _segment(a, b, step: float):
    """Points from a to b (a included, b not), at most ``step`` apart."""
    m = max(1, int(np.ceil(np.linalg.norm(b - a) / step)))
    return a + np.arange(m)[:, None] / m * (b - a)


# Named families of circuits: "procedural:<seed>" is the default family,
# "procedural:<family>:<seed>" another (ranges such as "procedural:circuit:1-1000" expand in
# rl.tracks.track_names). "tight": narrower roads and sharper corners — the
# tightest centreline radius is 1.5-4.6 m over seeds 0-7 (default family: 4-10 m). Still
# star-shaped, so no hairpin as sharp as Austria's (`python -m rl.plan` checks whether a
# circuit can be lapped cleanly by this car at all).
FAMILIES = {
    "": CircuitParams(),
    "tight": CircuitParams(radius=(7.0, 12.0), n_ctrl=(8, 13), jitter=0.45, width=(1.9, 2.6),
                           min_turn_radius=0.5),
    # "wide": 3.5-6 m roads (the default family's are 2-3 m; montreal's reaches ~8 m)
    "wide": CircuitParams(radius=(11.0, 17.0), n_ctrl=(7, 12), jitter=0.4, width=(3.5, 6.0),
                          min_turn_radius=1.0),
    # "circuit": the filleted-polygon generator above (hairpins, chicanes, straights, a
    # width varying along the lap), versioned and cached apart (CIRCUIT_VERSION)
    "circuit": RaceCircuitParams(),
    # "hairpin": the same generator with real-circuit hairpins — a 170° turn within 9 m of
    # arc, tips 1.0-2.3 m in radius on roads up to 2.5 m wide (the inner wall 0.2 m from
    # folding). "circuit"'s corners stay >= 2.5 m: on the maps' ridge line its tightest 3 m
    # of arc turn at a 2.0-2.6 m radius, this family's at ~1.5-1.9 m, berlin's and Austria's
    # at 1.2-1.3 m (where the car, whose tightest turn is 1.75 m, uses the road's width).
    # `python -m rl.plan` found a clean lap in each of seeds 0-7.
    # Laps of 50-150 m, as long as the real tracks' (59-95 m) or a little longer; compiled
    # at the maps' own resolution (compile_sub = 1), ~1 CPU-s a track, for pools of thousands.
    "hairpin": RaceCircuitParams(min_radius=1.0, fold_margin=0.2, hairpin_width=2.5,
                                 mean_width=(1.8, 3.6), hairpin=(170.0, 9.0),
                                 target_lap=(55.0, 140.0), lap=(50.0, 150.0), compile_sub=1),
    # "thinwall": "hairpin" with the thin dividing walls real circuits have between parts of
    # the lap that run side by side — berlin's are 0.2-0.6 m thick, montreal's and torino's
    # down to 0.1 m (the maps' drivable areas), "hairpin"'s never under its 1 m wall gap —
    # and hairpin tips whose inner wall folds to 0.1 m. Each lap has ≥ 4 m of road beside a
    # wall thinner than 0.6 m (9 of seeds 0-9 compile to one; seed 9 to 0.76 m); own stream
    "thinwall": RaceCircuitParams(min_radius=1.0, fold_margin=0.1, wall_gap=0.15,
                                  thin_wall=(0.6, 4.0),
                                  hairpin_width=2.5, mean_width=(1.8, 3.6), hairpin=(170.0, 9.0),
                                  target_lap=(55.0, 140.0), lap=(50.0, 150.0), compile_sub=1,
                                  stream=8),
    # "bays": "thinwall" whose corners of >= 60° each have, one time in two, a dead-end
    # pocket off their outer wall 1.5-4 m deep, where the road seems to go on (berlin's
    # last corner; _with_bays); its own stream
    "bays": RaceCircuitParams(min_radius=1.0, fold_margin=0.1, wall_gap=0.15,
                              thin_wall=(0.6, 4.0), bays=(0.5, 1.5, 4.0),
                              hairpin_width=2.5, mean_width=(1.8, 3.6), hairpin=(170.0, 9.0),
                              target_lap=(55.0, 140.0), lap=(50.0, 150.0), compile_sub=1,
                              stream=9),
    # "culdesac": "bays" whose pockets keep the approach road's width to their flat dead end
    # (bay_width 1), the shape of berlin's last corner, where "bays"' wedges narrowing to a
    # point left 5 seeds of 6 driving into berlin's pocket; its own stream
    "culdesac": RaceCircuitParams(min_radius=1.0, fold_margin=0.1, wall_gap=0.15,
                                  thin_wall=(0.6, 4.0), bays=(0.5, 1.5, 4.0), bay_width=1.0,
                                  hairpin_width=2.5, mean_width=(1.8, 3.6),
                                  hairpin=(170.0, 9.0), target_lap=(55.0, 140.0),
                                  lap=(50.0, 150.0), compile_sub=1, stream=10),
    # "hairpinbay": "culdesac" whose hairpins each get the pocket straight on from their
    # entry that has room for one (bay_hairpin 1; other corners one time in two, as
    # before), at least one per lap: berlin's last corner is a ~150° turn round a thin
    # wall's tip with such a pocket where the road seems to go on, which "culdesac" has in
    # one lap of three (seeds 0-59: 20 laps, 23 of 77 hairpins); its own stream
    "hairpinbay": RaceCircuitParams(min_radius=1.0, fold_margin=0.1, wall_gap=0.15,
                                    thin_wall=(0.6, 4.0), bays=(0.5, 1.5, 4.0), bay_width=1.0,
                                    bay_hairpin=1.0, hairpin_width=2.5, mean_width=(1.8, 3.6),
                                    hairpin=(170.0, 9.0), target_lap=(55.0, 140.0),
                                    lap=(50.0, 150.0), compile_sub=1, stream=11),
}


def scene_path(seed: int, family: str = "") -> Path:
    """The cached scene folder of `seed` in circuit `family` (built on first use)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown procedural family {family!r}; known: {sorted(FAMILIES)}")
    name = f"procedural_{family + '_' if family else ''}{seed}"
    params = FAMILIES[family]
    circuit = isinstance(params, RaceCircuitParams)
    version = f"circuit-v{CIRCUIT_VERSION}" if circuit else f"v{VERSION}"
    out = cache_dir() / f"procedural-{version}" / name
    if (out / "maps" / "maps.npz").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".build-")) / name
    (write_circuit_scene if circuit else write_scene)(tmp, seed, params)
    try:
        tmp.rename(out)
    except OSError:  # built concurrently
        pass
    shutil.rmtree(tmp.parent, ignore_errors=True)
    return out
