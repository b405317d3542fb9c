"""racecar_gym track scenes: load them, or compile their maps from the wall mesh alone.

A scene is a folder (or a .zip holding one) in racecar_gym's format::

    <name>.yml            map: resolution 0.05, origin [ox, oy, 0], maps, starting_grid, checkpoints
    <name>.sdf            models `walls` and `floor`
    meshes/Walls.obj      the walls, 1 m tall
    maps/maps.npz         drivable_area (H, W) bool, norm_distance_from_start,
                          norm_distance_to, norm_distance_to_obstacle in [0, 1]
    maps/starts.npz       data (K, 6): x y z roll pitch yaw

Pixel of world (x, y): row = int(H - (y - oy) / res), col = int((x - ox) / res).
Tracks start at the origin facing +x; progress grows in that direction.

    track = load_track("austria")            # ../shared/data/racecar_tracks/austria[.zip]
    track = load_track("path/to/berlin")     # no maps.npz: compiled once, cached
    track = load_track("procedural:7")       # rl.procedural, seeded

Compiled maps follow the conventions measured on racecar_gym's own Austria maps:
progress is an 8-connected (Chebyshev) wavefront from the start pixel with the start
line as a barrier behind it, normalized by its maximum; norm_distance_to the octile
(8-connected, diagonal sqrt 2) geodesic distance still to drive to the line, normalized
by its maximum; norm_distance_to_obstacle the Euclidean distance transform of the
drivable area (pixels to the nearest non-drivable pixel) normalized by its maximum.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra

COMPILER_VERSION = 7
# racecar_gym's drivable_area extends this many pixels beyond the wall line (measured on
# Austria: pixels whose centre lies 1.5 px outside are drivable, 1.94 px are not).
WALL_MARGIN_PX = 1.75
REPO_ROOT = Path(__file__).resolve().parents[1]
MAP_KEYS = ("drivable_area", "norm_distance_from_start", "norm_distance_to",
            "norm_distance_to_obstacle")


class TrackError(RuntimeError):
    """A scene that is missing or broken; the message says which file and why."""


# ---------------------------------------------------------------------------- the track


@dataclass(frozen=True, eq=False)
class Track:
    name: str
    resolution: float
    origin: tuple[float, float]
    drivable: np.ndarray  # (H, W) bool
    progress: np.ndarray  # (H, W) float32, norm_distance_from_start
    dist_to: np.ndarray  # (H, W) float32, norm_distance_to
    obstacle: np.ndarray  # (H, W) float32, norm_distance_to_obstacle
    obstacle_m: np.ndarray  # (H, W) float32, metres from a drivable pixel to the wall
    starts: np.ndarray  # (K, 6) x y z roll pitch yaw
    checkpoints: int
    scene_dir: Path
    lap_length_m: float
    centreline: np.ndarray = field(repr=False)  # (N, 2) world x, y ordered by progress

    @property
    def shape(self) -> tuple[int, int]:
        return self.drivable.shape

    def world_to_pixel(self, x: float, y: float) -> tuple[int, int]:
        """racecar_gym's GridMap.to_pixel: (row, col), unclipped ints."""
        h = self.drivable.shape[0]
        ox, oy = self.origin
        return int(h - (y - oy) / self.resolution), int((x - ox) / self.resolution)

    def pixel_to_world(self, row, col):
        """Centre of pixel (row, col) in world metres (vectorized)."""
        h = self.drivable.shape[0]
        ox, oy = self.origin
        x = ox + (np.asarray(col) + 0.5) * self.resolution
        y = oy + (h - np.asarray(row) - 0.5) * self.resolution
        return x, y

    def world_to_pixel_array(self, x, y, xp=np):
        """Vectorized world_to_pixel for numpy or jax.numpy, clipped into the map."""
        return world_to_pixel_array(x, y, self.origin, self.resolution, self.drivable.shape, xp)

    def value(self, grid: np.ndarray, x, y):
        r, c = self.world_to_pixel_array(x, y)
        return grid[r, c]

    @property
    def scene_yml(self) -> Path:
        return self.scene_dir / f"{self.name}.yml"

    @property
    def scene_sdf(self) -> Path:
        return self.scene_dir / f"{self.name}.sdf"


