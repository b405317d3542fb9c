"""Every scripted driver, for either simulator backend.

* :func:`gap_follower` — lidar only, ``jax.numpy``: the scan (and optionally the forward speed)
  in, ``[motor, steering]`` out; traceable, so the JAX backend scans it (:func:`drive`).
* :func:`gap_follower_obs` — lidar only, ``numpy``: one observation dict of any backend in,
  an action dict out (``rl.evaluate --scripted --driver bullet``, the PyBullet tests).
* :func:`centreline_driver` — privileged pure pursuit on a line (``Track.centreline`` or
  :func:`racing_line`), speed from the curvature ahead; :func:`drive_line` scans it.
* :class:`LineFollower` — privileged: follows the clean lap :func:`rl.plan.plan_lap` finds,
  at the speed profile of :func:`rl.plan.speed_profile`; :func:`line_driver` plans and builds
  one. It is the reference a learned policy is compared with, and rl.imitate's teacher.
* :func:`scripted_policy` — any of them by name, as the ``obs -> action`` callable
  :func:`rl.evaluate.evaluate_policy` takes.

The planner lives in :mod:`rl.plan` (this module imports it, never the reverse).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from rl.envs import spec
from rl.plan import TURN_RADIUS_M, LapPlan, plan_lap, smooth_line, speed_profile

if TYPE_CHECKING:
    from rl.envs.jax_env import JaxRacecar, TrackParams
    from rl.tracks import Track


# ------------------------------------------------------------------------------ gap followers


def gap_follower(lidar, speed=None, motor: float = 0.3, gain: float = 1.0, window: int = 41,
                 fov_deg: float = 100.0, centre_gain: float = 1.5, v_max: float = 3.5):
    """A lidar-only scripted driver (works on any backend's scan, numpy or jax): steer
    toward the most open direction within ±fov_deg of the nose, pushed away from the
    nearer side wall; with `speed` (m/s) it also brakes for what lies ahead (target
    0.45 s per metre of free road, 1-v_max m/s). Returns [motor, steering]."""
    n = lidar.shape[-1]
    ang = jnp.asarray(spec.lidar_angles()[:: spec.LIDAR_RAYS // n], jnp.float32)
    raw = jnp.asarray(lidar, jnp.float32)
    kern = jnp.ones(window, jnp.float32) / window
    sm = jnp.convolve(raw, kern, mode="same")
    sm = jnp.where(jnp.abs(ang) < np.deg2rad(fov_deg), sm, 0.0)
    theta = ang[jnp.argmax(sm)]
    side = (jnp.abs(ang) > np.deg2rad(30)) & (jnp.abs(ang) < np.deg2rad(120))
    left = jnp.min(jnp.where(side & (ang > 0), raw, 99.0))
    right = jnp.min(jnp.where(side & (ang < 0), raw, 99.0))
    centre = (right - left) / jnp.maximum(right + left, 1e-3)  # > 0: left wall nearer
    # keep off the walls just ahead: repelled by the nearer front quarter
    fl = jnp.min(jnp.where((ang > np.deg2rad(10)) & (ang < np.deg2rad(70)), raw, 99.0))
    fr = jnp.min(jnp.where((ang < -np.deg2rad(10)) & (ang > -np.deg2rad(70)), raw, 99.0))
    repel = 0.4 * (1.0 / jnp.maximum(fl, 0.1) - 1.0 / jnp.maximum(fr, 0.1))
    steer = (spec.STEER_SIGN * gain * theta / spec.STEER_MAX_RAD + centre_gain * centre
             + repel)
    steer = jnp.clip(steer, -1.0, 1.0)
    m = jnp.float32(motor)
    if speed is not None:
        front = jnp.min(jnp.where(jnp.abs(ang) < np.deg2rad(8), raw, 99.0))
        target = jnp.clip(0.45 * front, 1.0, v_max)
        m = jnp.where(speed > target + 0.2, -0.5, jnp.where(speed > target, 0.0, m))
    return jnp.stack([m, steer])


_DRIVER_ANGLES = np.asarray(spec.lidar_angles(), np.float64)


def gap_follower_obs(obs: dict[str, Any], target_speed: float = 2.5, gain: float = 0.5) -> dict:
    """A lidar-only scripted driver in numpy for tests and benchmarks: one observation dict of
    any backend in, a ``{"motor", "steering"}`` action dict out.

    Steers toward the most open direction ahead (the smoothed scan's maximum within ±90°),
    nudged away from the nearer side wall, and holds a modest speed (motor 0.3 below the
    target, a light brake above it; slower when the way ahead is short).
    """
    angles = _DRIVER_ANGLES
    scan = np.asarray(obs["lidar"], np.float64).reshape(-1)
    smooth = np.convolve(scan, np.ones(41) / 41, mode="same")
    target = angles[np.argmax(np.where(np.abs(angles) < math.pi / 2, smooth, 0.0))]
    side = (np.abs(angles) > math.radians(60)) & (np.abs(angles) < math.radians(120))
    left = scan[side & (angles > 0)].min()
    right = scan[side & (angles < 0)].min()
    target += 0.3 * float(np.clip(left - right, -1.0, 1.0))  # CCW (left) positive
    front = scan[np.abs(angles) < math.radians(10)].mean()
    speed = float(np.asarray(obs["velocity"]).reshape(-1)[0])
    v_target = min(target_speed, 0.5 + 0.5 * front)
    steer = float(np.clip(-gain * target / spec.STEER_MAX_RAD, -1.0, 1.0))  # positive = right
    return {
        "motor": np.array([0.3 if speed < v_target else -0.1], np.float32),
        "steering": np.array([steer], np.float32),
    }


# ------------------------------------------------------------------------------ JAX rollouts


def drive(env: JaxRacecar, params: TrackParams, key, n_steps: int, policy=gap_follower):
    """Scan one car for n_steps under `policy(lidar, forward_speed)`; returns per-step (x, y, yaw),
    progress, lap, reward, collision, terminated, truncated (no auto-reset)."""
    obs, state = env.reset(key, params)

    def body(carry, _):
        obs, state = carry
        act = policy(obs["lidar"], obs["velocity"][0])
        obs, state, r, te, tr, info = env.step(state, act, params)
        out = (jnp.stack([state.pos[0], state.pos[1], state.yaw]), state.progress, state.lap,
               r, state.collision, te, tr)
        return (obs, state), out

    _, outs = jax.lax.scan(body, (obs, state), None, length=n_steps)
    keys = ("pose", "progress", "lap", "reward", "collision", "terminated", "truncated")
    return dict(zip(keys, outs, strict=True))


def centreline_driver(centreline, pose, speed, xp=np, lookahead: float = 0.5,
                      lookahead_per_mps: float = 0.25, v_max: float = 3.2,
                      v_min: float = 1.4, a_lat: float = 2.2, preview_m: float = 2.5):
    """A privileged scripted "expert" for either backend: pure pursuit on the track's
    centreline (`Track.centreline`, (N, 2) ordered by progress) from the rear axle, with the
    speed set by the curvature ahead. pose = (x, y, yaw) of the car (its CoM, as both
    backends report it); speed = forward m/s. Returns [motor, steering] (numpy or jax via xp).

    Steering: the wheel angle that puts the rear axle on the circle through the point
    lookahead + lookahead_per_mps * v ahead on the centreline. Speed: the target is
    sqrt(a_lat / curvature) over the next preview_m, clipped to [v_min, v_max]; full
    throttle below it, a brake proportional to the excess above it."""
    cl = xp.asarray(centreline, xp.float32)
    n = cl.shape[0]
    seg = xp.sqrt(((xp.roll(cl, -1, 0) - cl) ** 2).sum(1))
    spacing = seg.mean()
    x, y, yaw = pose[0], pose[1], pose[2]
    c, s = xp.cos(yaw), xp.sin(yaw)
    rx, ry = x - spec.COM_AHEAD_OF_REAR_AXLE * c, y - spec.COM_AHEAD_OF_REAR_AXLE * s
    i0 = xp.argmin((cl[:, 0] - x) ** 2 + (cl[:, 1] - y) ** 2)
    ld = lookahead + lookahead_per_mps * speed
    k = xp.maximum(xp.round((ld + spec.COM_AHEAD_OF_REAR_AXLE) / spacing), 1).astype(xp.int32)
    tx, ty = cl[(i0 + k) % n, 0], cl[(i0 + k) % n, 1]
    dx, dy = tx - rx, ty - ry
    lx, ly = c * dx + s * dy, -s * dx + c * dy  # target in the body frame
    curv = 2.0 * ly / xp.maximum(lx * lx + ly * ly, 1e-6)
    delta = xp.arctan(curv * spec.WHEELBASE)
    steer = xp.clip(spec.STEER_SIGN * delta / spec.STEER_MAX_RAD, -1.0, 1.0)
    # curvature ahead: heading change over the preview window / its length
    m = int(np.ceil(preview_m / 0.2))  # samples
    idx = (i0 + xp.arange(m) * xp.maximum(xp.round(0.2 / spacing), 1).astype(xp.int32)) % n
    p = cl[idx]
    d = p[1:] - p[:-1]
    h = xp.arctan2(d[:, 1], d[:, 0])
    dh = xp.abs(xp.angle(xp.exp(1j * (h[1:] - h[:-1])))) if xp is np else xp.abs(
        xp.arctan2(xp.sin(h[1:] - h[:-1]), xp.cos(h[1:] - h[:-1])))
    kappa = (dh / xp.maximum(xp.sqrt((d[1:] ** 2).sum(1)), 1e-3)).max()
    v_t = xp.clip(xp.sqrt(a_lat / xp.maximum(kappa, 1e-3)), v_min, v_max)
    motor = xp.where(speed < v_t, 1.0, xp.where(speed < v_t + 0.15, 0.0,
                                                   -xp.clip(2.0 * (speed - v_t), 0.2, 1.0)))
    return xp.stack([motor, steer]).astype(xp.float32)


def racing_line(track: Track, margin: float = 0.45, iters: int = 600,
                spacing: float = 0.2) -> np.ndarray:
    """A smooth closed line for `centreline_driver` (numpy, once per track): the centreline
    resampled every `spacing` m, then relaxed toward its neighbours' midpoints (which
    lowers curvature: hairpins are taken outside-inside-outside) while every point is
    pushed back to at least `margin` m from the walls along the distance field's gradient."""
    cl = np.asarray(track.centreline, np.float64)
    seg = np.linalg.norm(np.roll(cl, -1, 0) - cl, axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    q = np.arange(0.0, s[-1], spacing)
    closed = np.vstack([cl, cl[:1]])
    p = np.stack([np.interp(q, s, closed[:, 0]), np.interp(q, s, closed[:, 1])], 1)
    h = 2.0 * track.resolution
    f = track.obstacle_m

    def val(a):
        return track.value(f, a[:, 0], a[:, 1])

    for _ in range(iters):
        p = p + 0.5 * (0.5 * (np.roll(p, 1, 0) + np.roll(p, -1, 0)) - p)
        d = val(p)
        low = d < margin
        if low.any():
            a = p[low]
            g = np.stack([val(a + [h, 0]) - val(a - [h, 0]), val(a + [0, h]) - val(a - [0, h])], 1)
            g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-9)
            p[low] = a + g * np.minimum(margin - d[low], 0.1)[:, None]
    return p.astype(np.float32)


def drive_line(env: JaxRacecar, params: TrackParams, key, n_steps: int, line, **driver_kw):
    """Scan one car for n_steps under `centreline_driver` on `line` ((N, 2), e.g.
    Track.centreline); returns per-step collision, terminated and reward (no auto-reset)."""
    line = jnp.asarray(line, jnp.float32)
    obs, state = env.reset(key, params)

    def body(carry, _):
        obs, state = carry
        pose = jnp.stack([obs["pose"][0], obs["pose"][1], obs["pose"][5]])
        act = centreline_driver(line, pose, obs["velocity"][0], xp=jnp, **driver_kw)
        obs, state, r, te, tr, _ = env.step(state, act, params)
        return (obs, state), (state.collision, te, r)

    _, (col, term, rew) = jax.lax.scan(body, (obs, state), None, length=n_steps)
    return {"collision": col, "terminated": term, "reward": rew}


# ------------------------------------------------------------------------------ line follower


class LineFollower:
    """A driver that follows a planned line: ``obs -> {"motor", "steering"}`` for any backend.

    Pure pursuit from the rear axle with a speed-dependent lookahead, the target speed of
    :func:`rl.plan.speed_profile` a little ahead, and a P-controller on the motor (negative =
    brake). Written in ``jax.numpy`` so that the JAX backend's evaluation can scan it; it also takes
    the host backends' numpy observations."""

    def __init__(self, plan: LapPlan, lookahead: float = 0.7, lookahead_per_mps: float = 0.15,
                 speed_scale: float = 1.0, gain: float = 2.0, **profile):
        if not plan.feasible:
            raise ValueError(f"{plan.track}: no feasible line to follow "
                             f"(stuck at {plan.where_stuck}, {plan.best_progress:.2f} laps)")
        line = smooth_line(plan.path, step=plan.step_m)
        self.xy = jnp.asarray(line[:, :2], jnp.float32)
        self.v = jnp.asarray(speed_profile(line, plan.step_m, **profile) * speed_scale,
                             jnp.float32)
        self.step, self.n = plan.step_m, len(plan.path)
        self.lookahead, self.per_mps, self.gain = lookahead, lookahead_per_mps, gain

    def __call__(self, obs: dict) -> dict:
        pose = jnp.asarray(obs["pose"], jnp.float32).reshape(-1)
        speed = jnp.asarray(obs["velocity"], jnp.float32).reshape(-1)[0]
        yaw = pose[5]
        back = spec.COM_AHEAD_OF_REAR_AXLE
        rear = pose[:2] - back * jnp.stack([jnp.cos(yaw), jnp.sin(yaw)])
        front = pose[:2] + (spec.WHEELBASE - back) * jnp.stack([jnp.cos(yaw), jnp.sin(yaw)])
        i = jnp.argmin(jnp.sum((self.xy - pose[:2]) ** 2, axis=1))
        ld = self.lookahead + self.per_mps * jnp.maximum(speed, 0.0)
        # the first line point at least `ld` from the rear axle, searched ahead of i
        ahead = (i + jnp.arange(1, 60)) % self.n
        far = jnp.sum((self.xy[ahead] - rear) ** 2, axis=1) >= ld**2
        tgt = self.xy[ahead[jnp.argmax(far)]]
        d = tgt - rear
        alpha = jnp.arctan2(d[1], d[0]) - yaw
        alpha = jnp.arctan2(jnp.sin(alpha), jnp.cos(alpha))
        delta = jnp.arctan2(2.0 * spec.WHEELBASE * jnp.sin(alpha), ld)  # CCW positive
        steer = jnp.clip(spec.STEER_SIGN * delta / spec.STEER_MAX_RAD, -1.0, 1.0)
        j = (jnp.argmin(jnp.sum((self.xy - front) ** 2, axis=1)) + 3) % self.n
        motor = jnp.clip(self.gain * (self.v[j] - speed), -1.0, 1.0)
        return {"motor": motor.reshape(1), "steering": steer.reshape(1)}


def line_driver(track, clearance: float = 0.05, turn_radius: float = TURN_RADIUS_M,
                **follower) -> LineFollower:
    """Plan ``track`` (name or Track) keeping ``clearance`` from the walls and return its
    :class:`LineFollower` (``follower``: its keyword arguments). A ``turn_radius`` above the
    car's tightest plans wider turns, leaving steering in reserve in the tightest corners."""
    from rl.tracks import Track, load_track

    trk = track if isinstance(track, Track) else load_track(track)
    return LineFollower(plan_lap(trk, turn_radius=turn_radius, clearance=clearance), **follower)


# ------------------------------------------------------------------------------ by name


def scripted_policy(driver: str, track=None) -> Callable:
    """A scripted driver as an ``obs -> action`` callable: a gap follower (``jax``:
    :func:`gap_follower` on the scan; ``bullet``: :func:`gap_follower_obs`), or ``line``:
    :class:`LineFollower` on the clean lap planned for ``track`` (a driver that knows the way —
    the reference for learned policies)."""
    if driver == "line":
        if track is None:
            raise ValueError("the line driver needs the track it plans")
        return line_driver(track)
    if driver == "jax":
        return lambda obs: gap_follower(obs["lidar"])
    if driver == "bullet":
        return gap_follower_obs
    raise ValueError(f"unknown scripted driver {driver!r} (jax | bullet | line)")
