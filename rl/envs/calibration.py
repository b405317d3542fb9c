"""Calibration of the JAX car against the PyBullet car: the same open-floor protocols run in
both simulators.

* :func:`open_floor_jax` / :func:`open_floor_bullet` — one car alone on an open floor (no
  track), driven by a policy ``i -> (actuator, a, steering)``; a trace per run.
* :func:`calibrate_jax` / :func:`calibrate_bullet` — the car's figures on that floor: top
  speeds, acceleration, braking, coasting, the speed actuator, steady turns, the steering's
  response and the brake-and-turn yaw (``BRAKE_TURN_*``); the same keys from either backend,
  side by side in ``python -m benchmarks.envs --calibrate`` (``--fit`` refits
  :class:`rl.envs.jax_env.Dynamics` to the PyBullet traces).
* :func:`wall_contact_probe` — a car driven into one straight wall, in either backend (the
  protocol the JAX model's wall contact is fitted with).

This module imports both backends; neither imports it.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pybullet as p
import pybullet_data

from rl.envs import bullet, spec
from rl.envs.jax_env import (
    LIDAR_MAP_DTYPE,
    Dynamics,
    JaxRacecar,
    SensorConfig,
    TrackParams,
    car_step,
)
from rl.envs.spec import TaskConfig

# Scene floors loaded from a racecar_gym sdf (or a mesh) carry PyBullet's default lateral
# friction, 0.5; pybullet_data's plane.urdf has 1.0, on which the car accelerates ~30 % harder.
TRACK_FLOOR_FRICTION = 0.5

# Brake-and-turn protocol of both calibrations: 3 s at full throttle (~3.7 m/s), then 1.5 s of
# full right steering with the motor at m < 0; reported: the yaw change (rad).
BRAKE_TURN_AT, BRAKE_TURN_STEPS, BRAKE_TURN_MOTOR = 300, 450, (-1.0, -0.3, -0.1)


def brake_turn_policy(m: float):
    """Step i -> (actuator, motor, steering) of the brake-and-turn protocol."""
    return lambda i: ("motor", 1.0, 0.0) if i < BRAKE_TURN_AT else ("motor", m, 1.0)


# Cornering-at-speed ("scrub") protocol of both calibrations (issue 12: where a policy trained
# in JAX takes hairpins at full lock and speed): 3 s straight at speed action 1.0 (~3.5 m/s),
# then 1.5 s at speed action a and steering s, over SCRUB_GRID; reported: the yaw change
# (rad), the speed at the end (mean of the last 0.1 s) and the yaw rate at the end (mean of
# the last 0.5 s: PyBullet's chassis wobbles, ~0.2 rad/s at a ~0.45 s period).
SCRUB_AT, SCRUB_STEPS = 300, 450
SCRUB_GRID = tuple((a, s) for a in (1.0, 0.6, 0.2) for s in (1.0, 0.6, 0.3))


def scrub_policy(a: float, s: float, entry: float = 1.0):
    """Step i -> (actuator, speed action, steering) of the cornering-at-speed protocol:
    ``entry`` straight for SCRUB_AT steps, then (a, s)."""
    return lambda i: ("speed", entry, 0.0) if i < SCRUB_AT else ("speed", a, s)


# Hard braking into a corner with the speed actuator (issue 12: a policy braking into a hairpin
# at full lock): 3 s straight at speed action LOCK_ENTRY (~2.9 m/s), then LOCK_STEPS of speed
# action a (target (a + 1) / 2 x 3.5 m/s: -1 -> ~0, -0.8 -> 0.35, -0.6 -> 0.7) at steering s;
# reported: the yaw change after 0.4 s and at the end (0.8 s), and the speed at the end.
LOCK_ENTRY, LOCK_STEPS = 0.543, 80
LOCK_GRID = ((-1.0, 1.0), (-1.0, 0.6), (-1.0, -1.0), (-0.8, 1.0), (-0.6, 1.0), (-0.3, 1.0))


# --------------------------------------------------------------------------- open floor


def policy_actions(policy, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``policy(i) -> (kind, a, steering)`` for i < n as arrays: (speed actuator?, a, s)."""
    rows = [policy(i) for i in range(n)]
    return (np.array([k == "speed" for k, _, _ in rows]),
            np.array([a for _, a, _ in rows], np.float64),
            np.array([s for _, _, s in rows], np.float64))


