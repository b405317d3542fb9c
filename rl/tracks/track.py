"""Tracks: a loaded scene (maps, starts, centreline) as a :class:`Track`, and track lists.

    track = load_track("austria")            # ../shared/data/racecar_tracks/austria[.zip]
    track = load_track("path/to/berlin")     # no maps.npz: compiled once, cached
    track = load_track("procedural:7")       # rl.tracks.procedural, seeded

``track_names`` expands a comma-separated track list, ``tile_tracks`` packs several
tracks into one map (the JAX backend's multi-track training).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

import rl.tracks.procedural as procedural
from rl.tracks.compile import WALL_MARGIN_PX, compiled_scene
from rl.tracks.scene import (
    TrackError,
    extract_zip,
    read_scene_config,
    resolve_scene,
    world_to_pixel_array,
)

MAP_KEYS = ("drivable_area", "norm_distance_from_start", "norm_distance_to",
            "norm_distance_to_obstacle")


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

    def plot_window(self, pad_px: int = 10):
        """(row slice, col slice) around the drivable area plus ``pad_px``, and its matplotlib
        ``extent`` (left, right, bottom, top) in world metres — for drawing maps."""
        rows, cols = np.nonzero(self.drivable)
        h, w = self.drivable.shape
        r0, r1 = max(rows.min() - pad_px, 0), min(rows.max() + pad_px, h)
        c0, c1 = max(cols.min() - pad_px, 0), min(cols.max() + pad_px, w)
        ox, oy = self.origin
        res = self.resolution
        extent = (ox + c0 * res, ox + c1 * res, oy + (h - r1) * res, oy + (h - r0) * res)
        return (slice(r0, r1), slice(c0, c1)), extent

    def cropped(self, margin_m: float = 2.0) -> Track:
        """The same track on the map window holding its drivable area plus ``margin_m`` on
        every side (walls included): identical lookups for every drivable position, and maps
        small enough to stay in cache (Austria: 2000² → ~600² pixels). Where the map has
        less margin than that it is padded with wall (not drivable, zero distances and
        progress). World coordinates do not change."""
        rows, cols = np.nonzero(self.drivable)
        m = int(np.ceil(margin_m / self.resolution))
        h, w = self.drivable.shape
        r0, r1 = rows.min() - m, rows.max() + 1 + m
        c0, c1 = cols.min() - m, cols.max() + 1 + m
        pads = ((max(0, -r0), max(0, r1 - h)), (max(0, -c0), max(0, c1 - w)))
        ox, oy = self.origin
        origin = (ox + c0 * self.resolution, oy + (h - r1) * self.resolution)

        def crop(a):
            a = np.pad(a, pads) if any(sum(p) for p in pads) else a
            return np.ascontiguousarray(a[r0 + pads[0][0]:r1 + pads[0][0],
                                          c0 + pads[1][0]:c1 + pads[1][0]])

        return replace(
            self,
            origin=origin,
            drivable=crop(self.drivable),
            progress=crop(self.progress),
            dist_to=crop(self.dist_to),
            obstacle=crop(self.obstacle),
            obstacle_m=crop(self.obstacle_m),
        )

    def value(self, grid: np.ndarray, x, y):
        r, c = self.world_to_pixel_array(x, y)
        return grid[r, c]

    @property
    def scene_yml(self) -> Path:
        return self.scene_dir / f"{self.name}.yml"

    @property
    def scene_sdf(self) -> Path:
        return self.scene_dir / f"{self.name}.sdf"


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


def track_names(spec: str) -> list[str]:
    """A comma-separated list of tracks, ``procedural:[<family>:]a-b`` expanding to seeds
    a..b (inclusive): ``"austria,procedural:1-3"`` → austria, procedural:1, procedural:2,
    procedural:3. A single name (or path) is a list of one."""
    names: list[str] = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            raise TrackError(f"{spec!r}: empty entry in the track list")
        if part.startswith("procedural:") and "-" in part.split(":", 1)[1]:
            family, _, seeds = part.split(":", 1)[1].rpartition(":")
            prefix = f"procedural:{family + ':' if family else ''}"
            lo, _, hi = seeds.partition("-")
            try:
                a, b = int(lo), int(hi)
            except ValueError as e:
                raise TrackError(f"{part!r}: expected procedural:[<family>:]<seed>-<seed>") from e
            if b < a:
                raise TrackError(f"{part!r}: empty seed range")
            names += [f"{prefix}{i}" for i in range(a, b + 1)]
        else:
            names.append(part)
    return names


def tile_tracks(tracks: list[Track], margin_m: float = 2.0) -> tuple[Track, np.ndarray]:
    """Several tracks side by side in one map, each on its own tile (its drivable area plus
    ``margin_m`` of wall): one world in which a car spawned on a tile races that track — the
    JAX backend trains on many tracks at once with no per-env track index. Tiles are packed
    in shelves of ceil(sqrt(n)); track 0 keeps its world coordinates. Returns the combined
    Track (starts, centreline, lap length and checkpoints of track 0) and the (n, 2) world
    offset (x, y) that was added to each track's coordinates."""
    if not tracks:
        raise TrackError("tile_tracks: no tracks")
    tiles = [t.cropped(margin_m) for t in tracks]
    per_shelf = int(np.ceil(np.sqrt(len(tiles))))
    shelves = [tiles[i:i + per_shelf] for i in range(0, len(tiles), per_shelf)]
    width = max(sum(t.shape[1] for t in shelf) for shelf in shelves)
    height = sum(max(t.shape[0] for t in shelf) for shelf in shelves)
    place = []  # (bottom row offset from the map's bottom, left column) per tile
    bottom = 0
    for shelf in shelves:
        left = 0
        for t in shelf:
            place.append((bottom, left))
            left += t.shape[1]
        bottom += max(t.shape[0] for t in shelf)
    return _compose(tracks, tiles, place, height, width)