def world_to_pixel_array(x, y, origin, resolution, shape, xp=np):
    """(row, col) int32 arrays of world points, clipped into the map; numpy or jax.numpy.

    Same as int(...) truncation for points inside the map (all there are positive)."""
    h, w = shape
    ox, oy = origin
    r = xp.floor(h - (y - oy) / resolution).astype(xp.int32)
    c = xp.floor((x - ox) / resolution).astype(xp.int32)
    return xp.clip(r, 0, h - 1), xp.clip(c, 0, w - 1)


# ---------------------------------------------------------------------------- loading


def tracks_dir() -> Path:
    env = os.environ.get("RACEFORMER_TRACKS")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "data" / "racecar_tracks"


def cache_dir() -> Path:
    env = os.environ.get("RACEFORMER_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "raceformer"
    d = base / "tracks"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".probe"
        probe.touch()
        probe.unlink()
    except OSError:
        d = Path(tempfile.gettempdir()) / "raceformer-tracks"
        d.mkdir(parents=True, exist_ok=True)
    return d


def resolve_scene(name_or_path: str | os.PathLike) -> Path:
    """A scene folder or .zip for a path, or a bare name under tracks_dir()."""
    p = Path(name_or_path)
    if p.exists():
        return p
    s = str(name_or_path)
    if os.sep not in s and "/" not in s:
        base = tracks_dir()
        for cand in (base / s, base / f"{s}.zip"):
            if cand.exists():
                return cand
        raise TrackError(f"track {s!r}: neither {base / s} nor {base / s}.zip exists "
                         f"(set RACEFORMER_TRACKS to the folder holding racecar_gym scenes)")
    raise TrackError(f"track {s!r}: no such file or folder")


def _hash_files(paths, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _extract_zip(zpath: Path) -> Path:
    """Extract once into the cache, named by the zip's content hash; returns the scene dir."""
    key = _hash_files([zpath])
    out = cache_dir() / f"{zpath.stem}-zip-{key}"
    if not (out / ".complete").exists():
        try:
            zf = zipfile.ZipFile(zpath)
        except zipfile.BadZipFile as e:
            raise TrackError(f"{zpath}: not a valid zip ({e})") from e
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".extract-"))
        with zf:
            for info in zf.infolist():
                target = (tmp / info.filename).resolve()
                if not str(target).startswith(str(tmp.resolve())):
                    raise TrackError(f"{zpath}: unsafe member path {info.filename!r}")
            zf.extractall(tmp)
        (tmp / ".complete").touch()
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:  # a concurrent process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    ymls = list(out.glob("*.yml")) + list(out.glob("*/*.yml"))
    if not ymls:
        raise TrackError(f"{zpath}: no <name>.yml in the archive")
    return ymls[0].parent


def _scene_yml(scene: Path) -> Path:
    cand = scene / f"{scene.name}.yml"
    if cand.exists():
        return cand
    ymls = sorted(scene.glob("*.yml"))
    if len(ymls) != 1:
        raise TrackError(f"{scene}: expected one <name>.yml, found {[y.name for y in ymls]}")
    return ymls[0]


def read_scene_config(scene: Path) -> dict:
    yml = _scene_yml(scene)
    try:
        cfg = yaml.safe_load(yml.read_text())
        m = cfg["map"]
        cfg["_resolution"] = float(m["resolution"])
        cfg["_origin"] = (float(m["origin"][0]), float(m["origin"][1]))
        cfg["_checkpoints"] = int(m.get("checkpoints", 5))
        cfg["_maps"] = scene / m.get("maps", "maps/maps.npz")
        cfg["_starts"] = scene / m.get("starting_grid", "maps/starts.npz")
        cfg["_name"] = str(cfg.get("name", yml.stem))
    except (yaml.YAMLError, KeyError, TypeError, IndexError, ValueError) as e:
        raise TrackError(f"{yml}: broken scene config ({type(e).__name__}: {e})") from e
    return cfg