def open_floor_jax_batch(dyn: Dynamics, speed_mode, a, s) -> np.ndarray:
    """(P, n, 5) rows of x, y, yaw, planar CoM speed, yaw rate of P JAX car models stepped
    together (numpy, no map) on an open floor; ``speed_mode`` (bool), ``a``, ``s``: (P, n)
    actions (speed actuator or motor, its action, steering) of each run and step."""
    speed_mode, a, s = (np.atleast_2d(np.asarray(x)) for x in (speed_mode, a, s))
    p_, n = a.shape
    v, steer, yaw, w = (np.zeros(p_) for _ in range(4))
    rear = np.zeros((2, p_))
    out = np.zeros((p_, n, 5))
    b = dyn.com_offset
    for i in range(n):
        v0 = v
        v, steer, w = car_step(dyn, v, steer, w, a[:, i], s[:, i], speed_mode[:, i], xp=np)
        ym = yaw + 0.5 * w * dyn.dt
        rear = rear + 0.5 * (v0 + v) * dyn.dt * np.stack([np.cos(ym), np.sin(ym)])
        yaw = yaw + w * dyn.dt
        out[:, i, 0] = rear[0] + b * np.cos(yaw)
        out[:, i, 1] = rear[1] + b * np.sin(yaw)
        out[:, i, 2], out[:, i, 3], out[:, i, 4] = yaw, np.hypot(v, b * w), w
    return out


def open_floor_jax(dyn: Dynamics, policy, n: int) -> np.ndarray:
    """(n, 5) rows of x, y, yaw, planar CoM speed, yaw rate of the JAX car model (numpy, no
    map) on an open floor under ``policy(i) -> (kind, a, steering)``."""
    return open_floor_jax_batch(dyn, *policy_actions(policy, n))[0]


class BulletFloorCar:
    """The PyBullet env's car alone on a plane (client ``cid``), optionally with one wall
    (body id ``wall``); built by :func:`open_floor_bullet`."""

    def __init__(self, cid: int, v: bullet.VehicleParams, wall: int | None = None):
        self.cid, self.v, self.wall = cid, v, wall
        env = object.__new__(bullet.BulletRacecarEnv)
        env._cid, env.vehicle = cid, v
        env.max_steer = spec.STEER_MAX_RAD
        env.car = bullet.load_car(cid, v)
        self.env = env
        self.car = env.car
        self.state = p.saveState(physicsClientId=cid)

    def step(self, kind: str, a: float, s: float):
        """One physics step with actuator ``kind`` at ``a`` and steering ``s``; returns the
        base's position, orientation (quaternion), linear and angular velocity (world)."""
        self.env.actuator = kind
        self.env._apply_action(a, s)
        p.stepSimulation(physicsClientId=self.cid)
        return self.env._kinematics()

    def run(self, policy, n: int) -> np.ndarray:
        """(n, 5) rows of x, y, yaw, planar speed, yaw rate under ``policy(i) -> (kind, a, s)``,
        from the state right after loading (restored first)."""
        p.restoreState(self.state, physicsClientId=self.cid)
        out = np.zeros((n, 5))
        for i in range(n):
            pos, orn, lin, ang = self.step(*policy(i))
            yaw = p.getEulerFromQuaternion(orn.tolist())[2]
            out[i] = pos[0], pos[1], yaw, math.hypot(lin[0], lin[1]), ang[2]
        return out


@contextlib.contextmanager
def open_floor_bullet(floor_friction: float = TRACK_FLOOR_FRICTION,
                      wall_y: float | None = None):
    """The PyBullet car alone on a plane of the tracks' floor friction (its own client, the
    env's gravity and time step): ``with open_floor_bullet() as car: trace = car.run(policy,
    n)`` (:class:`BulletFloorCar`). ``wall_y``: also a straight wall whose face is the line
    y = wall_y (40 m long, 1 m high), as :func:`wall_contact_probe` uses."""
    cid = p.connect(p.DIRECT)
    try:
        p.setGravity(0, 0, -bullet.GRAVITY, physicsClientId=cid)
        p.setTimeStep(bullet.DT, physicsClientId=cid)
        plane = p.loadURDF(os.path.join(pybullet_data.getDataPath(), "plane.urdf"),
                           physicsClientId=cid)
        p.changeDynamics(plane, -1, lateralFriction=floor_friction, physicsClientId=cid)
        wall = None
        if wall_y is not None:
            box = p.createCollisionShape(p.GEOM_BOX, halfExtents=[20, 0.25, 0.5],
                                         physicsClientId=cid)
            wall = p.createMultiBody(0, box, -1, [0, wall_y + 0.25, 0.5], physicsClientId=cid)
        yield BulletFloorCar(cid, bullet.VehicleParams(), wall)
    finally:
        p.disconnect(physicsClientId=cid)


