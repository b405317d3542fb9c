"""Can this car lap this track without touching a wall? A kinematic lap planner.

``plan_lap`` searches a lattice of the car's own motions — straight, and arcs of its tightest
turning radius (and twice it) left and right, 0.1 m at a time — from the grid start around the
track and back to the start (weighted A* on arc length plus a penalty for driving close to a
wall), rejecting every pose whose footprint (three disks covering the 0.50 × 0.25 m chassis)
comes closer than ``clearance`` to a wall. It answers a yes-or-no question about the track
and the car (is a clean lap possible at all?) and returns the line it found;
``smooth_line`` and ``speed_profile`` turn that line into what a driver follows
(:class:`rl.drivers.LineFollower`, which imports this module, never the reverse).

    python -m rl.plan --tracks austria,berlin --out runs/plan        # feasibility + PNGs
    python -m rl.evaluate --scripted --driver line --backend bullet --tracks austria

The default turning radius, ``TURN_RADIUS_M``, is the one both backends measure at ~2 m/s with
full steering at the chassis centre of mass (``rl.envs.calibration``: ``turn_radius_steer_*``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rl.envs import spec

TURN_RADIUS_M = 1.75  # at the pose (chassis centre of mass), measured at ~2 m/s, full steering
# footprint: three disks on the car's axis covering the CAR_LENGTH × CAR_WIDTH rectangle
# centred on the pose (spec: the footprint spans pose ± 0.25 m)
_DISK_OFFSETS = np.array([-1.0, 0.0, 1.0]) * spec.CAR_LENGTH / 6.0
_DISK_RADIUS = math.hypot(spec.CAR_LENGTH / 6.0, spec.CAR_WIDTH / 2.0)
_CURVATURES = (-1.0, -0.5, 0.0, 0.5, 1.0)  # of the tightest turn; positive = left


@dataclass(frozen=True)
class LapPlan:
    track: str
    feasible: bool
    turn_radius_m: float
    clearance_m: float
    path: np.ndarray  # (N, 3) x, y, yaw of the pose every `step_m` (empty when infeasible)
    step_m: float
    length_m: float  # of the planned lap (nan when infeasible)
    best_progress: float  # laps reached (1.0 when feasible)
    where_stuck: tuple[float, float] | None  # furthest pose reached when infeasible
    min_clearance_m: float  # smallest footprint-to-wall distance along the line
    expanded: int
    seconds: float

    def summary(self) -> dict:
        return {
            "track": self.track, "feasible": self.feasible,
            "turn_radius_m": self.turn_radius_m, "clearance_m": self.clearance_m,
            "length_m": self.length_m, "best_progress_laps": self.best_progress,
            "where_stuck": self.where_stuck, "min_clearance_m": self.min_clearance_m,
            "expanded": self.expanded, "seconds": round(self.seconds, 2),
        }  # fmt: skip


def footprint_clearance(track, x, y, yaw) -> np.ndarray:
    """Smallest distance (m) from the car's footprint at poses (x, y, yaw) to a wall; negative
    or zero where it touches one or leaves the drivable area (vectorized over poses)."""
    x, y, yaw = (np.asarray(a, np.float64)[..., None] for a in (x, y, yaw))
    xs, ys = x + _DISK_OFFSETS * np.cos(yaw), y + _DISK_OFFSETS * np.sin(yaw)
    r, c = track.world_to_pixel_array(xs, ys)
    d = np.where(track.drivable[r, c], track.obstacle_m[r, c], -1.0)
    return (d - _DISK_RADIUS).min(axis=-1)


def plan_lap(track, turn_radius: float = TURN_RADIUS_M, clearance: float = 0.05,
             step: float = 0.1, headings: int = 72, comfort: float = 0.35,
             comfort_weight: float = 2.0, greed: float = 1.5,
             max_expansions: int = 2_000_000) -> LapPlan:
    """Search a clean lap of ``track`` (an :class:`rl.tracks.Track`) from its first grid start.

    Motions: 0.3 m of straight line or of an arc of ``turn_radius`` or twice it, either way
    (checked every ``step``);
    states are merged on a 0.1 m × 360/``headings``° lattice. A pose is allowed when its
    footprint keeps ``clearance`` from every wall; each metre driven within ``comfort`` of a
    wall costs ``comfort_weight`` × (comfort − distance)/comfort extra metres, so the line
    keeps away from walls where the track allows. ``greed`` weights the heuristic (remaining
    progress × lap length): 1 is close to the shortest line, larger searches faster.
    A lap is done on coming back to the start pose (within 0.25 m and 0.2 rad) after passing
    half distance and then driving on through the second half (progress 0.7–0.95 on the way),
    so the line closes on itself and is not a drive to half distance and back.
    """
    t0 = time.perf_counter()
    prog = track.progress
    lap_len = float(track.lap_length_m)
    sub = 3  # checks per motion

    def progress_at(x, y):
        r, c = track.world_to_pixel_array(np.asarray(x), np.asarray(y))
        return prog[r, c]

    # every motion in the car's frame: (motions, sub) offsets and heading changes
    ts = np.arange(1, sub + 1) * step
    ks = np.asarray(_CURVATURES)[:, None] / turn_radius  # curvature, 1/m, positive = left
    dth_m = ks * ts
    safe = np.where(ks == 0, 1.0, ks)
    fwd = np.where(ks == 0, ts, np.sin(dth_m) / safe)
    side = np.where(ks == 0, 0.0, (1.0 - np.cos(dth_m)) / safe)

    def motions(x, y, th):
        c, s_ = math.cos(th), math.sin(th)
        return x + c * fwd - s_ * side, y + s_ * fwd + c * side, th + dth_m

    dth = 2 * math.pi / headings

    def key(x, y, th, half):
        return (round(x / 0.1), round(y / 0.1), round(th / dth) % headings, half)

    sx, sy, syaw = (float(v) for v in np.asarray(track.starts[0])[[0, 1, 5]])
    start = (sx, sy, syaw, 0)
    if footprint_clearance(track, sx, sy, syaw) < clearance:
        raise ValueError(f"{track.name}: the grid start is within {clearance} m of a wall")
    parent: dict = {key(*start): None}
    pose_of: dict = {key(*start): start}
    pq = [(0.0, 0.0, key(*start))]
    p0 = float(progress_at(sx, sy))

    def went_round(k) -> bool:
        """Whether the path to ``k`` drove the second half of the lap after half distance
        (progress 0.7–0.95 seen), not back the way it came from there."""
        while k is not None:
            px, py, _, h = pose_of[k]
            if h == 1 and 0.7 < float(progress_at(px, py)) < 0.95:
                return True
            k = parent[k]
        return False

    best, best_pose, n, goal = 0.0, (sx, sy), 0, None
    while pq and n < max_expansions:
        _, g, k0 = heapq.heappop(pq)
        x, y, th, half = pose_of[k0]
        n += 1
        p = float(progress_at(x, y))
        if half == 0 and 0.4 < p < 0.6:
            half = 1
        if half == 1 and math.hypot(x - sx, y - sy) < 0.25 and \
                abs(math.remainder(th - syaw, 2 * math.pi)) < 0.2 and \
                went_round(k0):  # back at the start, the lap driven: closed
            goal = k0
            break
        if p + half > best:
            best, best_pose = p + half, (x, y)
        xs, ys, ths = motions(x, y, th)
        cl = footprint_clearance(track, xs, ys, ths)  # (motions, sub)
        ok = cl.min(axis=1) >= clearance
        extra = comfort_weight * np.clip((comfort - cl) / comfort, 0, None).sum(axis=1) * step
        pn_all = progress_at(xs[:, -1], ys[:, -1])
        for m in np.nonzero(ok)[0]:
            nxt = (float(xs[m, -1]), float(ys[m, -1]), float(ths[m, -1]), half)
            kk = key(*nxt)
            if kk in parent:
                continue
            parent[kk], pose_of[kk] = k0, nxt
            g2 = g + sub * step + float(extra[m])
            pn = float(pn_all[m])
            if half == 1:  # laps left: to the finish line, then on to the start's progress
                remaining = p0 - pn + (1.0 if pn >= 0.5 else 0.0)
            else:
                remaining = 1.0 + p0 - pn + (1.0 if pn > 0.6 else 0.0)
            heapq.heappush(pq, (g2 + greed * remaining * lap_len, g2, kk))
    secs = time.perf_counter() - t0
    if goal is None:
        return LapPlan(track.name, False, turn_radius, clearance, np.zeros((0, 3)), step,
                       math.nan, round(best, 3), best_pose, math.nan, n, secs)  # fmt: skip
    keys = []
    k = goal
    while k is not None:
        keys.append(k)
        k = parent[k]
    keys.reverse()
    pts = [np.array(pose_of[keys[0]][:3])[None]]
    for a, b in zip(keys[:-1], keys[1:], strict=True):
        xs, ys, ths = motions(*pose_of[a][:3])
        m = int(np.argmin(np.hypot(xs[:, -1] - pose_of[b][0], ys[:, -1] - pose_of[b][1])))
        pts.append(np.stack([xs[m], ys[m], ths[m]], axis=1))
    path = np.concatenate(pts)
    path[:, 2] = np.angle(np.exp(1j * path[:, 2]))
    cl = footprint_clearance(track, path[:, 0], path[:, 1], path[:, 2])
    return LapPlan(track.name, True, turn_radius, clearance, path, step,
                   float((len(path) - 1) * step), 1.0, None, float(cl.min()), n, secs)


def smooth_line(path: np.ndarray, window_m: float = 0.5, step: float = 0.1) -> np.ndarray:
    """The lattice line (piecewise arcs, a little wavy) as a smooth closed line: a circular
    moving average of x and y over ``window_m``, yaw from the result. The planner's clearance
    is checked on the raw line; :func:`footprint_clearance` checks a smoothed one."""
    w = max(1, int(round(window_m / step)))
    kern = np.ones(w) / w
    xy = np.stack([np.convolve(np.concatenate([path[-w:, i], path[:, i], path[:w, i]]), kern,
                               mode="same")[w:-w] for i in (0, 1)], axis=1)
    d = np.roll(xy, -1, axis=0) - np.roll(xy, 1, axis=0)
    return np.column_stack([xy, np.arctan2(d[:, 1], d[:, 0])])


def curvature(path: np.ndarray, step: float) -> np.ndarray:
    """Signed curvature (1/m) along a closed (N, 3) x, y, yaw line sampled every ``step``
    metres (the last point joins the first), smoothed over 5 samples."""
    dyaw = np.angle(np.exp(1j * (np.roll(path[:, 2], -1) - path[:, 2])))
    k = np.concatenate([dyaw[-2:], dyaw, dyaw[:2]]) / step
    return np.convolve(k, np.ones(5) / 5, mode="valid")


def speed_profile(path: np.ndarray, step: float, v_max: float = 3.5, a_lat: float = 2.5,
                  a_brake: float = 2.0, a_accel: float = 2.5) -> np.ndarray:
    """Largest speed (m/s) at each point of a closed line: the cornering limit
    sqrt(a_lat / |curvature|), capped at ``v_max``, lowered so the car can brake into every
    corner at ``a_brake`` and accelerate out at ``a_accel`` (forward-backward passes, twice
    round the loop so the finish joins the start)."""
    k = np.abs(curvature(path, step))
    v = np.minimum(v_max, np.sqrt(a_lat / np.maximum(k, 1e-6)))
    n = len(v)
    for _ in range(2):
        for i in range(2 * n - 1, -1, -1):  # braking: v_i^2 <= v_{i+1}^2 + 2 a s
            j = i % n
            v[j] = min(v[j], math.sqrt(v[(j + 1) % n] ** 2 + 2 * a_brake * step))
        for i in range(2 * n):
            j = i % n
            v[j] = min(v[j], math.sqrt(v[j - 1] ** 2 + 2 * a_accel * step))
    return v


def main(argv: list[str] | None = None) -> int:
    """The command line; a missing or broken track is one line on stderr, exit code 2."""
    from rl.tracks import TrackError

    try:
        return _main(argv)
    except TrackError as e:
        print(f"rl.plan: error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracks", default="austria,berlin,montreal,torino")
    ap.add_argument("--turn-radius", type=float, default=TURN_RADIUS_M)
    ap.add_argument("--clearance", type=float, default=0.05)
    ap.add_argument("--out", help="folder for plan.json and one PNG per track")
    args = ap.parse_args(argv)
    from rl import plots
    from rl.tracks import load_track, track_names

    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    report = {}
    for name in track_names(args.tracks):
        trk = load_track(name)
        plan = plan_lap(trk, args.turn_radius, args.clearance)
        s = plan.summary()
        report[name] = s
        if plan.feasible:
            print(f"{name}: clean lap {plan.length_m:.1f} m (centreline {trk.lap_length_m:.1f} m),"
                  f" min clearance {plan.min_clearance_m:.2f} m  [{plan.seconds:.1f} s]")
        else:
            print(f"{name}: NO clean lap at turn radius {args.turn_radius} m — stuck at "
                  f"{plan.best_progress:.2f} laps near {plan.where_stuck}  [{plan.seconds:.1f} s]")
        if out:
            line = smooth_line(plan.path, step=plan.step_m) if plan.feasible else None
            speed = speed_profile(line, plan.step_m) if plan.feasible else None
            plots.plot_plan(trk, plan, out / f"plan_{name.replace(':', '_')}.png",
                            line=line, speed=speed)
    if out:
        (out / "plan.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