def _load_npz(path: Path, keys) -> dict:
    if not path.exists():
        raise TrackError(f"{path}: missing")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise TrackError(f"{path}: missing arrays {missing} (has {z.files})")
            return {k: z[k] for k in keys}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise TrackError(f"{path}: unreadable npz ({e})") from e


def _load_optional(path: Path, key: str):
    with np.load(path, allow_pickle=False) as z:
        return z[key] if key in z.files else None


def load_track(name_or_path: str | os.PathLike, *, verbose: bool = False) -> Track:
    """Load a scene by name, folder, .zip, or ``procedural:<seed>``."""
    s = str(name_or_path)
    if s.startswith("procedural:"):
        from rl import procedural

        try:
            seed = int(s.split(":", 1)[1])
        except ValueError as e:
            raise TrackError(f"{s!r}: expected procedural:<int seed>") from e
        return load_track(procedural.scene_path(seed), verbose=verbose)
    src = resolve_scene(name_or_path)
    scene = _extract_zip(src) if src.suffix == ".zip" else src
    if not scene.is_dir():
        raise TrackError(f"{scene}: not a scene folder or .zip")
    cfg = read_scene_config(scene)
    if not cfg["_maps"].exists():
        scene = compiled_scene(scene, verbose=verbose)
        cfg = read_scene_config(scene)
    maps = _load_npz(cfg["_maps"], MAP_KEYS)
    stored_centre = _load_optional(cfg["_maps"], "centreline")
    starts = _load_npz(cfg["_starts"], ["data"])["data"].astype(np.float64)
    if starts.ndim != 2 or starts.shape[1] != 6:
        raise TrackError(f"{cfg['_starts']}: 'data' must be (K, 6), got {starts.shape}")
    drivable = maps["drivable_area"].astype(bool)
    if drivable.ndim != 2 or not drivable.any():
        raise TrackError(f"{cfg['_maps']}: drivable_area empty or not 2-D")
    for k in MAP_KEYS[1:]:
        if maps[k].shape != drivable.shape:
            raise TrackError(f"{cfg['_maps']}: {k} shape {maps[k].shape} != {drivable.shape}")
    res = cfg["_resolution"]
    edt = ndimage.distance_transform_edt(drivable)
    # metres to the wall surface: the drivable edge lies 0.5 px past the last drivable
    # centre and the wall WALL_MARGIN_PX inside it (see compile_maps)
    obstacle_m = (np.maximum(edt - 0.5 - WALL_MARGIN_PX, 0.0) * res).astype(np.float32)
    progress = maps["norm_distance_from_start"].astype(np.float32)
    obstacle = maps["norm_distance_to_obstacle"].astype(np.float32)
    if stored_centre is not None and stored_centre.ndim == 2 and stored_centre.shape[1] == 2:
        centre = stored_centre.astype(np.float64)
    else:
        centre = centreline_from_maps(drivable, progress, obstacle, cfg["_origin"], res)
    lap = float(np.sum(np.linalg.norm(np.diff(centre, axis=0, append=centre[:1]), axis=1)))
    return Track(
        name=cfg["_name"], resolution=res, origin=cfg["_origin"], drivable=drivable,
        progress=progress, dist_to=maps["norm_distance_to"].astype(np.float32),
        obstacle=obstacle, obstacle_m=obstacle_m, starts=starts,
        checkpoints=cfg["_checkpoints"], scene_dir=scene, lap_length_m=lap, centreline=centre,
    )


def centreline_from_maps(drivable, progress, obstacle, origin, res, n: int = 256):
    """(n, 2) world points along the lap: per progress bin, the mean of its pixels lying
    on the ridge of the obstacle distance (>= 80% of the bin's widest)."""
    h = drivable.shape[0]
    rows, cols = np.nonzero(drivable)
    p = progress[rows, cols]
    o = obstacle[rows, cols]
    b = np.minimum((p * n).astype(np.int64), n - 1)
    omax = np.zeros(n)
    np.maximum.at(omax, b, o)
    keep = o >= 0.8 * omax[b]
    cnt = np.bincount(b[keep], minlength=n).astype(np.float64)
    xs = np.bincount(b[keep], weights=origin[0] + (cols[keep] + 0.5) * res, minlength=n)
    ys = np.bincount(b[keep], weights=origin[1] + (h - rows[keep] - 0.5) * res, minlength=n)
    ok = cnt > 0
    return np.stack([xs[ok] / cnt[ok], ys[ok] / cnt[ok]], axis=1).astype(np.float64)