# --------------------------------------------------------------------------- calibration


def _figures(run, dt: float, seconds: float) -> dict[str, float]:
    """The calibration figures from ``run(policy, n) -> (n, 5) trace`` (open_floor_*)."""
    out: dict[str, float] = {}
    n = int(seconds / dt)

    def first(cond):
        return float((np.nonzero(cond)[0][0] + 1) * dt) if cond.any() else math.nan

    for m in (1.0, 0.3):
        tr = run(lambda _i, m=m: ("motor", m, 0.0), n)
        out[f"top_speed_motor_{m}"] = float(tr[-int(1.0 / dt):, 3].mean())
        out[f"time_to_2mps_motor_{m}"] = first(tr[:, 3] >= 2.0)
        out[f"time_to_3mps_motor_{m}"] = first(tr[:, 3] >= 3.0)
    k = int(5.0 / dt)  # 5 s at full throttle, then brake / coast
    for m in (-1.0, -0.3, 0.0):
        tr = run(lambda i, m=m: ("motor", 1.0 if i < k else m, 0.0), k + int(4.0 / dt))
        if m < 0:
            out[f"stop_time_motor_{m}"] = first(tr[k:, 3] < 0.05)
        else:
            out["coast_speed_loss_1s"] = float(tr[k - 1, 3] - tr[k + int(1.0 / dt), 3])
    for vt in (1.0, 2.0, 3.0):
        cmd = vt / spec.SPEED_MAX_VELOCITY * 2.0 - 1.0
        tr = run(lambda _i, c=cmd: ("speed", c, 0.0), int(6.0 / dt))
        out[f"speed_actuator_target_{vt}_steady"] = float(tr[-int(1.0 / dt):, 3].mean())
    target = 2.0 / spec.SPEED_MAX_VELOCITY * 2.0 - 1.0  # speed actuator command for 2 m/s
    step_at = 300
    for sgn in (1.0, -1.0):
        tr = run(lambda i, s=sgn: ("speed", target, s if i >= step_at else 0.0), n)
        last = tr[-int(3.0 / dt):]
        yaw_rate, speed = float(last[:, 4].mean()), float(last[:, 3].mean())
        key = "right" if sgn > 0 else "left"
        out[f"yaw_rate_steer_{key}"] = yaw_rate
        out[f"speed_steer_{key}"] = speed
        out[f"turn_radius_steer_{key}"] = speed / max(abs(yaw_rate), 1e-9)
        out[f"yaw_rate_rise_90pct_{key}"] = first(np.abs(tr[step_at:, 4]) >= 0.9 * abs(yaw_rate))
    for m in BRAKE_TURN_MOTOR:
        tr = run(brake_turn_policy(m), BRAKE_TURN_STEPS)
        out[f"brake_turn_yaw_motor_{m}"] = float(tr[-1, 2] - tr[BRAKE_TURN_AT - 1, 2])
    for a, s in SCRUB_GRID:
        tr = run(scrub_policy(a, s), SCRUB_STEPS)
        yaw = np.unwrap(tr[:, 2])
        out[f"scrub_yaw_a{a}_s{s}"] = float(yaw[-1] - yaw[SCRUB_AT - 1])
        out[f"scrub_speed_a{a}_s{s}"] = float(tr[-int(0.1 / dt):, 3].mean())
        out[f"scrub_yaw_rate_a{a}_s{s}"] = float(tr[-int(0.5 / dt):, 4].mean())
    for a, s in LOCK_GRID:
        tr = run(scrub_policy(a, s, entry=LOCK_ENTRY), SCRUB_AT + LOCK_STEPS)
        yaw = np.unwrap(tr[:, 2])
        out[f"lock_yaw_0.4s_a{a}_s{s}"] = float(yaw[SCRUB_AT + 39] - yaw[SCRUB_AT - 1])
        out[f"lock_yaw_a{a}_s{s}"] = float(yaw[-1] - yaw[SCRUB_AT - 1])
        out[f"lock_speed_a{a}_s{s}"] = float(tr[-1, 3])
    return out