def slot_tracks(tracks: list[Track], slot_m: float, slots: int,
                margin_m: float = 2.0) -> tuple[Track, np.ndarray]:
    """Like :func:`tile_tracks`, but on a fixed grid of ``slots`` square slots of ``slot_m``
    metres (ceil(sqrt(slots)) per row): the map has the same shape for any tracks that fit,
    so the JAX backend can swap one set of tracks for another without recompiling (the
    training track pool, ``env.track_pool``). Unused slots are wall. A track (plus
    ``margin_m``) larger than a slot is an error naming it."""
    if not tracks:
        raise TrackError("slot_tracks: no tracks")
    if len(tracks) > slots:
        raise TrackError(f"slot_tracks: {len(tracks)} tracks for {slots} slots")
    res = tracks[0].resolution
    n = int(round(slot_m / res))
    tiles = [t.cropped(margin_m) for t in tracks]
    for t in tiles:
        if t.shape[0] > n or t.shape[1] > n:
            raise TrackError(f"slot_tracks: {t.name} needs {t.shape[1] * res:.1f} × "
                             f"{t.shape[0] * res:.1f} m with its {margin_m} m margin, more than "
                             f"a slot of {slot_m} m (env.pool_slot_m)")
    cols = int(np.ceil(np.sqrt(slots)))
    rows = -(-slots // cols)
    place = [((i // cols) * n, (i % cols) * n) for i in range(len(tiles))]
    return _compose(tracks, tiles, place, rows * n, cols * n)


def _compose(tracks: list[Track], tiles: list[Track], place: list[tuple[int, int]],
             height: int, width: int) -> tuple[Track, np.ndarray]:
    """Tiles pasted at ``place`` (bottom row from the map's bottom, left column) into one
    (height, width) map; tile 0 keeps its world coordinates."""
    res = tracks[0].resolution
    for t in tracks[1:]:
        if abs(t.resolution - res) > 1e-9:
            raise TrackError(f"tile_tracks: {t.name} has resolution {t.resolution}, "
                             f"{tracks[0].name} {res}")
        if t.checkpoints != tracks[0].checkpoints:
            raise TrackError(f"tile_tracks: {t.name} has {t.checkpoints} checkpoints, "
                             f"{tracks[0].name} {tracks[0].checkpoints}")
    b0, c0 = place[0]
    ox = tiles[0].origin[0] - c0 * res  # the map's origin: tile 0 keeps its coordinates
    oy = tiles[0].origin[1] - b0 * res
    maps = {k: np.zeros((height, width), getattr(tiles[0], k).dtype)
            for k in ("drivable", "progress", "dist_to", "obstacle", "obstacle_m")}
    offsets = np.zeros((len(tiles), 2))
    for i, (t, (b, c)) in enumerate(zip(tiles, place, strict=True)):
        h, w = t.shape
        for k, m in maps.items():
            m[height - b - h:height - b, c:c + w] = getattr(t, k)
        offsets[i] = (ox + c * res - t.origin[0], oy + b * res - t.origin[1])
    return replace(
        tiles[0],
        name="+".join(t.name for t in tracks),
        origin=(ox, oy),
        **maps,
    ), offsets


def load_track(name_or_path: str | os.PathLike, *, verbose: bool = False) -> Track:
    """Load a scene by name, folder, .zip, or ``procedural:[<family>:]<seed>``
    (rl.tracks.procedural.FAMILIES)."""
    s = str(name_or_path)
    if s.startswith("procedural:"):
        family, _, seed_s = s.split(":", 1)[1].rpartition(":")
        try:
            seed = int(seed_s)
        except ValueError as e:
            raise TrackError(f"{s!r}: expected procedural:[<family>:]<int seed>") from e
        if family not in procedural.FAMILIES:
            raise TrackError(f"{s!r}: unknown procedural family {family!r}; known: "
                             f"{sorted(k for k in procedural.FAMILIES if k)}")
        return load_track(procedural.scene_path(seed, family), verbose=verbose)
    src = resolve_scene(name_or_path)
    scene = extract_zip(src) if src.suffix == ".zip" else src
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
