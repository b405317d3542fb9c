"""A racecar_gym-compatible PyBullet environment that needs nothing from the network.

One car (the MIT racecar with a differential, ``racecar/racecar_differential.urdf`` from
``pybullet_data``, rear-wheel friction raised to racecar_gym's 0.8) on any track that
:func:`rl.tracks.load_track` returns (a racecar_gym scene folder or zip, a compiled mesh-only
track, or ``procedural:<seed>``). Each environment owns its own physics client
(``p.connect(p.DIRECT)``, ``physicsClientId`` everywhere), so many of them live in one process.

    env = BulletRacecarEnv("austria", camera=False)
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step({"motor": [0.5], "steering": [0.0]})

Semantics (racecar_gym's ``racecar.yml``, where they are right):

* ``motor`` ∈ [−1, 1]: ≥ 0 drives both rear differentials by velocity control toward a fixed
  wheel speed (5 · 20 = 100 rad/s) with a maximum force of ``0.5 · motor``; < 0 brakes
  (target speed 0, force ``0.5 · |motor|``) — there is no reverse.
* ``speed`` (the ``actuator="speed"`` variant) ∈ [−1, 1] maps to a target of 0…3.5 m/s
  (times 25 rad/s per m/s at the wheels) at full force 0.5.
* ``steering`` ∈ [−1, 1] → ±0.21 rad at the front hinges, positive turns right.
* 100 Hz physics, one ``stepSimulation`` per :meth:`step`; the lidar (and camera) refresh
  every 4th step (25 Hz) and hold their last reading in between.

The lidar is racecar_gym's: 1080 rays over 270° (+135° → −135°) cast from the hokuyo link,
15 m long, read through :func:`rl.envs.spec.lidar_scan` (distance + 0.25, ×U(0.97, 1.03),
clipped to [0.25, 15.25]). The camera renders 128×128 with ER_TINY_RENDERER (no OpenGL needed)
from the zed link, FOV 90°. ``pose`` is the base's position — PyBullet's base frame is the
chassis centre of mass, 0.2 m ahead of the rear axle — and roll/pitch/yaw; ``velocity`` and
``acceleration`` are in the body frame (acceleration by finite differences at 100 Hz).

Where racecar_gym is wrong this environment differs on purpose: the observation is taken
*after* the action; the progress reward is signed (driving backwards costs what it would have
paid, the finish line wraps) and laps are counted with its off-by-one fixed; the time limit
truncates rather than terminates; every random draw (sensor noise, random starts) comes from
``reset(seed=…)``'s generator, and reset(seed) → step is exactly repeatable (the car's contact
cache is dropped on reset, overlapping pairs are sorted). Race bookkeeping (checkpoints, laps,
wrong_way) follows the same rules as rl/envs/jax_env.py, so the two backends agree.

The car's calibration against the JAX backend is in rl/envs/calibration.py; scripted drivers
are in rl/drivers.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import pybullet as p
import pybullet_data

from rl.envs import spec

# --------------------------------------------------------------------------- the vehicle


@dataclass(frozen=True)
class VehicleParams:
    """The MIT racecar as racecar_gym configures it (models/vehicles/racecar/racecar.yml)."""

    urdf: str = "racecar/racecar_differential.urdf"
    rear_lateral_friction: float = 0.8  # racecar_gym's URDF edit of the rear wheels (links 12, 14)
    motor_max_velocity: float = spec.MOTOR_MAX_VELOCITY  # × multiplier = wheel target, rad/s
    motor_velocity_multiplier: float = spec.MOTOR_VELOCITY_MULTIPLIER
    motor_max_force: float = spec.MOTOR_MAX_FORCE
    speed_max_velocity: float = spec.SPEED_MAX_VELOCITY  # `speed`: [-1, 1] → [0, 3.5] m/s
    speed_velocity_multiplier: float = spec.SPEED_VELOCITY_MULTIPLIER
    speed_max_force: float = spec.SPEED_MAX_FORCE
    motor_joints: tuple[int, ...] = (8, 15)  # the two differential rings
    steering_joints: tuple[int, ...] = (0, 2)  # left / right steering hinges
    rear_wheel_links: tuple[int, ...] = (12, 14)
    lidar_link: int = 4  # hokuyo
    camera_link: int = 5  # zed camera
    spawn_z: float = spec.START_Z


# The differential: gear constraints (parent joint, child joint, ratio, aux link or -1) that tie
# the rings, spiders and side shafts of the two differentials to the wheels (racecar_gym's set).
_GEARS = (
    (9, 11, 1.0, -1), (10, 13, -1.0, -1), (9, 13, -1.0, -1),
    (16, 18, 1.0, -1), (16, 19, -1.0, -1), (17, 19, -1.0, -1),
    (1, 18, -1.0, 15), (3, 19, -1.0, 15),
)  # fmt: skip

DT = spec.PHYSICS_DT  # 0.01 s, racecar_gym's simulation.time_step
GRAVITY = -spec.GRAVITY  # 9.81 m/s², pointing down


# The car's links go into their own collision group so that the lidar's rays can skip them: a
# ray starting inside the chassis otherwise runs a convex cast against its hull, ~10x the cost
# of the whole scan. The car still collides with everything (its mask is unchanged). PyBullet
# resets the broadphase filter of a multibody's links on stepSimulation, so the group is set
# again before every scan (20 calls, ~20 µs).
CAR_GROUP = 0x4
LIDAR_MASK = 0xFFFF & ~CAR_GROUP


def _set_car_group(cid: int, car: int) -> None:
    for link in range(-1, p.getNumJoints(car, physicsClientId=cid)):
        p.setCollisionFilterGroupMask(car, link, CAR_GROUP, 0xFFFF, physicsClientId=cid)


def grid_pose(track) -> tuple[float, float, float]:
    """The grid start: racecar_gym's AutomaticGridStrategy for a single car, exactly as
    upstream computes it (:func:`rl.envs.spec.grid_pose`, which documents its 1 m column
    offset); the JAX backend starts from the same pose."""
    return spec.grid_pose(track)


@contextlib.contextmanager
def _quiet_stdout():
    """Silence PyBullet's C-level importer warnings (printed straight to fd 1) while loading."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def sensor_period(hz: float) -> int:
    """Physics steps between refreshes of a sensor running at ``hz`` (racecar_gym's
    FixedTimestepSensor fires on the first step whose accumulated time reaches 1/hz)."""
    return max(1, math.ceil(1.0 / (hz * DT) - 1e-6))