def calibrate_bullet(seconds: float = 15.0, floor_friction: float = TRACK_FLOOR_FRICTION,
                     ) -> dict[str, float]:
    """Dynamics facts of the PyBullet car on an open floor (no walls), for the JAX car's tuning.

    Speeds are planar speeds of the base (the chassis centre of mass, 0.2 m ahead of the rear
    axle — what racecar_gym's ``pose`` reports). Returns: top speeds at motor 1 and 0.3; times to
    reach 2 and 3 m/s from rest; stopping time from top speed at motor −1 and −0.3 and the
    speed lost in 1 s of coasting (motor 0); steady speeds of the ``speed`` actuator on a
    straight; the yaw rate, speed and turning radius at steering ±1 while holding ≈ 2 m/s
    (speed actuator, command for 2 m/s), and the time for the yaw rate to reach 90 % of that
    after a step in steering; the yaw change while braking and steering from top speed
    (``BRAKE_TURN_*``). The floor gets the tracks' friction (``floor_friction``).
    """
    with open_floor_bullet(floor_friction) as car:
        return _figures(car.run, bullet.DT, seconds)


def calibrate_jax(dyn: Dynamics | None = None, seconds: float = 15.0) -> dict[str, float]:
    """The figures of :func:`calibrate_bullet`, measured on the JAX car model ``dyn`` (same
    protocol, :func:`open_floor_jax`)."""
    dyn = dyn or Dynamics()
    return _figures(lambda policy, n: open_floor_jax(dyn, policy, n), dyn.dt, seconds)


# --------------------------------------------------------------------------- wall probe


def wall_params(wall_y: float = 1.5, x_range=(-6.0, 10.0), y_min: float = -3.0,
                res: float = 0.05) -> TrackParams:
    """An open floor with one straight wall, its face the line y = wall_y (the car's side is
    y < wall_y), as JAX track params: the JAX half of `wall_contact_probe`."""
    w = int(round((x_range[1] - x_range[0]) / res))
    h = int(round((wall_y + 0.5 - y_min) / res))
    yc = y_min + (h - np.arange(h) - 0.5) * res  # pixel-centre y of each row
    d = np.maximum(wall_y - yc, 0.0).astype(np.float32)[:, None] * np.ones((1, w), np.float32)
    # a wall band around the floor (sphere_trace does not bounds-check: see TrackParams)
    band = int(np.ceil(spec.LIDAR_RANGE * SensorConfig().lidar_min_step / res)) + 1
    d[:band], d[-band:], d[:, :band], d[:, -band:] = 0.0, 0.0, 0.0, 0.0
    return TrackParams(
        obstacle_m=jnp.asarray(d), progress=jnp.zeros((h, w), jnp.float32),
        origin=jnp.asarray([x_range[0], y_min], jnp.float32),
        resolution=jnp.asarray(res, jnp.float32),
        grid_pose=jnp.zeros(3, jnp.float32), rand_pose=jnp.zeros((1, 3), jnp.float32),
        lidar_map=jnp.asarray(d.reshape(-1), LIDAR_MAP_DTYPE))


def _probe_trace_jax(dyn: Dynamics, angle_deg, motor, steer_after, seconds, wall_y):
    env = JaxRacecar(TaskConfig(time_limit=1e6), dyn)
    params = wall_params(wall_y)
    st = env._spawn(jax.random.PRNGKey(0), params)
    st = st._replace(yaw=jnp.float32(np.deg2rad(angle_deg)))
    r = dyn.footprint_r

    def body(carry, _):
        st, hit = carry
        act = jnp.stack([jnp.float32(motor), jnp.where(hit, jnp.float32(steer_after), 0.0)])
        new, *_ = env._advance(st, act, params)
        c, s = jnp.cos(new.yaw), jnp.sin(new.yaw)
        clear = env._contact(params, new.pos, new.yaw)[0]
        row = jnp.stack([new.time, new.pos[0], new.pos[1], new.yaw, new.v * c, new.v * s,
                         new.collision.astype(jnp.float32), clear - r])
        return (new, hit | new.collision), row

    n = int(round(seconds / dyn.dt))
    _, rows = jax.jit(lambda st: jax.lax.scan(body, (st, jnp.bool_(False)), None, length=n))(st)
    return np.asarray(rows, np.float64)


