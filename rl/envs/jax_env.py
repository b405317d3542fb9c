"""A pure-JAX racecar_gym: functional reset/step that jit and vmap over thousands of cars.

    env = JaxRacecar(TaskConfig(), Dynamics())          # static config (hashable)
    params = make_params(load_track("procedural:0"))    # track maps as device arrays
    obs, state = env.reset(key, params)
    obs, state, reward, terminated, truncated, info = env.step(state, action, params)

`action` is a (2,) array [motor, steering] (or a dict with those keys). Batch with
jax.vmap(env.step, in_axes=(0, 0, None)); `rollout` scans a batch with auto-reset.

Model (issue 4 §3c). The car is a kinematic bicycle about the rear axle (racecar_gym's
pose is the chassis origin, which sits on the rear axle), integrated once per 10 ms
step. Motor >= 0 is a force-limited drive toward a fixed wheel-speed target, so the
value sets the acceleration and even 0.3 ends near top speed; motor < 0 brakes to a
stop, never reverses; steering is a rate-limited wheel angle, +1 = 0.21 rad to the
right. All constants live in `Dynamics`, to be calibrated against the PyBullet car.
Sensing works on the track's metric distance field (`Track.obstacle_m`): lidar rays and
camera columns are sphere-traced with a fixed number of iterations; the scan is held
between 25 Hz refreshes. Walls: a footprint circle (3 along the body, radius = half the
car's width) closer to the wall than its radius is a collision; a move that does not dig
deeper is allowed, else the car keeps only the part of its motion along the wall (the
speed scaled alike) or, failing that, is rolled back and stopped.
Progress, checkpoints, laps and wrong-way come from the progress map; the reward is
100 * Δ(lap + progress), signed; the time limit truncates, never terminates.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from rl.envs import spec
from rl.envs.spec import TaskConfig
from rl.tracks import Track, load_track


@dataclass(frozen=True)
class Dynamics:
    """Car constants of the JAX model; calibrate against the PyBullet backend.

    Longitudinal: dv/dt = accel_max * m * (1 - (v / v_cap) ** drag_power) - rolling
    for m >= 0 (steady speeds: m=1 -> ~3.77 m/s, m=0.3 -> ~3.5 m/s), and
    dv/dt = -(brake_max * |m| + rolling) for m < 0; v is clipped at 0 (no reverse)."""

    dt: float = spec.PHYSICS_DT
    wheelbase: float = spec.WHEELBASE
    max_steer: float = spec.STEER_MAX_RAD
    steer_rate: float = 8.0  # rad/s, wheel-angle slew limit
    accel_max: float = 6.0  # m/s^2 at motor = 1, standing start
    v_cap: float = 3.85  # m/s, speed where the drive force vanishes
    drag_power: float = 8.0
    rolling: float = 0.96  # m/s^2, constant resistance while moving (=0.16 * accel_max)
    brake_max: float = 8.0  # m/s^2 at motor = -1
    actuator: str = "motor"  # "motor" | "speed" (target (a+1)/2 * 3.5 m/s)
    speed_gain: float = 4.0  # 1/s, speed actuator: dv/dt = gain * (target - v), clipped
    # footprint: circles along the body x axis (rear axle = 0), radius = half width
    footprint_x: tuple[float, ...] = (0.075, 0.2, 0.325)
    footprint_r: float = spec.CAR_WIDTH / 2


@dataclass(frozen=True)
class SensorConfig:
    lidar_iters: int = 24  # sphere-tracing iterations per ray
    lidar_rays: int = spec.LIDAR_RAYS
    lidar_noise: float = spec.LIDAR_NOISE
    lidar_every: int = int(round(1.0 / (spec.LIDAR_HZ * spec.PHYSICS_DT)))  # 4 steps
    camera: bool = False
    camera_width: int = 64
    camera_height: int = 64
    camera_iters: int = 24
    camera_fov_deg: float = spec.CAMERA_FOV_DEG


class TrackParams(NamedTuple):
    """The track as a pytree of device arrays (pass it as an argument, not a constant)."""

    obstacle_m: jax.Array  # (H, W) f32, metres to the wall
    progress: jax.Array  # (H, W) f32
    origin: jax.Array  # (2,) f32
    resolution: jax.Array  # () f32
    grid_pose: jax.Array  # (3,) x y yaw
    rand_pose: jax.Array  # (M, 3) x y yaw, spawn candidates for reset mode "random"


class EnvState(NamedTuple):
    pos: jax.Array  # (2,)
    yaw: jax.Array
    v: jax.Array  # forward speed, m/s
    steer: jax.Array  # wheel angle, CCW positive
    yaw_rate: jax.Array
    vel: jax.Array  # (6,) body frame
    acc: jax.Array  # (6,)
    time: jax.Array
    tick: jax.Array  # int32 physics steps since reset
    lidar_age: jax.Array  # int32 steps since the last scan (a scan is due at lidar_every)
    lap: jax.Array  # int32, starts at 1
    checkpoint: jax.Array  # int32
    progress: jax.Array
    total: jax.Array  # lap + progress, continuous across the line
    wrong_ema: jax.Array
    wrong_way: jax.Array  # bool
    collision: jax.Array  # bool, this step
    lidar: jax.Array  # (rays,) held scan
    key: jax.Array


# ------------------------------------------------------------------------------ track


def make_params(track: Track | str, max_random: int = 20000) -> TrackParams:
    """Device arrays of a track (numpy work done once here)."""
    if not isinstance(track, Track):
        track = load_track(track)
    ox, oy = track.origin
    res = track.resolution
    # grid start as racecar_gym's AutomaticGridStrategy, single agent
    pr, pc = track.world_to_pixel(0.0, 0.0)
    win = track.obstacle[pr:pr + 20, pc - 20:pc + 20]
    ir, ic = np.unravel_index(int(np.argmax(win)), win.shape)
    h = track.drivable.shape[0]
    cx = ox + (pc - 20 + ic) * res  # GridMap.to_meter: the pixel's corner
    cy = oy + (h - (pr + ir)) * res
    gx, gy = cx + 1.0 * (1 - 0) / 2, cy + 0.4  # agent 0 of 1
    grid_pose = np.array([gx, gy, 0.0], np.float32)
    if not track.drivable[track.world_to_pixel(gx, gy)]:
        grid_pose = np.array([*track.starts[0, :2], track.starts[0, 5]], np.float32)
    # random spawns: obstacle > margin, heading toward the progress bin 2.5-5 % ahead
    rows, cols = np.nonzero(track.drivable & (track.obstacle > 0.5))
    if len(rows) == 0:
        rows, cols = np.nonzero(track.drivable & (track.obstacle >= 0.5 * track.obstacle.max()))
    if len(rows) > max_random:
        sel = np.random.default_rng(0).choice(len(rows), max_random, replace=False)
        rows, cols = rows[np.sort(sel)], cols[np.sort(sel)]
    nb = 400
    dr, dc = np.nonzero(track.drivable)
    b = np.minimum((track.progress[dr, dc] * nb).astype(int), nb - 1)
    cnt = np.maximum(np.bincount(b, minlength=nb), 1)
    bx, by = track.pixel_to_world(dr, dc)
    mx = np.bincount(b, bx, minlength=nb) / cnt
    my = np.bincount(b, by, minlength=nb) / cnt
    px, py = track.pixel_to_world(rows, cols)
    tb = (np.minimum((track.progress[rows, cols] * nb).astype(int), nb - 1) + nb * 3 // 80) % nb
    yaw = np.arctan2(my[tb] - py, mx[tb] - px)
    rand_pose = np.stack([px, py, yaw], 1).astype(np.float32)
    return TrackParams(
        obstacle_m=jnp.asarray(track.obstacle_m, jnp.float32),
        progress=jnp.asarray(track.progress, jnp.float32),
        origin=jnp.asarray([ox, oy], jnp.float32),
        resolution=jnp.asarray(res, jnp.float32),
        grid_pose=jnp.asarray(grid_pose),
        rand_pose=jnp.asarray(rand_pose),
    )


def _lookup(grid, params: TrackParams, x, y):
    h, w = grid.shape
    r = jnp.floor(h - (y - params.origin[1]) / params.resolution).astype(jnp.int32)
    c = jnp.floor((x - params.origin[0]) / params.resolution).astype(jnp.int32)
    return grid[jnp.clip(r, 0, h - 1), jnp.clip(c, 0, w - 1)]


def sphere_trace(params: TrackParams, x, y, angles, iters: int, max_dist: float):
    """Distance along world-frame rays from (x, y) to the wall, by sphere tracing the
    metric distance field; an unconverged ray reports where it stopped plus the
    remaining clearance."""
    dx, dy = jnp.cos(angles), jnp.sin(angles)
    eps = 0.5 * params.resolution

    def body(_, t):
        d = _lookup(params.obstacle_m, params, x + t * dx, y + t * dy)
        return jnp.minimum(t + jnp.where(d < eps, 0.0, d), max_dist)

    t = jax.lax.fori_loop(0, iters, body, jnp.zeros_like(angles), unroll=False)
    d = _lookup(params.obstacle_m, params, x + t * dx, y + t * dy)
    return jnp.minimum(t + jnp.where(d < eps, 0.0, d), max_dist)


# ------------------------------------------------------------------------------ env


@dataclass(frozen=True)
class JaxRacecar:
    task: TaskConfig = TaskConfig()
    dynamics: Dynamics = Dynamics()
    sensors: SensorConfig = SensorConfig()

    # ---- sensors
    def _lidar(self, params, pos, yaw, key):
        s = self.sensors
        mx, my, _ = spec.LIDAR_MOUNT
        c, si = jnp.cos(yaw), jnp.sin(yaw)
        lx, ly = pos[0] + c * mx - si * my, pos[1] + si * mx + c * my
        angles = yaw + jnp.asarray(spec.lidar_angles()[:: spec.LIDAR_RAYS // s.lidar_rays],
                                   jnp.float32)
        d = sphere_trace(params, lx, ly, angles, s.lidar_iters, spec.LIDAR_RANGE)
        noise = jax.random.uniform(key, d.shape, jnp.float32, 1 - s.lidar_noise,
                                   1 + s.lidar_noise)
        return spec.lidar_scan(d, noise, xp=jnp)

    def _camera(self, params, pos, yaw):
        s = self.sensors
        w, h = s.camera_width, s.camera_height
        f = (w / 2) / np.tan(np.deg2rad(s.camera_fov_deg) / 2)
        off = np.arctan((w / 2 - (np.arange(w) + 0.5)) / f).astype(np.float32)  # left first
        mx, _, mz = spec.CAMERA_MOUNT
        cx, cy = pos[0] + jnp.cos(yaw) * mx, pos[1] + jnp.sin(yaw) * mx
        d = sphere_trace(params, cx, cy, yaw + off, s.camera_iters, 30.0)
        perp = jnp.maximum(d * np.cos(off), 0.05)
        zc = spec.START_Z + mz
        rows = (np.arange(h, dtype=np.float32) + 0.5)[:, None]
        top = h / 2 - f * (spec.WALL_HEIGHT - zc) / perp  # image row of the wall's top edge
        bot = h / 2 + f * zc / perp  # and of its foot
        wall = (rows >= top[None, :]) & (rows <= bot[None, :])
        shade = jnp.clip(1.0 - d / 20.0, 0.35, 1.0)[None, :, None]
        wall_rgb = jnp.asarray([200.0, 60.0, 50.0]) * shade
        sky = jnp.broadcast_to(jnp.asarray([135.0, 180.0, 230.0]), (h, w, 3))
        fl = 60.0 + 60.0 * (rows / h)
        floor = jnp.broadcast_to(jnp.concatenate([fl, fl, fl], 1)[:, None, :], (h, w, 3))
        img = jnp.where(rows[..., None] < h / 2, sky, floor)
        img = jnp.where(wall[..., None], jnp.broadcast_to(wall_rgb, (h, w, 3)), img)
        return img.astype(jnp.uint8)

    def _obs(self, state: EnvState, params) -> dict:
        pose = jnp.stack([state.pos[0], state.pos[1], jnp.float32(spec.START_Z),
                          jnp.float32(0), jnp.float32(0), state.yaw])
        obs = {"pose": pose, "velocity": state.vel, "acceleration": state.acc,
               "lidar": state.lidar, "time": state.time[None]}
        if self.sensors.camera or self.task.observe_camera:
            obs["rgb_camera"] = self._camera(params, state.pos, state.yaw)
        return obs

    def _info(self, state: EnvState) -> dict:
        return {"wall_collision": state.collision, "progress": state.progress,
                "lap": state.lap, "checkpoint": state.checkpoint,
                "wrong_way": state.wrong_way, "time": state.time}

    # ---- reset
    def _spawn(self, key, params: TrackParams) -> EnvState:
        """A fresh state at the reset pose; its lidar is not yet scanned (age = due)."""
        k_pose, k_next = jax.random.split(key)
        if self.task.reset_mode == "grid":
            pose = params.grid_pose
        else:
            i = jax.random.randint(k_pose, (), 0, params.rand_pose.shape[0])
            pose = params.rand_pose[i]
        pos, yaw = pose[:2], pose[2]
        prog = _lookup(params.progress, params, pos[0], pos[1])
        k = self.task.checkpoints
        z = jnp.float32(0)
        # a car spawned on the grid just behind the line starts lap 1 when it crosses it
        lap0 = jnp.where(prog > 0.9, 0, 1).astype(jnp.int32)
        return EnvState(
            pos=pos, yaw=yaw, v=z, steer=z, yaw_rate=z,
            vel=jnp.zeros(6, jnp.float32), acc=jnp.zeros(6, jnp.float32), time=z,
            tick=jnp.int32(0), lidar_age=jnp.int32(self.sensors.lidar_every), lap=lap0,
            checkpoint=jnp.minimum(jnp.floor(prog * k), k - 1).astype(jnp.int32),
            progress=prog, total=lap0 + prog, wrong_ema=z, wrong_way=jnp.bool_(False),
            collision=jnp.bool_(False),
            lidar=jnp.zeros(self.sensors.lidar_rays, jnp.float32), key=k_next,
        )

    def _scan(self, state: EnvState, params) -> EnvState:
        k_lidar, k_next = jax.random.split(state.key)
        return state._replace(lidar=self._lidar(params, state.pos, state.yaw, k_lidar),
                              lidar_age=jnp.int32(0), key=k_next)

    def _refresh(self, state: EnvState, params) -> EnvState:
        """Scan if the 25 Hz period is due, else hold (lax.cond: skipped work unbatched)."""
        due = state.lidar_age >= self.sensors.lidar_every
        return jax.lax.cond(due, lambda s: self._scan(s, params), lambda s: s, state)

    def reset(self, key, params: TrackParams):
        state = self._scan(self._spawn(key, params), params)
        return self._obs(state, params), state

    # ---- step
    def _contact(self, params, pos, yaw):
        """(smallest circle clearance to the wall, unit wall normal into the track there)."""
        dyn = self.dynamics
        xs = jnp.asarray(dyn.footprint_x, jnp.float32)
        px = pos[0] + jnp.cos(yaw) * xs
        py = pos[1] + jnp.sin(yaw) * xs
        d = _lookup(params.obstacle_m, params, px, py)
        i = jnp.argmin(d)
        h = 2.0 * params.resolution
        f = params.obstacle_m
        gx = _lookup(f, params, px[i] + h, py[i]) - _lookup(f, params, px[i] - h, py[i])
        gy = _lookup(f, params, px[i], py[i] + h) - _lookup(f, params, px[i], py[i] - h)
        g = jnp.stack([gx, gy])
        normal = g / jnp.maximum(jnp.linalg.norm(g), 1e-6)
        return d[i], normal

    def _advance(self, state: EnvState, action, params: TrackParams):
        """Physics and race bookkeeping of one step; the lidar is left as it was."""
        dyn, task = self.dynamics, self.task
        if isinstance(action, dict):
            a_motor = jnp.reshape(action.get("motor", action.get("speed")), ())
            a_steer = jnp.reshape(action["steering"], ())
        else:
            action = jnp.asarray(action, jnp.float32)
            a_motor, a_steer = action[0], action[1]
        a_motor = jnp.clip(a_motor, -1.0, 1.0)
        a_steer = jnp.clip(a_steer, -1.0, 1.0)
        dt = dyn.dt
        # steering: rate-limited toward the commanded wheel angle (positive = right)
        target = spec.STEER_SIGN * dyn.max_steer * a_steer
        steer = state.steer + jnp.clip(target - state.steer, -dyn.steer_rate * dt,
                                       dyn.steer_rate * dt)
        v = state.v
        if dyn.actuator == "speed":
            vt = (a_motor + 1.0) / 2.0 * spec.SPEED_MAX_VELOCITY
            acc = jnp.clip(dyn.speed_gain * (vt - v), -dyn.brake_max, dyn.accel_max)
        else:
            drive = dyn.accel_max * a_motor * (1.0 - (v / dyn.v_cap) ** dyn.drag_power)
            acc = jnp.where(a_motor >= 0, drive, dyn.brake_max * a_motor)
        acc = acc - dyn.rolling * (v > 0)
        v_new = jnp.maximum(v + acc * dt, 0.0)
        v_mid = 0.5 * (v + v_new)
        yaw_rate = v_mid * jnp.tan(steer) / dyn.wheelbase
        yaw_new = state.yaw + yaw_rate * dt
        yaw_mid = state.yaw + 0.5 * yaw_rate * dt
        pos_new = state.pos + v_mid * dt * jnp.stack([jnp.cos(yaw_mid), jnp.sin(yaw_mid)])
        yaw_new = jnp.arctan2(jnp.sin(yaw_new), jnp.cos(yaw_new))
        # walls: on contact keep only the motion along the wall (slide), else roll back
        # a move that touches but does not dig deeper is allowed (steering off a wall)
        r_car = dyn.footprint_r
        d_old, _ = self._contact(params, state.pos, state.yaw)
        d_new, normal = self._contact(params, pos_new, yaw_new)
        hit = d_new < r_car
        floor_d = jnp.minimum(d_old, r_car) - 1e-4
        blocked = hit & (d_new < floor_d)
        disp = pos_new - state.pos
        slide = disp - jnp.minimum(jnp.dot(disp, normal), 0.0) * normal
        pos_slide = state.pos + slide
        d_slide, _ = self._contact(params, pos_slide, yaw_new)
        keep = jnp.linalg.norm(slide) / jnp.maximum(jnp.linalg.norm(disp), 1e-9)
        ok_slide = blocked & (d_slide >= floor_d)
        stuck = blocked & ~ok_slide
        pos_new = jnp.where(ok_slide, pos_slide, jnp.where(stuck, state.pos, pos_new))
        yaw_new = jnp.where(stuck, state.yaw, yaw_new)
        v_new = jnp.where(ok_slide, v_new * keep, jnp.where(stuck, 0.0, v_new))
        yaw_rate = jnp.where(stuck, 0.0, yaw_rate)
        vel = jnp.stack([v_new, 0.0, 0.0, 0.0, 0.0, yaw_rate]).astype(jnp.float32)
        accel = (vel - state.vel) / dt
        # race bookkeeping
        prog = _lookup(params.progress, params, pos_new[0], pos_new[1])
        k = task.checkpoints
        cp = jnp.minimum(jnp.floor(prog * k), k - 1).astype(jnp.int32)
        fwd_wrap = (state.checkpoint == k - 1) & (cp == 0)
        back_wrap = (state.checkpoint == 0) & (cp == k - 1) & (k > 1)
        lap = state.lap + fwd_wrap.astype(jnp.int32) - back_wrap.astype(jnp.int32)
        total_raw = lap.astype(jnp.float32) + prog
        delta = spec.signed_progress_delta(state.total, total_raw)
        total = state.total + delta
        ema = 0.95 * state.wrong_ema + 0.05 * delta
        went_back = (cp == state.checkpoint - 1) | back_wrap
        went_fwd = (cp == state.checkpoint + 1) | fwd_wrap
        wrong = jnp.where(went_back, True, jnp.where(went_fwd, False, state.wrong_way))
        wrong = wrong | (ema < -2e-5)
        wrong = wrong & ~(ema > 2e-5)
        tick = state.tick + 1
        time = tick.astype(jnp.float32) * dt  # no float32 drift over long episodes
        new = state._replace(pos=pos_new, yaw=yaw_new, v=v_new, steer=steer,
                             yaw_rate=yaw_rate, vel=vel, acc=accel, time=time, tick=tick,
                             lidar_age=state.lidar_age + 1, lap=lap, checkpoint=cp,
                             progress=prog, total=total, wrong_ema=ema, wrong_way=wrong,
                             collision=hit)
        reward = (task.progress_reward * delta + task.collision_reward * hit
                  + task.frame_reward).astype(jnp.float32)
        terminated = (lap > task.laps) | (task.terminate_on_collision & hit)
        truncated = (tick >= int(round(task.time_limit / dt))) & ~terminated
        return new, reward, terminated, truncated

    def step(self, state: EnvState, action, params: TrackParams):
        """One env: obs (after the action), state, reward, terminated, truncated, info."""
        new, reward, terminated, truncated = self._advance(state, action, params)
        new = self._refresh(new, params)
        return self._obs(new, params), new, reward, terminated, truncated, self._info(new)

    # ---- batched
    def batch_reset(self, key, params, n: int):
        return jax.vmap(self.reset, in_axes=(0, None))(jax.random.split(key, n), params)

    def batch_step(self, states: EnvState, actions, params, autoreset: bool = True,
                   refresh_capacity: float = 0.4):
        """N envs at once (states/actions with a leading N axis; actions (N, 2)).

        With autoreset, an env whose episode ended comes back freshly reset (obs and
        state; reward/flags/info are those of the ending step). Lidar work is compacted:
        only envs whose 25 Hz scan is due (about a quarter, plus resets) are traced, up to
        ceil(refresh_capacity * N) per step; any overflow scans on the next step."""
        n = actions.shape[0]
        new, r, term, trunc = jax.vmap(self._advance, in_axes=(0, 0, None))(
            states, actions, params)
        info = jax.vmap(self._info)(new)
        if autoreset:
            done = term | trunc
            keys = jax.vmap(lambda k: jax.random.split(k))(new.key)
            fresh = jax.vmap(self._spawn, in_axes=(0, None))(keys[:, 0], params)
            new = new._replace(key=keys[:, 1])
            new = jax.tree.map(lambda a, b: jnp.where(
                jnp.reshape(done, done.shape + (1,) * (a.ndim - 1)), a, b), fresh, new)
        due = new.lidar_age >= self.sensors.lidar_every
        cap = min(n, int(np.ceil(refresh_capacity * n)) + 1)
        idx = jnp.nonzero(due, size=cap, fill_value=n)[0]
        sub = jax.tree.map(lambda a: a[jnp.clip(idx, 0, n - 1)], new)
        scanned = jax.vmap(self._scan, in_axes=(0, None))(sub, params)
        new = jax.tree.map(lambda a, b: a.at[idx].set(b, mode="drop"), new, scanned)
        obs = jax.vmap(self._obs, in_axes=(0, None))(new, params)
        return obs, new, r, term, trunc, info


def batch_reset(env: JaxRacecar, key, params, n: int):
    return env.batch_reset(key, params, n)


# ------------------------------------------------------------------------------ gymnasium


def observation_space(env: JaxRacecar) -> gym.spaces.Dict:
    f32 = np.float32
    pb = np.array(list(spec.POSE_BOUNDS) + [np.pi] * 3, f32)
    vb = np.array([spec.MAX_LINEAR_VELOCITY] * 3 + [spec.MAX_ANGULAR_VELOCITY] * 3, f32)
    spaces = {
        "pose": gym.spaces.Box(-pb, pb, (6,), f32),
        "velocity": gym.spaces.Box(-vb, vb, (6,), f32),
        "acceleration": gym.spaces.Box(-np.inf, np.inf, (6,), f32),
        "lidar": gym.spaces.Box(spec.LIDAR_MIN_RANGE, spec.LIDAR_MAX,
                                (env.sensors.lidar_rays,), f32),
        "time": gym.spaces.Box(0.0, np.inf, (1,), f32),
    }
    if env.sensors.camera or env.task.observe_camera:
        s = env.sensors
        spaces["rgb_camera"] = gym.spaces.Box(0, 255, (s.camera_height, s.camera_width, 3),
                                              np.uint8)
    return gym.spaces.Dict(spaces)


def action_space() -> gym.spaces.Dict:
    return gym.spaces.Dict({
        "motor": gym.spaces.Box(-1.0, 1.0, (1,), np.float32),
        "steering": gym.spaces.Box(-1.0, 1.0, (1,), np.float32),
    })


def _np_obs(obs) -> dict:
    return {k: np.asarray(v) for k, v in obs.items()}


def _np_info(info, state: EnvState) -> dict:
    out = {k: np.asarray(v).item() for k, v in info.items()}
    out["pose"] = np.array([*np.asarray(state.pos), spec.START_Z, 0.0, 0.0,
                            float(state.yaw)], np.float32)
    out["velocity"] = np.asarray(state.vel)
    out["acceleration"] = np.asarray(state.acc)
    return out


class JaxRacecarEnv(gym.Env):
    """One JAX car behind the gymnasium API (racecar_gym's Dict spaces)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 100}

    def __init__(self, track: str | Track = "procedural:0", task: TaskConfig | None = None,
                 dynamics: Dynamics | None = None, sensors: SensorConfig | None = None,
                 render_mode: str | None = None, params: TrackParams | None = None):
        self.sim = JaxRacecar(task or TaskConfig(), dynamics or Dynamics(),
                              sensors or SensorConfig())
        self.params = params if params is not None else make_params(track)
        self.observation_space = observation_space(self.sim)
        self.action_space = action_space()
        self.render_mode = render_mode
        self._reset = jax.jit(self.sim.reset)
        self._step = jax.jit(self.sim.step)
        self._key = jax.random.PRNGKey(0)
        self._state = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._key = jax.random.PRNGKey(seed)
        self._key, k = jax.random.split(self._key)
        obs, self._state = self._reset(k, self.params)
        info = _np_info(self.sim._info(self._state), self._state)
        return _np_obs(obs), info

    def step(self, action: dict[str, Any]):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        a = jnp.asarray([np.asarray(action["motor"], np.float32).reshape(()),
                         np.asarray(action["steering"], np.float32).reshape(())])
        obs, self._state, r, term, trunc, info = self._step(self._state, a, self.params)
        return (_np_obs(obs), float(r), bool(term), bool(trunc),
                _np_info(info, self._state))

    def render(self):
        if self.render_mode == "rgb_array" and self._state is not None:
            sim = replace(self.sim, sensors=replace(self.sim.sensors, camera=True))
            return np.asarray(sim._camera(self.params, self._state.pos, self._state.yaw))
        return None


class JaxVectorEnv:
    """N JAX cars stepped as one jitted, vmapped call, auto-resetting finished episodes
    (the returned obs of a finished car is its next episode's first)."""

    def __init__(self, num_envs: int, track: str | Track = "procedural:0",
                 task: TaskConfig | None = None, dynamics: Dynamics | None = None,
                 sensors: SensorConfig | None = None, params: TrackParams | None = None):
        self.num_envs = num_envs
        self.sim = JaxRacecar(task or TaskConfig(), dynamics or Dynamics(),
                              sensors or SensorConfig())
        self.params = params if params is not None else make_params(track)
        self.single_observation_space = observation_space(self.sim)
        self.single_action_space = action_space()
        self._reset = jax.jit(lambda k, p: batch_reset(self.sim, k, p, num_envs))
        self._step = jax.jit(self.sim.batch_step)
        self.state = None

    def reset(self, seed: int = 0):
        obs, self.state = self._reset(jax.random.PRNGKey(seed), self.params)
        return obs, self.sim._info(self.state)

    def step(self, actions):
        """actions: (N, 2) [motor, steering] or a dict of (N,) / (N, 1) arrays."""
        if isinstance(actions, dict):
            actions = jnp.stack([jnp.reshape(actions["motor"], (-1,)),
                                 jnp.reshape(actions["steering"], (-1,))], 1)
        obs, self.state, r, term, trunc, info = self._step(self.state, actions, self.params)
        return obs, r, term, trunc, info


# ------------------------------------------------------------------------------ scripted driver


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