def load_car(cid: int, v: VehicleParams) -> int:
    """Load the racecar into client ``cid``: free-rolling joints, the differential's gears, and
    racecar_gym's rear-wheel friction. Returns its body id."""
    urdf = os.path.join(pybullet_data.getDataPath(), v.urdf)
    car = p.loadURDF(urdf, [0, 0, v.spawn_z], [0, 0, 0, 1], physicsClientId=cid)
    for j in range(p.getNumJoints(car, physicsClientId=cid)):
        p.setJointMotorControl2(
            car, j, p.VELOCITY_CONTROL, targetVelocity=0, force=0, physicsClientId=cid
        )
    for a, b, ratio, aux in _GEARS:
        k = p.createConstraint(
            car, a, car, b, p.JOINT_GEAR, [0, 1, 0], [0, 0, 0], [0, 0, 0], physicsClientId=cid
        )
        kw = {"gearRatio": ratio, "maxForce": 10000}
        if aux >= 0:
            kw["gearAuxLink"] = aux
        p.changeConstraint(k, physicsClientId=cid, **kw)
    for link in v.rear_wheel_links:
        p.changeDynamics(car, link, lateralFriction=v.rear_lateral_friction, physicsClientId=cid)
    _set_car_group(cid, car)
    return car


# --------------------------------------------------------------------------- the environment
class BulletRacecarEnv(gym.Env):
    """racecar_gym's single-agent ``maximize_progress`` race on one PyBullet client.

    Args:
      track: a :class:`rl.tracks.Track`, or anything :func:`rl.tracks.load_track` accepts.
      task: a :class:`rl.envs.spec.TaskConfig` (reward weights, laps, time limit, collision
        termination); ``None`` takes its defaults.
      camera: render the 128×128 RGB camera (ER_TINY_RENDERER, slow) into ``rgb_camera``.
      lidar: cast the 1080-ray lidar into ``lidar``.
      actuator: ``"motor"`` (racecar_gym's default) or ``"speed"``.
      reset_mode: ``"grid"`` (the track's starting grid) or ``"random"`` (a random drivable pose
        facing along the progress field); ``reset(options={"mode": …})`` overrides it.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 25}

    def __init__(
        self,
        track: Any = "procedural:0",
        task: spec.TaskConfig | None = None,
        *,
        camera: bool | None = None,
        lidar: bool = True,
        actuator: str = "motor",
        reset_mode: str | None = None,
        start_index: int | None = None,
        vehicle: VehicleParams = VehicleParams(),
        render_mode: str | None = None,
    ):
        task = task if task is not None else spec.TaskConfig()
        reset_mode = reset_mode if reset_mode is not None else task.reset_mode
        if actuator not in ("motor", "speed"):
            raise ValueError(f"actuator must be 'motor' or 'speed', got {actuator!r}")
        if reset_mode not in ("grid", "random"):
            raise ValueError(f"reset_mode must be 'grid' or 'random', got {reset_mode!r}")
        if isinstance(track, str | os.PathLike):
            from rl.tracks import load_track

            track = load_track(track)
        self.track = track
        self.task = task
        self.vehicle = vehicle
        self.use_camera = bool(task.observe_camera if camera is None else camera)
        self.use_lidar = lidar
        self.actuator = actuator
        self.reset_mode = reset_mode
        self.start_index = start_index
        self.render_mode = render_mode

        self.n_rays = spec.LIDAR_RAYS
        self.angles = np.asarray(spec.lidar_angles(), np.float64)
        self.lidar_period = sensor_period(spec.LIDAR_HZ)
        self.camera_period = sensor_period(spec.CAMERA_HZ)
        self.cam_h, self.cam_w = spec.CAMERA_HEIGHT, spec.CAMERA_WIDTH
        self.max_steer = spec.STEER_MAX_RAD
        self.n_checkpoints = int(task.checkpoints)

        box = lambda lo, hi, shape: gym.spaces.Box(lo, hi, shape, np.float32)
        inf = np.inf
        pose_hi = np.array([*spec.POSE_BOUNDS, np.pi, np.pi, np.pi], np.float32)
        vel_hi = np.array(
            [spec.MAX_LINEAR_VELOCITY] * 3 + [spec.MAX_ANGULAR_VELOCITY] * 3, np.float32
        )
        spaces: dict[str, gym.Space] = {
            "pose": box(-pose_hi, pose_hi, (6,)),
            "velocity": box(-vel_hi, vel_hi, (6,)),
            "acceleration": box(-inf, inf, (6,)),
            "time": box(0.0, inf, (1,)),
        }
        if lidar:
            spaces["lidar"] = box(spec.LIDAR_MIN_RANGE, spec.LIDAR_MAX, (self.n_rays,))
        if self.use_camera:
            spaces["rgb_camera"] = gym.spaces.Box(0, 255, (self.cam_h, self.cam_w, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Dict(
            {
                actuator: gym.spaces.Box(-1.0, 1.0, (1,), np.float32),
                "steering": gym.spaces.Box(-1.0, 1.0, (1,), np.float32),
            }
        )

        self._cid = p.connect(p.DIRECT)
        self._build_world()
        self._ray_from, self._ray_to = self._ray_endpoints()
        self._ray_from_list, self._ray_to_list = self._ray_from.tolist(), self._ray_to.tolist()
        self._state: dict[str, Any] = {}

    # ----------------------------------------------------------------- world construction
    def _build_world(self) -> None:
        c = self._cid
        p.resetSimulation(physicsClientId=c)
        p.setGravity(0, 0, -GRAVITY, physicsClientId=c)
        p.setTimeStep(DT, physicsClientId=c)
        # restoreState + sorted overlapping pairs make reset(seed) → step exactly repeatable
        p.setPhysicsEngineParameter(deterministicOverlappingPairs=1, physicsClientId=c)
        self.walls_id, self.floor_id = self._load_scene()
        self.car = load_car(c, self.vehicle)
        # The onboard camera never sees its own car, but ER_TINY_RENDERER still rasterizes the
        # car's detailed meshes: hiding them makes a frame ~10x cheaper, pixel-identical.
        self._car_colors = {
            d[1]: d[7] for d in p.getVisualShapeData(self.car, physicsClientId=c)
        }  # link → rgba
        self._show_car(False)
        self._initial_state = p.saveState(physicsClientId=c)

    def _load_scene(self) -> tuple[int, int]:
        """Walls and floor from the scene's sdf, or straight from its meshes."""
        c = self._cid
        scene = getattr(self.track, "scene_dir", None)
        name = getattr(self.track, "name", "")
        if scene is not None:
            sdf = os.path.join(scene, f"{name}.sdf")
            if not os.path.exists(sdf):
                sdfs = [f for f in os.listdir(scene) if f.endswith(".sdf")]
                sdf = os.path.join(scene, sdfs[0]) if len(sdfs) == 1 else sdf
            if os.path.exists(sdf):
                with _quiet_stdout():
                    ids = p.loadSDF(sdf, physicsClientId=c)
                named = {p.getBodyInfo(i, physicsClientId=c)[1].decode(): i for i in ids}
                if "walls" in named:
                    floor = named.get("floor")
                    if floor is None:
                        floor = self._plane()
                    return named["walls"], floor
            walls_obj = os.path.join(scene, "meshes", "Walls.obj")
            if os.path.exists(walls_obj):
                floor_obj = os.path.join(scene, "meshes", "Floor.obj")
                floor = self._mesh_body(floor_obj) if os.path.exists(floor_obj) else self._plane()
                return self._mesh_body(walls_obj), floor
        raise FileNotFoundError(
            f"track {name!r}: no <name>.sdf with a 'walls' model and no meshes/Walls.obj "
            f"under scene_dir={scene!r}"
        )

    def _mesh_body(self, path: str) -> int:
        c = self._cid
        col = p.createCollisionShape(
            p.GEOM_MESH, fileName=path, flags=p.GEOM_FORCE_CONCAVE_TRIMESH, physicsClientId=c
        )
        vis = p.createVisualShape(p.GEOM_MESH, fileName=path, physicsClientId=c)
        return p.createMultiBody(0, col, vis, physicsClientId=c)

    def _plane(self) -> int:
        path = os.path.join(pybullet_data.getDataPath(), "plane.urdf")
        return p.loadURDF(path, physicsClientId=self._cid)

    def _ray_endpoints(self) -> tuple[np.ndarray, np.ndarray]:
        """Rays in the laser link's frame (x forward, y left), from its centre outwards."""
        d = np.stack([np.cos(self.angles), np.sin(self.angles), np.zeros_like(self.angles)], -1)
        return np.zeros_like(d), d * spec.LIDAR_RANGE

    # ----------------------------------------------------------------- gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        mode = options.get("mode", self.reset_mode)
        if "pose" in options:
            x, y, yaw = (float(v) for v in options["pose"])
        elif "start_index" in options or (mode == "grid" and self.start_index is not None):
            starts = np.asarray(self.track.starts, np.float64)
            i = options.get("start_index", self.start_index)
            s = starts[int(i) % len(starts)]
            x, y, yaw = float(s[0]), float(s[1]), float(s[5])
        elif mode == "grid":
            x, y, yaw = grid_pose(self.track)
        elif mode == "random":
            x, y, yaw = self._random_pose()
        else:
            raise ValueError(f"unknown reset mode {mode!r}")
        c = self._cid
        # drop the car's cached contact manifolds (their warm-start impulses survive
        # restoreState and would make the first steps depend on the previous episode)
        for link in range(-1, p.getNumJoints(self.car, physicsClientId=c)):
            p.setCollisionFilterGroupMask(self.car, link, 0, 0, physicsClientId=c)
        p.performCollisionDetection(physicsClientId=c)
        _set_car_group(c, self.car)
        p.restoreState(self._initial_state, physicsClientId=c)
        quat = p.getQuaternionFromEuler([0.0, 0.0, yaw])
        p.resetBasePositionAndOrientation(
            self.car, [x, y, self.vehicle.spawn_z], quat, physicsClientId=c
        )
        p.resetBaseVelocity(self.car, [0, 0, 0], [0, 0, 0], physicsClientId=c)
        self._apply_action(0.0, 0.0, brake_when_idle=False)
        p.stepSimulation(physicsClientId=c)  # settle contacts, as racecar_gym does

        self._steps = 0
        self._time = 0.0
        pos, orn, v_world, w_world = self._kinematics()
        self._v_world_prev, self._w_world_prev = v_world, w_world
        prog = self._progress_at(pos[0], pos[1], fallback=0.0)
        lap0 = 0 if prog > 0.9 else 1  # spawned just behind the line: lap 1 starts on crossing
        self._state = {
            "progress": prog,
            "lap": lap0,  # racecar_gym counts from 1; the race is over once lap > laps
            "checkpoint": self._checkpoint(prog),
            "total": lap0 + prog,  # lap + progress, continuous across the line
            "ema": 0.0,
            "wrong_way": False,
            "still": 0,  # physics steps in a row below task.stall_speed
        }
        self._lidar = np.full(self.n_rays, spec.LIDAR_MAX, np.float32)
        self._rgb = np.zeros((self.cam_h, self.cam_w, 3), np.uint8)
        self._refresh_sensors()
        obs, info = self._observe(pos, orn, v_world, w_world, collided=False)
        return obs, info

    def step(self, action):
        a = action[self.actuator]
        drive = float(np.clip(np.asarray(a, np.float64).reshape(-1)[0], -1.0, 1.0))
        if self.actuator == "speed":  # the task's speed range (identity at racecar_gym's)
            drive = spec.speed_command(drive, self.task.speed_max, self.task.speed_min)
        steer = float(np.clip(np.asarray(action["steering"], np.float64).reshape(-1)[0], -1, 1))
        self._apply_action(drive, steer)
        p.stepSimulation(physicsClientId=self._cid)
        self._steps += 1
        self._time = self._steps * DT

        pos, orn, v_world, w_world = self._kinematics()
        collided = self._wall_contact()
        s, task = self._state, self.task
        delta = self._update_progress(pos)
        self._refresh_sensors(self._steps)
        obs, info = self._observe(pos, orn, v_world, w_world, collided)
        self._v_world_prev, self._w_world_prev = v_world, w_world

        reward = task.progress_reward * delta + task.frame_reward
        if collided:
            reward += task.collision_reward
        if task.proximity_reward:
            depth = (task.wall_margin - self._clearance(pos, obs["pose"][5])) / task.wall_margin
            reward += task.proximity_reward * min(max(depth, 0.0), 1.0)
        terminated = bool((task.terminate_on_collision and collided) or s["lap"] > task.laps)
        if task.stall_time > 0:
            slow = math.hypot(v_world[0], v_world[1]) < task.stall_speed
            s["still"] = s["still"] + 1 if slow else 0
            if s["still"] >= int(round(task.stall_time / DT)):
                reward += 0.0 if collided else task.stall_paid
                terminated = True
        truncated = bool(not terminated and self._time > task.time_limit - 1e-6)
        return obs, float(reward), terminated, truncated, info

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        self._show_car(True)
        try:
            return self._camera_image(width=256, height=256, chase=True)
        finally:
            self._show_car(False)

    def _show_car(self, visible: bool) -> None:
        for link, rgba in self._car_colors.items():
            color = list(rgba) if visible else [0.0, 0.0, 0.0, 0.0]
            p.changeVisualShape(self.car, link, rgbaColor=color, physicsClientId=self._cid)

    def close(self):
        if getattr(self, "_cid", None) is not None:
            try:
                p.disconnect(physicsClientId=self._cid)
            except p.error:
                pass
            self._cid = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ----------------------------------------------------------------- actuation
    def _apply_action(self, drive: float, steer: float, brake_when_idle: bool = True) -> None:
        c, v = self._cid, self.vehicle
        if self.actuator == "motor":
            target = v.motor_max_velocity * v.motor_velocity_multiplier if drive >= 0 else 0.0
            force = abs(drive) * v.motor_max_force
        else:
            target = (drive + 1.0) / 2.0 * v.speed_max_velocity * v.speed_velocity_multiplier
            force = v.speed_max_force
        if not brake_when_idle:
            force = 0.0
        for j in v.motor_joints:
            p.setJointMotorControl2(
                self.car, j, p.VELOCITY_CONTROL, targetVelocity=target, force=force,
                physicsClientId=c,
            )  # fmt: skip
        # positive command = right turn = negative hinge angle about +z (spec.STEER_SIGN)
        for j in v.steering_joints:
            p.setJointMotorControl2(
                self.car, j, p.POSITION_CONTROL,
                targetPosition=spec.STEER_SIGN * steer * self.max_steer,
                physicsClientId=c,
            )  # fmt: skip

    # ----------------------------------------------------------------- state
    def _kinematics(self):
        c = self._cid
        pos, orn = p.getBasePositionAndOrientation(self.car, physicsClientId=c)
        lin, ang = p.getBaseVelocity(self.car, physicsClientId=c)
        return np.array(pos), np.array(orn), np.array(lin), np.array(ang)

    def _wall_contact(self) -> bool:
        pts = p.getContactPoints(bodyA=self.car, bodyB=self.walls_id, physicsClientId=self._cid)
        return len(pts) > 0

    def _clearance(self, pos, yaw: float) -> float:
        """The footprint's distance to the nearest wall from the track's distance map (m;
        spec.FOOTPRINT_X/R, nearest pixel; <= 0 touching or off the map)."""
        t, best = self.track, math.inf
        h, w = t.obstacle_m.shape
        for fx in spec.FOOTPRINT_X:
            r, c = self._pixel(pos[0] + fx * math.cos(yaw), pos[1] + fx * math.sin(yaw))
            d = float(t.obstacle_m[r, c]) if 0 <= r < h and 0 <= c < w else 0.0
            best = min(best, d - spec.FOOTPRINT_R)
        return best

    def _pixel(self, x: float, y: float) -> tuple[int, int]:
        t = self.track
        if hasattr(t, "world_to_pixel"):
            r, cc = t.world_to_pixel(x, y)
            return int(r), int(cc)
        h = t.drivable.shape[0]
        return int(h - (y - t.origin[1]) / t.resolution), int((x - t.origin[0]) / t.resolution)

    def _progress_at(self, x: float, y: float, fallback: float) -> float:
        """Progress at the car's pixel; off the map or off the drivable area keeps ``fallback``
        (wall pixels carry no progress, and reading them would fake a finish-line wrap)."""
        r, cc = self._pixel(x, y)
        h, w = self.track.drivable.shape
        if not (0 <= r < h and 0 <= cc < w) or not self.track.drivable[r, cc]:
            return fallback
        return float(self.track.progress[r, cc])

    def _checkpoint(self, prog: float) -> int:
        return min(int(prog * self.n_checkpoints), self.n_checkpoints - 1)

    def _update_progress(self, pos: np.ndarray) -> float:
        """Race bookkeeping, the same rules as rl/envs/jax_env.py (racecar_gym's, done right):
        checkpoint = floor(progress · checkpoints); entering checkpoint 0 from the last one
        completes a lap, the reverse crossing takes it back; the reward's Δ(lap + progress) is
        signed and unwrapped at the line; wrong_way is set by stepping back a checkpoint or by
        a 0.95-EMA of Δ below −2e-5 per step, cleared by a checkpoint forward or an EMA above
        +2e-5. Returns Δ(lap + progress)."""
        s, n = self._state, self.n_checkpoints
        prog = self._progress_at(pos[0], pos[1], fallback=s["progress"])
        k, last = self._checkpoint(prog), s["checkpoint"]
        fwd_wrap = last == n - 1 and k == 0
        back_wrap = n > 1 and last == 0 and k == n - 1
        s["lap"] += int(fwd_wrap) - int(back_wrap)
        delta = float(spec.signed_progress_delta(s["total"], s["lap"] + prog))
        s["total"] += delta
        s["ema"] = 0.95 * s["ema"] + 0.05 * delta
        if k == last - 1 or back_wrap:
            s["wrong_way"] = True
        elif k == last + 1 or fwd_wrap:
            s["wrong_way"] = False
        s["wrong_way"] = (s["wrong_way"] or s["ema"] < -2e-5) and not s["ema"] > 2e-5
        s["progress"], s["checkpoint"] = prog, k
        return delta

    def _random_pose(self) -> tuple[float, float, float]:
        """A random drivable pixel with clearance, facing along the progress gradient."""
        t = self.track
        clear = np.asarray(t.obstacle)  # normalized, as racecar_gym's RandomPositioningStrategy
        rows, cols = np.nonzero(t.drivable & (clear > self.task.random_min_obstacle))
        i = int(self.np_random.integers(len(rows)))
        r, cc = int(rows[i]), int(cols[i])
        prog = np.asarray(t.progress)
        k = 3  # ±3 px central differences, wrapped at the finish line
        h, w = prog.shape
        wrap = lambda d: d - np.round(d)
        d_col = wrap(prog[r, min(cc + k, w - 1)] - prog[r, max(cc - k, 0)])
        d_row = wrap(prog[max(r - k, 0), cc] - prog[min(r + k, h - 1), cc])  # rows grow south
        yaw = math.atan2(d_row, d_col)
        x, y = t.pixel_to_world(r, cc)
        return float(x), float(y), yaw

    # ----------------------------------------------------------------- sensors
    def _refresh_sensors(self, step: int | None = None) -> None:
        """Refresh the lidar/camera on their periods (every sensor at reset, step=None)."""
        if self.use_lidar and (step is None or step % self.lidar_period == 0):
            self._lidar = self._scan()
        if self.use_camera and (step is None or step % self.camera_period == 0):
            self._rgb = self._camera_image(self.cam_w, self.cam_h)

    def _scan(self) -> np.ndarray:
        _set_car_group(self._cid, self.car)
        res = p.rayTestBatch(
            self._ray_from_list, self._ray_to_list,
            parentObjectUniqueId=self.car, parentLinkIndex=self.vehicle.lidar_link,
            collisionFilterMask=LIDAR_MASK, numThreads=1, physicsClientId=self._cid,
        )  # fmt: skip
        frac = np.fromiter((r[2] for r in res), np.float64, len(res))
        noise = self.np_random.uniform(1.0 - spec.LIDAR_NOISE, 1.0 + spec.LIDAR_NOISE, len(res))
        return spec.lidar_scan(frac * spec.LIDAR_RANGE, noise).astype(np.float32)

    def _camera_image(self, width: int, height: int, chase: bool = False) -> np.ndarray:
        c = self._cid
        state = p.getLinkState(
            self.car, self.vehicle.camera_link, computeForwardKinematics=True, physicsClientId=c
        )
        pos, orn = np.array(state[0]), state[1]
        rot = np.array(p.getMatrixFromQuaternion(orn)).reshape(3, 3)
        fwd, up = rot @ [1.0, 0.0, 0.0], rot @ [0.0, 0.0, 1.0]
        if chase:
            pos = pos - 0.8 * fwd + 0.3 * up
        view = p.computeViewMatrix(pos.tolist(), (pos + fwd).tolist(), up.tolist())
        proj = p.computeProjectionMatrixFOV(
            spec.CAMERA_FOV_DEG, width / height, spec.CAMERA_NEAR, spec.CAMERA_FAR
        )
        _, _, px, _, _ = p.getCameraImage(
            width, height, view, proj, renderer=p.ER_TINY_RENDERER, physicsClientId=c
        )
        return np.asarray(px, np.uint8).reshape(height, width, 4)[:, :, :3].copy()

    def _observe(self, pos, orn, v_world, w_world, collided: bool):
        c = self._cid
        rot = np.array(p.getMatrixFromQuaternion(orn.tolist())).reshape(3, 3)
        rpy = np.array(p.getEulerFromQuaternion(orn.tolist(), physicsClientId=c))
        pose = np.concatenate([pos, rpy])
        velocity = np.concatenate([rot.T @ v_world, rot.T @ w_world])  # body frame
        acc_world = (v_world - self._v_world_prev) / DT
        dw_world = (w_world - self._w_world_prev) / DT
        acceleration = np.concatenate([rot.T @ acc_world, rot.T @ dw_world])
        obs = {
            "pose": pose.astype(np.float32),
            "velocity": velocity.astype(np.float32),
            "acceleration": acceleration.astype(np.float32),
            "time": np.array([self._time], np.float32),
        }
        if self.use_lidar:
            obs["lidar"] = self._lidar.copy()
        if self.use_camera:
            obs["rgb_camera"] = self._rgb.copy()
        s = self._state
        info = {
            "pose": pose,
            "velocity": velocity,
            "acceleration": acceleration,
            "wall_collision": bool(collided),
            "progress": s["progress"],
            "lap": int(s["lap"]),
            "checkpoint": int(s["checkpoint"]),
            "wrong_way": bool(s["wrong_way"]),
            "time": self._time,
        }
        return obs, info
