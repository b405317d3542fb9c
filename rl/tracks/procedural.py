"""Seeded random closed circuits, written as racecar_gym scenes.

    path = scene_path(7)          # builds (once, cached) and returns the scene folder
    track = load_track("procedural:7")

A circuit is a star-shaped closed curve r(θ) — a periodic cubic spline through 7–12
jittered radii — so it never crosses itself; its curvature radius is kept above
``min_turn_radius`` (resampled deterministically otherwise) so that the walls at
±width/2 cannot fold. The curve is moved so that the start is at the origin with the
driving direction +x (clockwise or counter-clockwise at random), and written in the
scene format of rl.tracks.scene (yml, sdf, meshes/Walls.obj with 1 m walls, maps/maps.npz
compiled from those walls by rl.tracks.compile, maps/starts.npz), so it loads exactly like
racecar_gym's own. Same seed, same bytes.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.interpolate import CubicSpline

from rl.tracks.compile import compile_maps, save_maps
from rl.tracks.scene import cache_dir

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
    name = out.name
    pts, width = centreline(seed, params)
    inner, outer = wall_loops(pts, width)
    res = params.resolution
    allp = np.concatenate([inner, outer])
    lo = np.round(np.floor((allp.min(0) - 3.0) / res) * res, 6)  # exactly as the yml says
    hi = allp.max(0) + 3.0
    shape = (int(np.ceil((hi[1] - lo[1]) / res)), int(np.ceil((hi[0] - lo[0]) / res)))
    (out / "meshes").mkdir(parents=True, exist_ok=True)
    (out / "maps").mkdir(exist_ok=True)
    write_obj(out / "meshes" / "Walls.obj", [inner, outer])
    (out / "meshes" / "Floor.obj").write_text(
        "o Floor\n"
        f"v {lo[0]:.3f} {lo[1]:.3f} 0\nv {hi[0]:.3f} {lo[1]:.3f} 0\n"
        f"v {hi[0]:.3f} {hi[1]:.3f} 0\nv {lo[0]:.3f} {hi[1]:.3f} 0\nf 1 2 3\nf 1 3 4\n")
    (out / f"{name}.sdf").write_text(_SDF.format(name=name))
    (out / f"{name}.yml").write_text(_YML.format(name=name, res=res, ox=lo[0], oy=lo[1]))
    half = width / 2
    starts = np.array([[1.3, 0.3 * half, 0.05, 0, 0, 0], [1.0, -0.3 * half, 0.05, 0, 0, 0],
                       [0.5, 0.3 * half, 0.05, 0, 0, 0], [0.2, -0.3 * half, 0.05, 0, 0, 0]])
    np.savez(out / "maps" / "starts.npz", data=starts)
    maps = compile_maps(out / "meshes" / "Walls.obj", res, (float(lo[0]), float(lo[1])), shape,
                        (0.0, 0.0))
    save_maps(out / "maps" / "maps.npz", maps, res, shape,
              extra={"centreline": pts.astype(np.float32),
                     "width": np.array([width], np.float32)})
    return out


# Named families of circuits: "procedural:<seed>" is the default family,
# "procedural:<family>:<seed>" another. "tight": narrower roads and sharper corners — the
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
}


def scene_path(seed: int, family: str = "") -> Path:
    """The cached scene folder of `seed` in circuit `family` (built on first use)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown procedural family {family!r}; known: {sorted(FAMILIES)}")
    name = f"procedural_{family + '_' if family else ''}{seed}"
    out = cache_dir() / f"procedural-v{VERSION}" / name
    if (out / "maps" / "maps.npz").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".build-")) / name
    write_scene(tmp, seed, FAMILIES[family])
    try:
        tmp.rename(out)
    except OSError:  # built concurrently
        pass
    shutil.rmtree(tmp.parent, ignore_errors=True)
    return out
