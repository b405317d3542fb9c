"""The racecar_gym interface both simulator backends implement (issue 4, §2).

One place for the facts — sensor geometry, actuator semantics, physics rate, task
rules — so that the PyBullet backend (rl/envs/bullet.py) and the pure-JAX backend
(rl/envs/jax_env.py) agree on what an observation, an action and a reward mean.
Values are those of racecar_gym's MIT racecar (models/vehicles/racecar/racecar.yml
and racecar.urdf upstream); where racecar_gym is wrong we say so and do better.

Frames: world x/y on the track plane, z up, yaw counter-clockwise from +x.
Body frame: x forward, y left, z up (pybullet convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from etl import configlib

# ---------------------------------------------------------------- simulation
PHYSICS_DT = 0.01  # s; 100 Hz physics, one physics step per env.step()
GRAVITY = -9.81

# ---------------------------------------------------------------- actuators
# Steering: action in [-1, 1] -> wheel angle. Upstream: max_steering_angle 0.42 times
# steering_multiplier 0.5 = 0.21 rad, and the joint target is -angle, so a POSITIVE
# command turns RIGHT (clockwise, negative yaw rate).
STEER_MAX_RAD = 0.21
STEER_SIGN = -1.0  # wheel angle (CCW positive) = STEER_SIGN * STEER_MAX_RAD * action

# Motor: action in [-1, 1]. a >= 0: velocity control of the driven wheel joints toward a
# FIXED target (max_velocity * velocity_multiplier rad/s) with max force |a| * max_force,
# so the value sets the force (acceleration), not the speed: even 0.3 reaches ~3.5 m/s.
# a < 0: target 0 with force |a| * max_force, i.e. a brake; there is no reverse.
MOTOR_MAX_VELOCITY = 5.0
MOTOR_VELOCITY_MULTIPLIER = 20.0
MOTOR_MAX_FORCE = 0.5
MOTOR_TARGET_WHEEL_SPEED = MOTOR_MAX_VELOCITY * MOTOR_VELOCITY_MULTIPLIER  # rad/s
TOP_SPEED_MPS = 3.8  # observed top speed of the upstream car (approx.)
# Speed actuator variant: action in [-1, 1] -> target (a+1)/2 * 3.5 m/s (times 25 rad/s per m/s).
SPEED_MAX_VELOCITY = 3.5
SPEED_VELOCITY_MULTIPLIER = 25.0
SPEED_MAX_FORCE = 0.5


def speed_command(a, speed_max: float, speed_min: float = 0.0):
    """The speed actuator's command for a car whose targets span ``speed_min`` … ``speed_max``
    m/s (:attr:`TaskConfig.speed_min`, :attr:`TaskConfig.speed_max`): the policy's a ∈ [−1, 1]
    asks for v = speed_min + (a + 1) / 2 × (speed_max − speed_min); as the backend's own
    command (target (c + 1) / 2 × SPEED_MAX_VELOCITY) that is c = 2 v / SPEED_MAX_VELOCITY − 1.
    ``a`` unchanged at the defaults (0 … racecar_gym's 3.5 m/s)."""
    if speed_max == SPEED_MAX_VELOCITY and speed_min == 0.0:
        return a
    target = speed_min + (a + 1.0) * (0.5 * (speed_max - speed_min))
    return target * (2.0 / SPEED_MAX_VELOCITY) - 1.0

# ---------------------------------------------------------------- vehicle geometry
WHEEL_RADIUS = 0.05  # m
WHEELBASE = 0.325  # m, rear axle to front axle
# The pose (PyBullet's base frame, racecar_gym's `pose`) is the chassis centre of mass, 0.2 m
# ahead of the rear axle (front axle +0.125 m); every body-frame offset below is from it.
COM_AHEAD_OF_REAR_AXLE = 0.2  # m
TRACK_WIDTH = 0.2  # m, left to right wheel centres
CAR_LENGTH = 0.50  # m, footprint used for map-based collision (approx. chassis + bumpers)
CAR_WIDTH = 0.25  # m
CAR_REAR_OVERHANG = 0.05  # m behind the rear axle (the footprint spans pose ± 0.25 m)
START_Z = 0.05  # m, spawn height used by racecar_gym
# footprint for map-based clearance: circles of radius FOOTPRINT_R centred along the body x
# axis at FOOTPRINT_X from the pose (they cover pose ± 0.25 m × the car's width)
FOOTPRINT_X = (-0.125, 0.0, 0.125)
FOOTPRINT_R = CAR_WIDTH / 2

# ---------------------------------------------------------------- lidar (hokuyo)
LIDAR_RAYS = 1080
LIDAR_FOV_RAD = 4.71  # 270 deg
LIDAR_ANGLE_FIRST = 2.36  # ray 0 points +135 deg (left-rear), rays sweep clockwise to -135 deg
LIDAR_MIN_RANGE = 0.25  # m
LIDAR_RANGE = 15.0  # m, ray length
LIDAR_MAX = LIDAR_MIN_RANGE + LIDAR_RANGE  # 15.25, top of the observation space
LIDAR_NOISE = 0.03  # multiplicative, uniform in [1 - 0.03, 1 + 0.03]
LIDAR_HZ = 25.0  # refreshed every 4 physics steps, held in between
LIDAR_PERIOD = round(1.0 / (LIDAR_HZ * PHYSICS_DT))  # 4 physics steps
LIDAR_MOUNT = (0.065, 0.0, 0.075)  # m, body frame, from the pose (the hokuyo link)
# Upstream range model (racecar_gym bullet/sensors.py): the ray runs 15 m from the sensor;
# scan = clip((15 * hit_fraction + 0.25) * U(0.97, 1.03), 0.25, 15.0). We keep the +0.25 offset
# (it is what racecar_gym policies saw) but clip to the space's top, 15.25, not 15.0.


def lidar_angles():
    """Ray directions in the body frame, radians, CCW from +x: +135 deg ... -135 deg."""
    import numpy as np

    return LIDAR_ANGLE_FIRST - np.arange(LIDAR_RAYS) * (LIDAR_FOV_RAD / LIDAR_RAYS)


def lidar_scan(distance, noise, xp=None):
    """Scan value from the true hit distance (m, inf/large for no hit) and U(1±0.03) noise.

    Works with numpy or jax.numpy arrays (pass ``xp``)."""
    if xp is None:
        import numpy as xp  # noqa: PLW0127
    d = xp.minimum(distance, LIDAR_RANGE) + LIDAR_MIN_RANGE
    return xp.clip(d * noise, LIDAR_MIN_RANGE, LIDAR_MAX)


# ---------------------------------------------------------------- rgb camera (zed)
CAMERA_WIDTH = 128
CAMERA_HEIGHT = 128
CAMERA_FOV_DEG = 90.0
CAMERA_HZ = 30.0
CAMERA_MOUNT = (0.19, 0.0, 0.04)  # m, body frame, from the pose (the zed link)
CAMERA_NEAR = 0.01
CAMERA_FAR = 100.0

# ---------------------------------------------------------------- walls
WALL_HEIGHT = 1.0  # m

# ---------------------------------------------------------------- observation / info keys
OBS_KEYS = ("pose", "velocity", "acceleration", "lidar", "rgb_camera", "time")
# pose: (6,) x y z roll pitch yaw (world). velocity: (6,) linear then angular, body frame.
# acceleration: (6,) finite difference of velocity over PHYSICS_DT. lidar: (1080,) m.
# rgb_camera: (128, 128, 3) uint8 (optional). time: (1,) s since reset.
POSE_BOUNDS = (100.0, 100.0, 3.0)
MAX_LINEAR_VELOCITY = 14.0
MAX_ANGULAR_VELOCITY = 6.0
INFO_KEYS = (
    "pose", "velocity", "acceleration", "wall_collision", "progress", "lap",
    "checkpoint", "wrong_way", "time",
)
ACTION_KEYS = ("motor", "steering")
# What both PPO runners report per ended episode (``episode/<key>`` in metrics.jsonl), read
# from the info of the episode's last policy step: the JAX backend's functional env
# (rl/envs/functional.py) and the host backends' ActionRepeat wrapper (rl/envs/wrappers.py)
# both fill them, with the same meaning.
EPISODE_KEYS = (
    "laps",  # laps driven since the reset, signed (lap + progress, now minus at the reset)
    "collisions",  # physics steps touching a wall since the reset
    "distance",  # metres driven since the reset
    "lap_time",  # s since the reset per completed lap (NaN before the first)
    "wall_collision",  # 1 if the last policy step touched a wall (the episode ended on it)
    "wrong_way",  # 1 if the car was driving the wrong way at the end
    "speed",  # m/s at the end
)


# ---------------------------------------------------------------- actions
def action_array(action, xp=None):
    """An action as the simulators' policy sees it, ``[..., 2]`` = [motor, steering]: from an
    array (returned as float32) or a dict of ``motor`` (or the speed actuator's ``speed``) and
    ``steering`` arrays shaped (...,) or (..., 1). numpy or jax.numpy (``xp``)."""
    if xp is None:
        import numpy as xp  # noqa: PLW0127
    if isinstance(action, dict):
        motor = action["motor"] if "motor" in action else action["speed"]
        motor, steer = xp.asarray(motor, xp.float32), xp.asarray(action["steering"], xp.float32)
        if motor.ndim and motor.shape[-1] == 1:
            motor, steer = motor[..., 0], steer[..., 0]
        return xp.stack([motor, steer], axis=-1)
    return xp.asarray(action, xp.float32)


def action_dict(action, actuator: str = "motor") -> dict:
    """``[..., 2]`` [drive, steering] → racecar_gym's action dict of (..., 1) float32 arrays
    (numpy: what a gymnasium env, or vector env, takes); the drive goes to ``actuator``
    (``"motor"`` or ``"speed"``, :attr:`TaskConfig.actuator`)."""
    import numpy as np

    if actuator not in ("motor", "speed"):
        raise ValueError(f"actuator must be 'motor' or 'speed', got {actuator!r}")
    a = np.asarray(action, np.float32)
    return {actuator: a[..., 0:1], "steering": a[..., 1:2]}


# ---------------------------------------------------------------- task
@dataclass(frozen=True)
class TaskConfig:
    """maximize_progress, done better than upstream.

    reward = progress_reward * Δ(lap + progress) — SIGNED: driving backwards costs what
    driving forwards earns, and a crossing of the start line in either direction is
    unwrapped (|Δ| > 0.5 -> Δ ∓ 1) — + collision_reward on a wall contact + frame_reward
    every step + proximity_reward * clip((wall_margin - clearance) / wall_margin, 0, 1),
    clearance = the car footprint's distance to the nearest wall (FOOTPRINT_X/R; an extension
    of ours: it rewards keeping off the walls before touching them). terminated on collision
    (if terminate_on_collision), on a stall (if stall_time > 0) or once lap > laps (laps
    completed); truncated at
    time > time_limit (never terminated).
    Lap and checkpoint bookkeeping: checkpoint = floor(progress * checkpoints); entering
    checkpoint 0 from checkpoints-1 completes a lap; going from c to c-1 (or 0 to last)
    sets wrong_way until the car moves forward again. lap starts at 1 as upstream.
    """

    laps: int = 1
    time_limit: float = 120.0  # s
    terminate_on_collision: bool = False
    progress_reward: float = 100.0
    collision_reward: float = 0.0
    frame_reward: float = 0.0
    proximity_reward: float = 0.0  # per physics step at full depth (wall_margin into the band)
    wall_margin: float = 0.3  # m
    # a car slower than stall_speed for stall_time seconds has failed like a crash: the episode
    # is terminated and collision_reward paid (0 = off; ours: with no reverse gear, a car
    # stopped nose to a wall never moves again)
    stall_time: float = 0.0  # s
    stall_speed: float = 0.1  # m/s
    # paid when a stall ends the episode; None = collision_reward (a stall is a crash)
    stall_reward: float | None = None
    checkpoints: int = 5
    reset_mode: Literal["grid", "random"] = "grid"
    random_min_obstacle: float = 0.5  # normalized obstacle distance for random spawns
    observe_camera: bool = False
    # the drive action: "motor" (racecar_gym's default: > 0 drives, < 0 brakes) or "speed"
    # (racecar_gym's speed actuator: a target speed (a + 1) / 2 * SPEED_MAX_VELOCITY)
    actuator: Literal["motor", "speed"] = "motor"
    # the JAX simulator's car model (rl.envs.jax_env.car): "kinematic" (the bicycle model),
    # "tyre" (a front tyre fitted to PyBullet's cornering) or "tyre_lock" (the same, losing
    # front grip under the speed actuator's hard braking); other backends have their own
    car: Literal["kinematic", "tyre", "tyre_lock"] = "kinematic"
    # the speed actuator's top target, m/s: the drive action's [-1, 1] asks for 0 ... speed_max
    # (every backend: speed_command rescales the command before the car sees it); racecar_gym's
    # is SPEED_MAX_VELOCITY (3.5). Ours: a cap that leaves a margin where simulators differ most
    speed_max: float = SPEED_MAX_VELOCITY
    # the speed actuator's lowest target, m/s: a floor under every command, so the policy
    # cannot ask the car to stop (0 = racecar_gym's: the action's −1 asks for 0 m/s)
    speed_min: float = 0.0

    @property
    def speed_rescaled(self) -> bool:
        """Whether the speed actuator's range differs from racecar_gym's 0 … 3.5 m/s."""
        return self.speed_max != SPEED_MAX_VELOCITY or self.speed_min != 0.0

    @property
    def stall_paid(self) -> float:
        """The reward a stall that ends the episode pays: stall_reward, else collision_reward."""
        return self.collision_reward if self.stall_reward is None else self.stall_reward

    def __post_init__(self):
        configlib.check_literals(self, "TaskConfig")
        if not 0.0 < self.speed_max <= SPEED_MAX_VELOCITY:
            raise ValueError(f"TaskConfig.speed_max: m/s in (0, {SPEED_MAX_VELOCITY}], "
                             f"got {self.speed_max}")
        if self.speed_max != SPEED_MAX_VELOCITY and self.actuator != "speed":
            raise ValueError("TaskConfig.speed_max caps the speed actuator; the task's actuator "
                             f"is {self.actuator!r}")
        if not 0.0 <= self.speed_min < self.speed_max:
            raise ValueError(f"TaskConfig.speed_min: m/s in [0, speed_max = {self.speed_max}), "
                             f"got {self.speed_min}")
        if self.speed_min != 0.0 and self.actuator != "speed":
            raise ValueError("TaskConfig.speed_min is a floor of the speed actuator; the task's "
                             f"actuator is {self.actuator!r}")
        if self.wall_margin <= 0:
            raise ValueError("TaskConfig.wall_margin must be > 0")
        if self.laps < 1 or self.checkpoints < 1:
            raise ValueError("TaskConfig.laps and .checkpoints must be >= 1")


def signed_progress_delta(prev, new):
    """Δ of (lap + progress) with the start-line wrap unwrapped, numpy or jax scalars/arrays.

    prev/new are the *continuous* totals lap + progress; a jump of more than half a lap
    means the line was crossed (the lap counter may lag by a checkpoint), so unwrap it."""
    d = new - prev
    return d - (d > 0.5) * 1.0 + (d < -0.5) * 1.0


GRID_WINDOW_PX = 20  # racecar_gym's starting area: 20 rows south of the origin, ±20 columns


def grid_start_offsets(n_agents: int = 1):
    """racecar_gym's AutomaticGridStrategy offsets (x, y) for agent i, from the point the
    strategy finds (:func:`grid_pose`); single agent: (+0.5, +0.4)."""
    return [(1.0 * (n_agents - i) / 2, 0.4 if i % 2 == 0 else -0.4) for i in range(n_agents)]


def grid_pose(track, agent: int = 0, n_agents: int = 1) -> tuple[float, float, float]:
    """The grid start (x, y, yaw) of racecar_gym's AutomaticGridStrategy
    (racecar_gym/bullet/positioning.py), which both simulator backends use.

    Upstream, with ``(px, py) = GridMap.to_pixel(0, 0)`` (row, column of the world origin):
    ``area = obstacle_map[px:px + 20, py - 20:py + 20]``, ``(i, j) = argmax(area)`` (the
    widest point: largest normalized distance to a wall), then
    ``GridMap.to_meter(px + i, py + j)`` — the column index ``j`` is added to ``py``, not to
    the window's first column ``py - 20``, so the point used lies 20 pixels (1 m at 0.05 m per
    pixel) east of the widest point found — and from there the agent's
    :func:`grid_start_offsets` ((+0.5, +0.4) for one car), yaw 0 (facing +x). We reproduce
    this exactly, offset included: it is where racecar_gym's car starts (on Austria x = 0.5,
    just past the start line, rather than 1 m earlier, behind it).

    The pose is the chassis centre of mass (PyBullet's base frame), as after a racecar_gym
    ``reset``, which places the base with ``resetBasePositionAndOrientation``. The first
    episode of a freshly loaded racecar_gym env starts 0.2 m further along the heading: its
    car is created by ``loadURDF`` at the pose, which places the URDF's chassis *link* frame
    there, and the centre of mass is 0.2 m ahead of it (:data:`COM_AHEAD_OF_REAR_AXLE`).

    When the pose lands off the drivable area (a track whose origin is not on the start
    straight) the scene's first starting-grid pose is used instead. ``track``: anything with
    ``origin``, ``resolution``, ``obstacle``, ``drivable``, ``starts`` and ``world_to_pixel``
    (an :class:`rl.tracks.Track`)."""
    import numpy as np

    n = GRID_WINDOW_PX
    px, py = track.world_to_pixel(0.0, 0.0)
    area = np.asarray(track.obstacle)[px : px + n, py - n : py + n]
    i, j = np.unravel_index(int(np.argmax(area)), area.shape)
    h, w = track.drivable.shape
    ox, oy = track.origin
    cx = ox + (py + j) * track.resolution  # GridMap.to_meter(px + i, py + j): a pixel corner
    cy = oy + (h - (px + i)) * track.resolution
    dx, dy = grid_start_offsets(n_agents)[agent]
    x, y = cx + dx, cy + dy
    r, c = track.world_to_pixel(x, y)
    if not (0 <= r < h and 0 <= c < w and track.drivable[r, c]):
        s = np.asarray(track.starts, np.float64)[0]
        return float(s[0]), float(s[1]), float(s[5])
    return float(x), float(y), 0.0


DEG = math.pi / 180.0