def _probe_trace_bullet(angle_deg, motor, steer_after, seconds, wall_y):
    with open_floor_bullet(wall_y=wall_y) as car:
        cid = car.cid
        quat = p.getQuaternionFromEuler([0, 0, np.deg2rad(angle_deg)])
        p.resetBasePositionAndOrientation(car.car, [0, 0, spec.START_Z], quat,
                                          physicsClientId=cid)
        rows, hit = [], False
        for i in range(int(round(seconds / bullet.DT))):
            pos, orn, lin, _ = car.step("motor", motor, steer_after if hit else 0.0)
            c = len(p.getContactPoints(bodyA=car.car, bodyB=car.wall, physicsClientId=cid)) > 0
            hit |= c
            yaw = p.getEulerFromQuaternion(orn.tolist())[2]
            rows.append(((i + 1) * bullet.DT, pos[0], pos[1], yaw, lin[0], lin[1], float(c),
                         np.nan))
        return np.asarray(rows)


def wall_contact_probe(backend: str = "jax", angle_deg: float = 45.0, motor: float = 0.3,
                       steer_after: float = 0.0, seconds: float = 3.0, wall_y: float = 1.5,
                       dyn: Dynamics | None = None) -> dict:
    """Drive a car from the origin at `angle_deg` (0 = along the wall, 90 = straight at it) at
    `motor` into a straight wall y = wall_y on an open floor (track-floor friction in
    PyBullet), steering `steer_after` from the first contact on; the same protocol in either
    backend ("jax" | "bullet"). Returns the trace (rows: t, x, y, yaw, vx = speed along the
    wall, vy = speed into it, contact, footprint clearance - radius (jax)) and a summary:
    speed and angle at the impact, then at +0.1 … +2 s the angle to the wall (deg, +: CCW
    of the +x direction), the speed along the wall, and the contact fraction so far;
    `escape_s`: the first time after the impact at which the car runs along the wall
    (within 15°, either way) at > 0.3 m/s; `min_clearance` (jax): the deepest footprint
    penetration (negative) over the run."""
    if backend == "jax":
        tr = _probe_trace_jax(dyn or Dynamics(), angle_deg, motor, steer_after, seconds, wall_y)
    elif backend == "bullet":
        tr = _probe_trace_bullet(angle_deg, motor, steer_after, seconds, wall_y)
    else:
        raise ValueError(f"backend must be 'jax' or 'bullet', got {backend!r}")
    c = tr[:, 6] > 0
    out: dict[str, Any] = {"trace": tr, "contact": bool(c.any())}
    if not c.any():
        return out
    k = int(np.argmax(c))
    kb = max(k - 1, 0)
    out["impact_speed"] = float(np.hypot(tr[kb, 4], tr[kb, 5]))
    out["impact_angle_deg"] = float(np.rad2deg(tr[kb, 3]))
    for dt_ in (0.1, 0.3, 0.5, 1.0, 2.0):
        j = min(k + int(round(dt_ / 0.01)), len(tr) - 1)
        out[f"+{dt_}s"] = {"angle_deg": float(np.rad2deg(tr[j, 3])),
                           "v_along": float(tr[j, 4]), "v_into": float(tr[j, 5]),
                           "contact_frac": float(c[k:j + 1].mean())}
    yaw, speed = tr[k:, 3], np.hypot(tr[k:, 4], tr[k:, 5])
    along = (np.abs(np.sin(yaw)) < np.sin(np.deg2rad(15.0))) & (speed > 0.3)
    out["escape_s"] = float(np.argmax(along) * 0.01) if along.any() else float("nan")
    out["min_clearance"] = float(np.nanmin(tr[:, 7])) if backend == "jax" else float("nan")
    return out