# ---------------------------------------------------------------------------- compiler


def read_obj(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) and triangles (T, 3) of a Wavefront OBJ (polygons fan-triangulated)."""
    if not path.exists():
        raise TrackError(f"{path}: missing wall mesh")
    verts, tris = [], []
    try:
        for line in path.read_text().splitlines():
            if line.startswith("v "):
                verts.append([float(t) for t in line.split()[1:4]])
            elif line.startswith("f "):
                idx = [int(t.split("/")[0]) for t in line.split()[1:]]
                idx = [i - 1 if i > 0 else len(verts) + i for i in idx]
                for k in range(1, len(idx) - 1):
                    tris.append((idx[0], idx[k], idx[k + 1]))
    except (ValueError, IndexError) as e:
        raise TrackError(f"{path}: broken OBJ ({e})") from e
    if not verts or not tris:
        raise TrackError(f"{path}: no vertices or faces")
    return np.asarray(verts, np.float64), np.asarray(tris, np.int64)


def wall_segments(verts: np.ndarray, tris: np.ndarray, z: float = 0.5) -> np.ndarray:
    """Cross-section of the mesh with the plane at height z: (S, 2, 2) segments in x, y."""
    t = verts[tris]  # (T, 3, 3)
    d = t[:, :, 2] - z
    segs = []
    for a, b in ((0, 1), (1, 2), (2, 0)):
        da, db = d[:, a], d[:, b]
        cross = (da * db) < 0
        s = np.where(cross, da / np.where(cross, da - db, 1.0), 0.0)
        pts = t[:, a, :2] + s[:, None] * (t[:, b, :2] - t[:, a, :2])
        segs.append((cross, pts))
    ok = np.stack([c for c, _ in segs], 1)  # (T, 3)
    pts = np.stack([p for _, p in segs], 1)  # (T, 3, 2)
    two = ok.sum(1) == 2
    out = []
    for mask_pair in ((0, 1), (1, 2), (0, 2)):
        m = two & ok[:, mask_pair[0]] & ok[:, mask_pair[1]]
        out.append(np.stack([pts[m, mask_pair[0]], pts[m, mask_pair[1]]], 1))
    # faces lying in the plane or flat horizontal caps contribute nothing here; walls are
    # vertical so every wall face straddling z yields exactly one segment.
    return close_gaps(np.concatenate(out, 0))


def close_gaps(segs: np.ndarray, max_gap: float = 1.0) -> np.ndarray:
    """Bridge holes in the wall outline: endpoints used an odd number of times are open
    ends; join each to its nearest open partner closer than max_gap (torino's mesh lacks
    the side faces of 0.675 m of wall at x = -5.3..-4.6, y = 0.87)."""
    if len(segs) == 0:
        return segs
    key = np.round(segs.reshape(-1, 2), 4)
    uniq, cnt = np.unique(key, axis=0, return_counts=True)
    open_ends = uniq[cnt % 2 == 1]
    extra, used = [], set()
    for i in range(len(open_ends)):
        if i in used:
            continue
        d = np.linalg.norm(open_ends - open_ends[i], axis=1)
        d[i] = np.inf
        d[list(used)] = np.inf
        j = int(np.argmin(d))
        if np.isfinite(d[j]) and d[j] <= max_gap:
            used.update((i, j))
            extra.append([open_ends[i], open_ends[j]])
    if not extra:
        return segs
    return np.concatenate([segs, np.asarray(extra, segs.dtype)], 0)


def _rasterize_segments(segs, origin, res, shape, sub: int):
    """Mark fine pixels (res / sub) touched by any segment; returns the fine bool grid."""
    h, w = shape[0] * sub, shape[1] * sub
    fres = res / sub
    grid = np.zeros((h, w), bool)
    a, b = segs[:, 0], segs[:, 1]
    length = np.linalg.norm(b - a, axis=1)
    n = np.maximum(np.ceil(length / (fres * 0.25)).astype(np.int64), 1) + 1
    idx = np.repeat(np.arange(len(segs)), n)
    start = np.cumsum(n) - n
    tt = (np.arange(n.sum()) - np.repeat(start, n)) / np.repeat(n - 1, n).clip(1)
    p = a[idx] + tt[:, None] * (b[idx] - a[idx])
    r, c = world_to_pixel_array(p[:, 0], p[:, 1], origin, fres, (h, w))
    grid[r, c] = True
    return grid


def _pixel_graph(mask: np.ndarray, diag_weight: float, cut: list[tuple[int, int, int, int]]):
    """Sparse 8-neighbour graph over the True pixels of mask, minus the directed-free cut
    edges (both directions) given as (r0, c0, r1, c1) pixel pairs."""
    h, w = mask.shape
    ids = -np.ones(mask.shape, np.int64)
    rr, cc = np.nonzero(mask)
    ids[rr, cc] = np.arange(len(rr))
    cutset = {(a, b, c, d) for a, b, c, d in cut} | {(c, d, a, b) for a, b, c, d in cut}
    src, dst, wt = [], [], []
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        r1, c1 = rr + dr, cc + dc
        ok = (r1 >= 0) & (r1 < h) & (c1 >= 0) & (c1 < w)
        r0, c0, r1, c1 = rr[ok], cc[ok], r1[ok], c1[ok]
        ok2 = mask[r1, c1]
        r0, c0, r1, c1 = r0[ok2], c0[ok2], r1[ok2], c1[ok2]
        if cutset:
            keep = np.array([(a, b, c, d) not in cutset for a, b, c, d in
                             zip(r0.tolist(), c0.tolist(), r1.tolist(), c1.tolist(),
                                 strict=True)], bool)
            r0, c0, r1, c1 = r0[keep], c0[keep], r1[keep], c1[keep]
        src.append(ids[r0, c0])
        dst.append(ids[r1, c1])
        wt.append(np.full(len(r0), diag_weight if dr and dc else 1.0))
    src, dst, wt = (np.concatenate(v) for v in (src, dst, wt))
    n = len(rr)
    g = coo_matrix((wt, (src, dst)), shape=(n, n)).tocsr()
    return g, ids, rr, cc


def _line_cut(drivable: np.ndarray, seed: tuple[int, int], left_col: int):
    """Edges crossing between column left_col and left_col + 1 within the start line run."""
    r0, _ = seed
    col = drivable[:, left_col] | drivable[:, left_col + 1]
    top = r0
    while top - 1 >= 0 and col[top - 1]:
        top -= 1
    bot = r0
    while bot + 1 < drivable.shape[0] and col[bot + 1]:
        bot += 1
    cut = []
    for r in range(top - 1, bot + 2):
        for dr in (-1, 0, 1):
            cut.append((r, left_col, r + dr, left_col + 1))
    return cut


def _grow_past_walls(free, walls, labels, lab, thr, extra):
    """racecar_gym's drivable area reaches ~1.75 px past the wall line. Grow the free
    region that far into the solid beyond a wall — but never through a wall that has
    track on both sides: solid thinner than twice the margin (torino's inner sliver,
    ~0.17 m) stays solid, and so do wall lines not bordering grown solid."""
    dist = ndimage.distance_transform_edt(~free)
    near = dist <= thr
    solid = ~walls & (labels != lab)
    # solid reaching beyond the margin (+0.5 coarse px); thin slivers have none of it
    reach = thr + extra
    deep = solid & (dist > reach)
    allowed = solid & (ndimage.distance_transform_edt(~deep) <= reach + 1.5) if deep.any() \
        else np.zeros_like(solid)
    allowed_walls = walls & ndimage.binary_dilation(allowed, iterations=2)
    return free | (near & (allowed | allowed_walls))


def compile_maps(walls_obj: Path, resolution: float = 0.05, origin=(-50.0, -50.0),
                 shape=(2000, 2000), start_pose=(0.0, 0.0), sub: int = 3,
                 margin_px: float = WALL_MARGIN_PX, verbose: bool = False) -> dict:
    """The four racecar_gym maps of a scene from its wall mesh alone.

    Walls are cut at z = 0.5 m, rasterized on a grid `sub` times finer than `resolution`
    and a pixel is drivable when its centre's fine cell is reachable (4-connected flood
    fill) from the start. Progress / distance-to are graph wavefronts around the track
    with the start line (the column through start_pose, the car facing +x) as the barrier.
    """
    t0 = time.perf_counter()
    verts, tris = read_obj(Path(walls_obj))
    segs = wall_segments(verts, tris, z=0.5 * 1.0)
    if len(segs) == 0:
        raise TrackError(f"{walls_obj}: the mesh has no wall faces crossing z = 0.5 m")
    h, w = shape
    # work in a window around the walls (a few pixels of padding), then paste back
    pad = int(np.ceil(margin_px)) + 4
    r_lo, c_lo = world_to_pixel_array(segs[..., 0].min(), segs[..., 1].max(), origin,
                                      resolution, shape)
    r_hi, c_hi = world_to_pixel_array(segs[..., 0].max(), segs[..., 1].min(), origin,
                                      resolution, shape)
    r0, c0 = max(int(r_lo) - pad, 0), max(int(c_lo) - pad, 0)
    r1, c1 = min(int(r_hi) + pad + 1, h), min(int(c_hi) + pad + 1, w)
    wshape = (r1 - r0, c1 - c0)
    worigin = (origin[0] + c0 * resolution, origin[1] + (h - r1) * resolution)
    walls_fine = _rasterize_segments(segs, worigin, resolution, wshape, sub)
    fres = resolution / sub
    sr, sc = world_to_pixel_array(np.float64(start_pose[0]), np.float64(start_pose[1]),
                                  worigin, fres, walls_fine.shape)
    labels, _ = ndimage.label(~walls_fine)
    lab = labels[int(sr), int(sc)]
    if lab == 0:
        raise TrackError(f"{walls_obj}: the start {start_pose} lies on a wall")
    free_fine = labels == lab
    if free_fine[0, :].any() or free_fine[-1, :].any() or free_fine[:, 0].any() \
            or free_fine[:, -1].any():
        raise TrackError(f"{walls_obj}: the track is not closed (the flood fill from the start "
                         f"reaches the map border)")
    if margin_px > 0:
        free_fine = _grow_past_walls(free_fine, walls_fine, labels, lab, margin_px * sub + 0.5,
                                     0.5 * sub)
    off = sub // 2  # the fine cell holding each coarse pixel's centre (sub odd: exact)
    coarse = free_fine[off::sub, off::sub][: wshape[0], : wshape[1]]
    # walls that stayed walls (thin ones with track on both sides) must not vanish between
    # the sampled centres: block every coarse pixel they touch, 8-connected-tight
    blocked = (walls_fine & ~free_fine).reshape(wshape[0], sub, wshape[1], sub).any((1, 3))
    if blocked.any():
        blocked = ndimage.binary_dilation(blocked, structure=np.ones((2, 2), bool))
    drivable = np.zeros(shape, bool)
    drivable[r0:r1, c0:c1] = coarse & ~blocked
    t1 = time.perf_counter()
    out = wavefront_maps(drivable, resolution, origin, start_pose)
    out["drivable_area"] = drivable
    if verbose:
        print(f"compile_maps {walls_obj}: raster+fill {t1 - t0:.1f}s, "
              f"wavefronts {time.perf_counter() - t1:.1f}s, {drivable.sum()} drivable px")
    return out


def wavefront_maps(drivable, resolution, origin, start_pose=(0.0, 0.0)) -> dict:
    """progress, distance-to and obstacle maps from a drivable grid (see module doc)."""
    h, w = drivable.shape
    seed = world_to_pixel_array(np.float64(start_pose[0]), np.float64(start_pose[1]),
                                origin, resolution, (h, w))
    seed = (int(seed[0]), int(seed[1]))
    if not drivable[seed]:
        raise TrackError(f"the start {start_pose} is not drivable")
    # forward: barrier between the seed's column and the one behind it (Chebyshev BFS)
    g, ids, rr, cc = _pixel_graph(drivable, 1.0, _line_cut(drivable, seed, seed[1] - 1))
    dist = dijkstra(g, directed=False, indices=ids[seed], unweighted=True)
    # backward (distance still to go): barrier ahead of the seed, octile metric
    g2, _, _, _ = _pixel_graph(drivable, float(np.sqrt(2.0)), _line_cut(drivable, seed, seed[1]))
    dist2 = dijkstra(g2, directed=False, indices=ids[seed])
    for d in (dist, dist2):
        d[~np.isfinite(d)] = 0.0
    progress = np.zeros((h, w), np.float64)
    progress[rr, cc] = dist / max(dist.max(), 1.0)
    dist_to = np.zeros((h, w), np.float64)
    dist_to[rr, cc] = dist2 / max(dist2.max(), 1.0)
    edt = ndimage.distance_transform_edt(drivable)
    obstacle = edt / max(edt.max(), 1.0)
    return {"norm_distance_from_start": progress, "norm_distance_to": dist_to,
            "norm_distance_to_obstacle": obstacle, "lap_px": float(dist.max())}


def save_maps(path: Path, maps: dict, resolution: float, shape, extra=None) -> None:
    """maps.npz in racecar_gym's layout (compressed; `properties` as upstream's 12 floats
    are not documented, we store [resolution, H, W, compiler version])."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        drivable_area=maps["drivable_area"].astype(bool),
        norm_distance_from_start=maps["norm_distance_from_start"].astype(np.float32),
        norm_distance_to=maps["norm_distance_to"].astype(np.float32),
        norm_distance_to_obstacle=maps["norm_distance_to_obstacle"].astype(np.float32),
        properties=np.array([resolution, shape[0], shape[1], COMPILER_VERSION], np.float64),
        **(extra or {}),
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def scene_grid(scene: Path, cfg: dict, margin: float = 5.0):
    """Map shape for a scene without maps: enough pixels from the yml origin to cover the
    walls plus a margin (racecar_gym's own scenes use 2000 x 2000 at 0.05 m)."""
    verts, _ = read_obj(scene / "meshes" / "Walls.obj")
    res = cfg["_resolution"]
    ox, oy = cfg["_origin"]
    wmax = int(np.ceil((verts[:, 0].max() + margin - ox) / res))
    hmax = int(np.ceil((verts[:, 1].max() + margin - oy) / res))
    if verts[:, 0].min() < ox or verts[:, 1].min() < oy:
        raise TrackError(f"{scene}: walls extend below the map origin {cfg['_origin']}")
    return (hmax, wmax)


def compiled_scene(scene: Path, verbose: bool = False) -> Path:
    """A cached copy of `scene` with maps/maps.npz compiled from its wall mesh."""
    cfg = read_scene_config(scene)
    walls = scene / "meshes" / "Walls.obj"
    yml = _scene_yml(scene)
    files = [yml, walls] + ([cfg["_starts"]] if cfg["_starts"].exists() else [])
    key = _hash_files(files, extra=f"v{COMPILER_VERSION}")
    out = cache_dir() / f"{cfg['_name']}-compiled-{key}"
    maps_path = out / Path(cfg["map"].get("maps", "maps/maps.npz"))
    if maps_path.exists():
        return out
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".compile-"))
    shutil.copytree(scene, tmp, dirs_exist_ok=True)
    for p in tmp.rglob("*"):  # shared/ is read-only; make our copy writable
        p.chmod(0o755 if p.is_dir() else 0o644)
    tmp.chmod(0o755)
    shape = scene_grid(scene, cfg)
    maps = compile_maps(walls, cfg["_resolution"], cfg["_origin"], shape, (0.0, 0.0),
                        verbose=verbose)
    save_maps(tmp / maps_path.relative_to(out), maps, cfg["_resolution"], shape)
    if out.exists():
        shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
