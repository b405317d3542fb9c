"""The wall-mesh compiler: racecar_gym's four maps of a scene from its Walls.obj alone.

The compiler rasterizes the whole ground footprint of the wall mesh (floor caps filled,
side faces and outlines drawn as lines, so neither thin walls nor missing side faces leak),
grows the start's free region past the wall line without changing its topology, and checks
that the drivable area is a ring: one component around one island (`ring_topology`).
Compiled maps follow the conventions of racecar_gym's own Austria maps:
progress is an 8-connected (Chebyshev) wavefront from the start pixel with the start
line as a barrier behind it, normalized by its maximum; norm_distance_to the octile
(8-connected, diagonal sqrt 2) geodesic distance still to drive to the line, normalized
by its maximum; norm_distance_to_obstacle the Euclidean distance transform of the
drivable area (pixels to the nearest non-drivable pixel) normalized by its maximum.
`compiled_scene` caches a copy of a scene with its compiled maps, keyed by the content
of its files and COMPILER_VERSION.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra

from rl.tracks.scene import (
    TrackError,
    cache_dir,
    hash_files,
    read_scene_config,
    scene_yml,
    world_to_pixel_array,
)

COMPILER_VERSION = 8
# racecar_gym's drivable_area extends this many pixels beyond the wall line (measured on
# Austria: pixels whose centre lies 1.5 px outside are drivable, 1.94 px are not).
WALL_MARGIN_PX = 1.75


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


def wall_footprint_triangles(verts: np.ndarray, tris: np.ndarray):
    """The ground-plane footprint of a wall mesh: (caps (C, 3, 2) triangles with area,
    edges (E, 2, 2) segments). Caps are the flat faces at or below mid height (the extruded
    solid's floor polygon, triangulated); edges are the projections of all non-flat faces
    (the wall outline) plus the boundary edges of the caps — so a wall whose side faces are
    missing from the mesh (torino, x = -5.3..-4.6, y = 0.87) is still outlined by its cap."""
    t = verts[tris]  # (T, 3, 3)
    z = t[:, :, 2]
    flat = (z.max(1) - z.min(1)) < 1e-6
    zmid = 0.5 * (verts[:, 2].min() + verts[:, 2].max())
    caps = flat & (z.max(1) <= zmid + 1e-9)
    if not caps.any():
        caps = flat
    cap2 = t[caps][:, :, :2]
    area = 0.5 * np.abs((cap2[:, 1, 0] - cap2[:, 0, 0]) * (cap2[:, 2, 1] - cap2[:, 0, 1])
                        - (cap2[:, 1, 1] - cap2[:, 0, 1]) * (cap2[:, 2, 0] - cap2[:, 0, 0]))
    edges = []
    side = t[~flat][:, :, :2]
    for a, b in ((0, 1), (1, 2), (2, 0)):
        edges.append(np.stack([side[:, a], side[:, b]], 1))
    # boundary edges of the caps: used by exactly one cap triangle
    ct = tris[caps]
    e = np.concatenate([ct[:, [0, 1]], ct[:, [1, 2]], ct[:, [2, 0]]], 0)
    key = np.round(verts[e][:, :, :2], 5).reshape(len(e), 4)
    # an undirected key: order the two endpoints
    swap = (key[:, 0] > key[:, 2]) | ((key[:, 0] == key[:, 2]) & (key[:, 1] > key[:, 3]))
    key[swap] = key[swap][:, [2, 3, 0, 1]]
    _, inv, cnt = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    once = cnt[inv.ravel()] == 1
    edges.append(verts[e[once]][:, :, :2])
    segs = np.concatenate(edges, 0)
    length = np.linalg.norm(segs[:, 1] - segs[:, 0], axis=1)
    return cap2[area > 0], segs[length > 0]


def _rasterize_triangles(tri2, origin, fres, shape) -> np.ndarray:
    """Fine pixels whose centre lies in any triangle (closed), by a vectorized scanline."""
    h, w = shape
    grid = np.zeros((h, w + 1), np.int32)
    if len(tri2) == 0:
        return grid[:, :w] > 0
    ox, oy = origin
    # continuous row coordinate of y: pixel r has its centre at u = r + 0.5
    u = h - (tri2[:, :, 1] - oy) / fres  # (C, 3)
    v = (tri2[:, :, 0] - ox) / fres
    r_lo = np.clip(np.ceil(u.min(1) - 0.5), 0, h).astype(np.int64)
    r_hi = np.clip(np.floor(u.max(1) - 0.5), -1, h - 1).astype(np.int64)
    n = np.maximum(r_hi - r_lo + 1, 0)
    ti = np.repeat(np.arange(len(tri2)), n)
    rows = np.repeat(r_lo, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    uc = rows + 0.5
    lo = np.full(len(ti), np.inf)
    hi = np.full(len(ti), -np.inf)
    for a, b in ((0, 1), (1, 2), (2, 0)):
        ua, ub, va, vb = u[ti, a], u[ti, b], v[ti, a], v[ti, b]
        umin, umax = np.minimum(ua, ub), np.maximum(ua, ub)
        hit = (uc >= umin) & (uc <= umax)
        du = ub - ua
        s = np.where(du != 0, (uc - ua) / np.where(du != 0, du, 1.0), 0.0)
        x = va + s * (vb - va)
        # a horizontal edge on the scanline contributes both its ends
        xa = np.where(du != 0, x, np.minimum(va, vb))
        xb = np.where(du != 0, x, np.maximum(va, vb))
        lo = np.where(hit, np.minimum(lo, xa), lo)
        hi = np.where(hit, np.maximum(hi, xb), hi)
    c0 = np.clip(np.ceil(lo - 0.5), 0, w).astype(np.int64)
    c1 = np.clip(np.floor(hi - 0.5), -1, w - 1).astype(np.int64)
    ok = np.isfinite(lo) & (c1 >= c0)
    np.add.at(grid, (rows[ok], c0[ok]), 1)
    np.add.at(grid, (rows[ok], c1[ok] + 1), -1)
    return np.cumsum(grid, axis=1)[:, :w] > 0


# neighbours counter-clockwise from east: (dr, dc), bit k of a pattern = neighbour k solid
_N8 = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _simple_luts() -> tuple[np.ndarray, np.ndarray]:
    """For each 8-neighbour pattern (bit k: neighbour k solid): whether the centre solid
    pixel may turn free without changing the topology (8-connected solid, 4-connected
    free: Yokoi's connectivity number is 1), and whether it is the end of a line (one
    solid neighbour)."""
    simple = np.zeros(256, bool)
    end = np.zeros(256, bool)
    for code in range(256):
        x = [(code >> k) & 1 for k in range(8)]
        xb = [1 - a for a in x]
        n8 = sum(xb[k] - xb[k] * xb[(k + 1) % 8] * xb[(k + 2) % 8] for k in (0, 2, 4, 6))
        simple[code] = n8 == 1
        end[code] = sum(x) == 1
    return simple, end


_SIMPLE, _LINE_END = _simple_luts()


def _grow_topology_preserving(free: np.ndarray, thr: float, settle: int = 12,
                              keep_ends_px: float = 6.0) -> np.ndarray:
    """Grow `free` into the solid up to Euclidean distance `thr` (racecar_gym's drivable
    area reaches ~1.75 px past the wall line), layer by layer, turning only simple pixels
    in four 2x2 subfields: the free region keeps its topology, so a wall thinner than
    twice the margin thins to a line instead of opening a shortcut. Line ends farther than
    `keep_ends_px` from the wall that stays solid (the tips of thin walls) are kept too, so
    thin walls do not shrink away from their ends; near thick walls they are not (the
    one-pixel spurs a growth front leaves on a diagonal wall go)."""
    free = np.pad(free, 1, constant_values=False)
    dist = ndimage.distance_transform_edt(~free)
    core = ~free & (dist > thr)
    far = ndimage.distance_transform_edt(~core) > keep_ends_px if core.any() \
        else np.ones_like(free)
    layers = int(np.ceil(thr))
    cand_r, cand_c = np.nonzero(~free & (dist <= thr))
    cand_d = dist[cand_r, cand_c]
    for k in list(range(1, layers + 1)) + [layers] * settle:
        changed = False
        for pr in (0, 1):
            for pc in (0, 1):
                sel = (cand_d <= min(k, thr)) & (cand_r % 2 == pr) & (cand_c % 2 == pc)
                r, c = cand_r[sel], cand_c[sel]
                keep = ~free[r, c]
                r, c = r[keep], c[keep]
                if len(r) == 0:
                    continue
                code = np.zeros(len(r), np.int64)
                for bit, (dr, dc) in enumerate(_N8):
                    code |= (~free[r + dr, c + dc]).astype(np.int64) << bit
                flip = _SIMPLE[code] & ~(_LINE_END[code] & far[r, c])
                if flip.any():
                    free[r[flip], c[flip]] = True
                    changed = True
        if not changed and k >= layers:
            break
    return free[1:-1, 1:-1]


def ring_topology(drivable: np.ndarray) -> tuple[int, int]:
    """(8-connected components of the drivable area, 4-connected components of the rest):
    (1, 2) for a ring — one track around one inner island, inside a closed outer wall."""
    _, n_in = ndimage.label(drivable, structure=np.ones((3, 3), bool))
    _, n_out = ndimage.label(np.pad(~drivable, 1, constant_values=True))
    return int(n_in), int(n_out)


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


def compile_maps(walls_obj: Path, resolution: float = 0.05, origin=(-50.0, -50.0),
                 shape=(2000, 2000), start_pose=(0.0, 0.0), sub: int = 3,
                 margin_px: float = WALL_MARGIN_PX, min_island_m2: float = 0.05,
                 require_ring: bool = True,
                 verbose: bool = False) -> dict:
    """The four racecar_gym maps of a scene from its wall mesh alone.

    Every wall triangle's footprint on the ground plane is rasterized on a grid `sub` times
    finer than `resolution`: the floor caps of the extruded wall solid filled (pixel
    centres inside), the projected side faces, the z = 0.5 m cross-section and the caps'
    outline drawn as lines. The free cells reachable from the start (4-connected flood
    fill) are grown past the wall line by `margin_px` without ever changing their topology
    (thin walls thin to a line, they never open), and a pixel is drivable when its
    centre's fine cell is. Solid specks under `min_island_m2` inside the track are mesh
    debris, not walls. The result must be a ring (one drivable component around one
    island; `require_ring`). Progress / distance-to are graph wavefronts around the track
    with the start line (the column through start_pose, the car facing +x) as the barrier.
    """
    t0 = time.perf_counter()
    walls_obj = Path(walls_obj)
    verts, tris = read_obj(walls_obj)
    caps, edges = wall_footprint_triangles(verts, tris)
    segs = wall_segments(verts, tris, z=0.5 * 1.0)
    segs = np.concatenate([segs.reshape(-1, 2, 2), edges], 0)
    if len(segs) == 0:
        raise TrackError(f"{walls_obj}: the mesh has no wall faces")
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
    fres = resolution / sub
    fshape = (wshape[0] * sub, wshape[1] * sub)
    walls_fine = _rasterize_segments(segs, worigin, resolution, wshape, sub)
    walls_fine |= _rasterize_triangles(caps, worigin, fres, fshape)
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
    # debris: solid specks inside the track far smaller than any wall (montreal's SVG
    # leaves seven of 0.01-0.02 m^2 a few cm off its walls) are not walls
    islands, n_isl = ndimage.label(~free_fine, structure=np.ones((3, 3), bool))
    if n_isl > 1:
        size = np.bincount(islands.ravel())
        border = np.unique(np.concatenate([islands[0], islands[-1], islands[:, 0],
                                           islands[:, -1]]))
        small = size < min_island_m2 / fres**2
        small[0] = False
        small[border] = False
        if small.any():
            free_fine |= small[islands]
    thr = margin_px * sub + 0.5
    if margin_px > 0:
        free_fine = _grow_topology_preserving(free_fine, thr)
    off = sub // 2  # the fine cell holding each coarse pixel's centre (sub odd: exact)
    coarse = free_fine[off::sub, off::sub][: wshape[0], : wshape[1]]
    # walls too thin for the centre sampling (under ~5 fine cells: thin walls the growth
    # thinned to a line, or the thin core of one just thicker than twice the margin) must
    # not break between the sampled centres: block every coarse pixel they touch,
    # 8-connected-tight
    solid = ~free_fine
    # (thin: more than a cell off every 5x5 square of solid — the staircase fringe of a
    # thick wall is not thin; then back 3 cells into whatever thick wall it joins)
    thick = ndimage.binary_dilation(ndimage.binary_opening(solid, np.ones((5, 5), bool)),
                                    np.ones((3, 3), bool))
    thin = solid & ~thick
    if thin.any():
        thin = solid & ndimage.binary_dilation(thin, np.ones((7, 7), bool))
    blocked = thin.reshape(wshape[0], sub, wshape[1], sub).any((1, 3))
    if blocked.any():
        blocked = ndimage.binary_dilation(blocked, structure=np.ones((2, 2), bool))
    coarse = coarse & ~blocked
    # what the sampling cut off from the start's region (single cells in cracks) is not track
    comp, _ = ndimage.label(coarse, structure=np.ones((3, 3), bool))
    scr, scc = world_to_pixel_array(np.float64(start_pose[0]), np.float64(start_pose[1]),
                                    worigin, resolution, wshape)
    if comp[int(scr), int(scc)] == 0:
        raise TrackError(f"{walls_obj}: the start {start_pose} is not drivable")
    drivable = np.zeros(shape, bool)
    drivable[r0:r1, c0:c1] = comp == comp[int(scr), int(scc)]
    if require_ring:
        n_in, n_out = ring_topology(drivable)
        if (n_in, n_out) != (1, 2):
            raise TrackError(f"{walls_obj}: the compiled drivable area is not a ring "
                             f"({n_in} drivable components, {n_out} non-drivable ones; "
                             f"want 1 and 2: the outside and the inner island)")
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
    yml = scene_yml(scene)
    files = [yml, walls] + ([cfg["_starts"]] if cfg["_starts"].exists() else [])
    key = hash_files(files, extra=f"v{COMPILER_VERSION}")
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
