"""A pure-JAX racecar_gym: functional reset/step that jit and vmap over thousands of cars.

    env = JaxRacecar(TaskConfig(), Dynamics())          # static config (hashable)
    params = make_params(load_track("procedural:0"))    # track maps as device arrays
    obs, state = env.reset(key, params)
    obs, state, reward, terminated, truncated, info = env.step(state, action, params)

`action` is a (2,) array [motor, steering] (or a dict with those keys). Batch with
jax.vmap(env.step, in_axes=(0, 0, None)); rl/envs/functional.py wraps it into the
auto-resetting, action-repeating step PPO trains with.

Model (issue 4 §3c). A kinematic bicycle about the rear axle, integrated once per 10 ms
step; the pose is the chassis centre of mass 0.2 m ahead of it (PyBullet's base frame,
racecar_gym's `pose`), and the lidar/camera/footprint are placed from the pose as on the
PyBullet car. Motor >= 0 drives toward a fixed wheel speed with traction that saturates in
slip; motor < 0 brakes, never reverses; steering is a lagged wheel angle, +1 = 0.21 rad to
the right, with tyre saturation at high lateral acceleration. The constants in `Dynamics`
are fitted to the PyBullet car (rl.envs.calibration; `python -m benchmarks.envs --calibrate`).
Sensing works on the track's metric distance field (`Track.obstacle_m`, a float16 copy for
the lidar): lidar rays and camera columns are sphere-traced with a fixed number of relaxed
iterations and a final bisection; the scan is held between 25 Hz refreshes. Walls
(`JaxRacecar._wall`): the footprint is 3 circles along the body (radius = half the car's
width) against the bilinear distance field; a circle closer to the wall than its radius is a
contact, and so is one within `wall_skin` of it (`collision` holds while the car rests or
slides on a wall). On contact the speed into the wall is removed (v -> v cos θ, θ = the
heading's angle into the wall), on the impact step less Coulomb friction
(v -> v (cos θ - μ sin θ), μ = `wall_friction`); a car still driving into the wall pivots
about its contact circle at `wall_pivot_rate` (tapering as it comes parallel) toward the
wall's tangent its steering asks for, else the nearer one, so a nose-in car turns along the
wall and drives on instead of freezing; finally the footprint is pushed out along the wall
normal, so it never digs in. Fitted to the PyBullet car with
`rl.envs.calibration.wall_contact_probe` (a straight wall on an open floor, either backend).
Domain randomization (`JaxRacecar.randomize`, rl.config.RandomizeConfig, off by default):
each reset draws a `CarDraw` (mass, grip, motor and steering gains, steering offset, yaw-rate
wobble, action delay, observation lag, lidar noise and dropout) that `car_step`, `_advance`,
`_lidar` and `_observe` read for the episode; a quantity whose range is zero is None in the
draw and its code is left out of the compiled step. `Dynamics.min_speed` is a speed floor.
Progress, checkpoints, laps and wrong-way come from the progress map; the reward is
100 * Δ(lap + progress), signed; the time limit truncates, never terminates. Scripted
drivers for this backend live in rl.drivers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from rl.config import RandomizeConfig
from rl.envs import spec
from rl.envs.spec import TaskConfig
from rl.tracks import Track, load_track, slot_tracks, tile_tracks, track_names


@dataclass(frozen=True)
class Dynamics:
    """Car constants of the JAX model, fitted to the PyBullet car (rl.envs.calibration;
    ``python -m benchmarks.envs --fit``, figures side by side: ``--calibrate``).

    Pose = the chassis centre of mass, `com_offset` ahead of the rear axle (PyBullet's base);
    the bicycle model runs about the rear axle. Longitudinal, v = forward speed, u = the
    wheels' target speed (motor: 5 m/s; speed actuator: 1.25 x the commanded m/s):

        motor m > 0:  dv/dt = min(accel_max * m ** motor_gamma * (1 - force_fade * v / u),
                                  slip_gain * (u - v) / u)
        speed:        dv/dt = clip(slip_gain * (u - v) / u, -brake_max, accel_max)
        brake m < 0:  dv/dt = -min(brake_max * |m| ** brake_gamma, brake_slip * v)
        always        - drag * v - rolling (while moving); v >= 0, no reverse.

    The wheel traction saturates with relative slip: that is why motor 0.3 ends at 3.36 m/s
    rather than near 3.8, and why the speed actuator overshoots its target (u = 1.25 x).
    Steering: the wheel angle lags its command (first order, `steer_tau`, and `steer_rate`).
    Two models turn the car (`model`; build either with :func:`car`). "kinematic" (the
    default): yaw rate = w / (1 + understeer * (v w) ** 2), w = v tan(delta) / L (about none
    at steering 0.4, 14 % less than kinematic at full lock and 2.2 m/s). "tyre" (TYRE_CAR):
    the front tyre (car_step, `tyre_curve`) turns the car: a yaw-rate state, the tyre's
    lateral force a saturating (Pacejka) function of the front axle's lateral slip, and the
    part of that force along the body slows the car (cornering drag, `cornering_drag`) and,
    with the speed actuator, takes traction from the drive (`traction_lateral`). Below
    ~1 m/s^2 of lateral acceleration the car is the kinematic bicycle (yaw rate
    v tan(delta) / L); at full lock and ~3.5 m/s it turns no harder than at 60 % lock and
    scrubs ~0.3 m/s, as PyBullet's car does (calibration.SCRUB_*: full lock at speed action
    1, 1.5 s: PyBullet yaws -1.49 rad and ends at 3.13 m/s; this model -1.46 rad, 3.30 m/s;
    the kinematic model -1.76 rad, 3.60 m/s)."""

    dt: float = spec.PHYSICS_DT
    wheelbase: float = spec.WHEELBASE
    com_offset: float = spec.COM_AHEAD_OF_REAR_AXLE  # pose ahead of the rear axle, m
    max_steer: float = spec.STEER_MAX_RAD
    # "kinematic": the bicycle model, its yaw rate saturating by `understeer` (the default,
    # every result before 2026-12-06); "tyre": the front-tyre model below (TYRE_CAR, car())
    model: str = "kinematic"
    steer_tau: float = 0.114  # s, first-order lag of the wheel angle
    steer_rate: float = 4.0  # rad/s, wheel-angle slew limit
    understeer: float = 0.0131  # s^4/m^2, per (lateral acceleration) ** 2 (kinematic model)
    # the front tyre (model "tyre"; car_step, tyre_curve): the front axle's peak lateral
    # force per unit car mass (m/s^2), its slope at zero lateral slip (m/s^2 per unit slip =
    # tan of the slip angle), Pacejka's shape factor C (1: saturates; > 1: past its peak the
    # force falls toward sin(C pi / 2) of it), the speed below which slip is measured against
    # it (no singular slip at rest)
    tyre_peak: float = 2.19
    tyre_stiffness: float = 173.0
    tyre_shape: float = 1.0
    tyre_slip_v: float = 0.3  # m/s
    yaw_inertia: float = 0.052  # m^2: yaw moment of inertia about the rear axle / mass
    cornering_drag: float = 0.79  # drag beyond the front tyre's own: this x F x slip, m/s^2
    traction_lateral: float = 2.6  # weight of the front's side slip in the drive's (car_step)
    accel_max: float = 4.07  # m/s^2 at motor = 1 (traction permitting)
    motor_gamma: float = 0.167  # drive ~ m ** gamma (motor 0.3 still gives 82 %)
    slip_gain: float = 17.7  # m/s^2 per unit relative slip
    drag: float = 0.88  # 1/s, linear resistance
    rolling: float = 0.0  # m/s^2, constant resistance while moving
    brake_max: float = 1.62  # m/s^2 at motor = -1
    brake_gamma: float = 0.349
    force_fade: float = 0.204  # the drive force falls by this fraction of v / motor_target
    brake_slip: float = 4.37  # 1/s: braking decel is at most brake_slip * v (locked wheels)
    # grip lost while braking (motor < 0): (loss + slope * |motor|) * min(1, v / loss_v) of
    # the yaw rate (kinematic model) or of the front tyre's peak (tyre model). PyBullet's
    # braked wheels slide and its car turns far less than the steering says — a light brake
    # most of all: from 3.7 m/s at full lock and motor -0.1 it yaws 0.5-0.85 rad in 1.5 s
    # where a kinematic car yaws 1.28, and PyBullet itself varies that much from run to run
    # (motor -1: -0.69 ... -1.02 rad over 4 runs). Kinematic model: fitted to 20 brake-and-turn
    # runs (entry 2.3 and 3.7 m/s, motor -1 ... -0.03, steering 1 and -0.5; calibrate_*'s
    # brake_turn_yaw_*): mean squared yaw error 0.063 -> 0.008 rad^2. Tyre model (TYRE_CAR):
    # chosen on a grid against those runs' means (rms yaw error 0.10 rad).
    brake_yaw_loss: float = 0.8
    brake_yaw_loss_slope: float = -0.55
    brake_yaw_loss_v: float = 3.0  # m/s
    # grip lost while the speed actuator brakes hard (tyre model only): wheels held well below
    # the car's speed slide, and a sliding tyre holds less sideways. With the wheels' target
    # speed u under the car's speed v, their relative slip r = (v - u) / v; the front tyre's
    # peak falls by loss * clip((r - slip0) / (1 - slip0), 0, 1) * min(1, v / loss_v).
    # PyBullet, from ~2.95 m/s at full lock, yaws at 0.40 rad/s 0.2 s after the wheels are
    # asked for ~0 m/s, 0.73 at a target of 0.7 m/s and 1.12 at 1.2 m/s, where the tyre car
    # without it yaws at 1.07 in all three (calibration.LOCK_*). 0: today's cars.
    speed_brake_loss: float = 0.0
    speed_brake_slip0: float = 0.4
    speed_brake_loss_v: float = 1.0  # m/s
    motor_target: float = spec.MOTOR_TARGET_WHEEL_SPEED * spec.WHEEL_RADIUS  # 5 m/s
    speed_scale: float = spec.SPEED_VELOCITY_MULTIPLIER * spec.WHEEL_RADIUS  # 1.25
    actuator: str = "motor"  # "motor" | "speed" (target (a+1)/2 * 3.5 m/s)
    # footprint: circles along the body x axis (pose = 0), radius = half the width; they
    # cover the 0.5 m chassis from 0.25 m behind to 0.25 m ahead of the pose
    footprint_x: tuple[float, ...] = spec.FOOTPRINT_X
    footprint_r: float = spec.FOOTPRINT_R
    # wall contact (`JaxRacecar._wall`; fitted with calibration.wall_contact_probe)
    wall_friction: float = 0.45  # Coulomb, at impact: speed along the wall lost per unit into it
    wall_pivot_rate: float = 1.2  # rad/s, yaw rate of a car pushing into a wall
    wall_pivot_taper: float = 0.26  # ... tapering below this sin(angle to the wall)
    wall_steer_pick: float = 0.3  # |steering| above which it picks the pivot's direction
    wall_iters: int = 2  # push-out passes
    wall_skin: float = 0.01  # m: a footprint this close to the wall still counts as contact
    # speed floor, m/s (0 = off): neither the brake nor the resistance slows a car below it
    # once it is faster (v_new >= min(v, min_speed)); walls still can, and a slower car is
    # not pushed up (rl.config.EnvConfig.min_speed)
    min_speed: float = 0.0


# The front-tyre car (issue 12 goal 2): its own steering lag and braked-grip loss, the tyre_*
# constants least-squares fitted to 41 PyBullet open-floor runs (benchmarks.envs --fit).
TYRE_CAR = {"model": "tyre", "steer_tau": 0.09, "brake_yaw_loss": 0.85,
            "brake_yaw_loss_slope": -0.75, "brake_yaw_loss_v": 1.28}
# TYRE_CAR whose speed actuator's hard braking costs the front tyre grip (speed_brake_*; issue
# 12 goal 2, 2026-12-07). Chosen on a grid against PyBullet's 12 "lock_*" fit protocols (2 s
# from ~2.9 m/s, targets 0-1.2 m/s, steering 1, 0.6, -1): `python -m benchmarks.envs --grid
# 'speed_brake_loss=0,0.5,...;speed_brake_slip0=...;speed_brake_loss_v=...' --protocols lock
# --car tyre_lock`, rms residual 0.097 (the tyre car) -> 0.089 (the grid's best 0.0888; the
# least-squares fit stalls on the slip threshold's kink). Its own name, so that every "tyre"
# result stays reproducible.
TYRE_LOCK_CAR = {**TYRE_CAR, "speed_brake_loss": 0.7, "speed_brake_slip0": 0.5,
                 "speed_brake_loss_v": 3.0}
CARS = {"kinematic": {}, "tyre": TYRE_CAR, "tyre_lock": TYRE_LOCK_CAR}
CAR_MODELS = tuple(CARS)


def car(model: str = "kinematic", **kw) -> Dynamics:
    """The JAX car named ``model`` (CARS: "kinematic"; "tyre": TYRE_CAR's constants;
    "tyre_lock": TYRE_LOCK_CAR's), ``kw`` replacing any field (actuator, min_speed, ...)."""
    if model not in CARS:
        raise ValueError(f"unknown car model {model!r} ({' | '.join(CARS)})")
    return Dynamics(**{**CARS[model], **kw})


class CarDraw(NamedTuple):
    """One episode's randomized car (drawn by `JaxRacecar._spawn` from
    `JaxRacecar.randomize`, a rl.config.RandomizeConfig; held in `EnvState.draw`). A field
    is None where its range is zero: that quantity is today's car, and no code reads it."""

    mass: Any = None  # factor: accel_max / mass, brake_max / mass (car_step)
    grip: Any = None  # factor: slip_gain, brake_slip, tyre_peak x grip; brake grip loss / grip
    motor_gain: Any = None  # factor: the motor's force and wheel target speed (car_step)
    steer_gain: Any = None  # factor on the wheel-angle target per unit steering (car_step)
    steer_offset: Any = None  # rad added to the wheel-angle target (car_step)
    yaw_rate_noise: Any = None  # k: observed yaw-rate noise std = k v^2 (_obs)
    action_delay: Any = None  # int32 physics steps: the action applied is d steps old (_advance)
    obs_lag: Any = None  # bool: the policy sees the previous step's observation (_observe)
    lidar_noise: Any = None  # the lidar's multiplicative noise amplitude (_lidar)
    lidar_dropout: Any = None  # probability that a ray reads max range, per ray and scan (_lidar)


NO_DRAW = CarDraw()


def tyre_curve(dyn: Dynamics, slip, peak, xp=jnp):
    """The front axle's lateral force per unit car mass (m/s^2) at lateral slip ``slip``
    (tan of the slip angle): Pacejka's magic formula F = peak sin(C atan(B slip)),
    C = tyre_shape, B C peak = tyre_stiffness (the slope at zero slip). C = 1 saturates
    toward the peak; C > 1 peaks at B slip = tan(pi / 2C) and falls past it toward
    peak sin(C pi / 2) (a sliding tyre)."""
    c = dyn.tyre_shape
    return peak * xp.sin(c * xp.arctan(dyn.tyre_stiffness / (c * peak) * slip))


def car_step(dyn: Dynamics, v, steer, yaw_rate, a_motor, a_steer, speed_mode=None, xp=jnp,
             draw: CarDraw | None = None):
    """One physics step of the speed, wheel angle and yaw rate (numpy or jax arrays):
    returns (v_new, steer_new, yaw_rate_new); integrate the yaw with yaw_rate_new.
    speed_mode: None -> dyn.actuator, else a bool (array) selecting the speed actuator.
    draw: an episode's randomized car (CarDraw; None or a None field = the nominal car)."""
    g = NO_DRAW if draw is None else draw
    dt = dyn.dt
    target = spec.STEER_SIGN * dyn.max_steer * a_steer
    if g.steer_gain is not None:
        target = target * g.steer_gain
    if g.steer_offset is not None:
        target = target + g.steer_offset
    ds = (target - steer) * (1.0 - np.exp(-dt / dyn.steer_tau))
    steer_new = steer + xp.clip(ds, -dyn.steer_rate * dt, dyn.steer_rate * dt)
    resist = dyn.drag * v + dyn.rolling * (v > 0)
    # the randomized car's constants (python floats, exactly today's, where not randomized)
    accel_max, brake_max = dyn.accel_max, dyn.brake_max
    slip_gain, brake_slip, peak = dyn.slip_gain, dyn.brake_slip, dyn.tyre_peak
    u_motor, speed_scale = dyn.motor_target, dyn.speed_scale
    if g.motor_gain is not None:
        accel_max = accel_max * g.motor_gain
        u_motor, speed_scale = u_motor * g.motor_gain, speed_scale * g.motor_gain
    if g.mass is not None:
        accel_max, brake_max = accel_max / g.mass, brake_max / g.mass
    if g.grip is not None:
        slip_gain, brake_slip, peak = slip_gain * g.grip, brake_slip * g.grip, peak * g.grip

    speed_actuator = dyn.actuator == "speed" if speed_mode is None else speed_mode
    braking = (a_motor < 0) & ~xp.asarray(speed_actuator)
    # the speed actuator's wheel target speed, m/s
    u_speed = xp.maximum((a_motor + 1.0) / 2.0 * spec.SPEED_MAX_VELOCITY * speed_scale, 0.05)
    # braking wheels lose lateral grip: the car ploughs on (the motor actuator's brake only)
    loss = dyn.brake_yaw_loss + dyn.brake_yaw_loss_slope * xp.abs(a_motor)
    if g.grip is not None:
        loss = loss / g.grip
    loss = xp.clip(loss, 0.0, 1.0)
    tyre = dyn.model == "tyre"
    if tyre:
        # the front tyre. The rear axle rolls without side slip (velocity v along the body);
        # the front axle moves at (v, L w) in the body frame, and its wheel, turned by
        # steer_new, slides across its own direction at v_lat: lateral slip -v_lat / v_par
        # (tan of the slip angle; the sliding speed / tyre_slip_v at walking pace, so a car
        # at rest has none). The tyre's force F (per unit mass, perpendicular to the wheel)
        # turns the car about the rear axle and its component along the body slows it.
        ell, b = dyn.wheelbase, dyn.com_offset
        cd, sd = xp.cos(steer_new), xp.sin(steer_new)
        w = yaw_rate
        v_par = xp.maximum(v * cd + ell * w * sd, dyn.tyre_slip_v)
        v_lat = ell * w * cd - v * sd
        loss = loss * xp.minimum(v / dyn.brake_yaw_loss_v, 1.0)
        # the speed actuator holding its wheels far below the car's speed: they slide too
        r = (v - u_speed) / xp.maximum(v, 1e-3)
        lock = (dyn.speed_brake_loss
                * xp.clip((r - dyn.speed_brake_slip0) / (1.0 - dyn.speed_brake_slip0), 0.0, 1.0)
                * xp.minimum(v / dyn.speed_brake_loss_v, 1.0))
        if g.grip is not None:
            lock = lock / g.grip
        lock = xp.clip(lock, 0.0, 1.0)  # 0 unless the target is below the speed (r > 0)
        kept = xp.where(braking, 1.0 - loss, xp.where(speed_actuator, 1.0 - lock, 1.0))
        peak = xp.maximum(peak * kept, 1e-6)
        slip = -v_lat / v_par
        force = tyre_curve(dyn, slip, peak, xp)

    def traction(u):
        """The wheels' slip-limited drive shares the friction with the front's side slip:
        x |u - v| / |(u - v, traction_lateral * v_lat)| (a wheel held at its target speed,
        the speed actuator's, loses drive in a sliding turn; a force-limited motor spins
        its wheels up and keeps it). The kinematic car has no side slip: 1."""
        c = dyn.traction_lateral
        if not tyre or (isinstance(c, int | float) and c == 0):
            return 1.0
        sx = xp.abs(u - v)
        return sx / xp.sqrt(sx * sx + (c * v_lat) ** 2 + 1e-12)

    def motor():
        u = u_motor
        held = slip_gain * (u - v) / u * traction(u)  # slip-limited
        push = accel_max * xp.maximum(a_motor, 0.0) ** dyn.motor_gamma  # force-limited
        drive = xp.minimum(push * (1.0 - dyn.force_fade * v / u), held)
        brake = -xp.minimum(brake_max * xp.abs(a_motor) ** dyn.brake_gamma,
                            brake_slip * v)
        return xp.where(a_motor > 0, drive, xp.where(a_motor < 0, brake, 0.0))

    def speed():
        u = u_speed
        return xp.clip(slip_gain * (u - v) / u * traction(u), -brake_max, accel_max)

    if speed_mode is None:
        acc = speed() if dyn.actuator == "speed" else motor()
    else:
        acc = xp.where(speed_mode, speed(), motor())
    if not tyre:
        # the kinematic bicycle: yaw rate v tan(delta) / L at the step's midpoint speed,
        # saturating as w / (1 + understeer (v w)^2) (the lateral limit scales with grip^2)
        v_new = xp.maximum(v + (acc - resist) * dt, 0.0)
        if dyn.min_speed > 0.0:  # the speed floor: no slower than min(v, min_speed)
            v_new = xp.maximum(v_new, xp.minimum(v, dyn.min_speed))
        understeer = dyn.understeer if g.grip is None else dyn.understeer / (g.grip * g.grip)
        v_mid = 0.5 * (v + v_new)
        w = v_mid * xp.tan(steer_new) / dyn.wheelbase
        w = w / (1.0 + understeer * (v_mid * w) ** 2)
        loss = loss * xp.minimum(v_mid / dyn.brake_yaw_loss_v, 1.0)
        return v_new, steer_new, xp.where(braking, w * (1.0 - loss), w)
    # rigid body, the rear axle's side force a constraint (Newton along the body; the yaw
    # moment about the rear axle, yaw_inertia = that moment of inertia / mass):
    #   dv/dt = drive - resistance - F sin(delta) + b w^2
    #   dw/dt = (L F cos(delta) - b v w) / yaw_inertia
    # The yaw rate is stiff at low speed (there the tyre holds the car to the kinematic yaw
    # rate v tan(delta) / L): it takes a backward-Euler step with the tyre's secant
    # stiffness F / slip held (slip is linear in w) — no overshoot past the equilibrium on
    # a tyre curve whose secant falls with slip, as Pacejka's does.
    corner = b * w * w - force * sd - dyn.cornering_drag * force * slip
    v_new = xp.maximum(v + (acc - resist + corner) * dt, 0.0)
    if dyn.min_speed > 0.0:  # the speed floor: no slower than min(v, min_speed)
        v_new = xp.maximum(v_new, xp.minimum(v, dyn.min_speed))
    small = xp.abs(slip) < 1e-6
    secant = xp.where(small, dyn.tyre_stiffness, force / xp.where(small, 1.0, slip))
    k = dt * ell * cd * secant / (v_par * dyn.yaw_inertia)
    w_new = (w + k * v * sd) / (1.0 + k * ell * cd + dt * b * v / dyn.yaw_inertia)
    return v_new, steer_new, w_new


@dataclass(frozen=True)
class SensorConfig:
    lidar_iters: int = 24  # sphere-tracing iterations per ray
    lidar_min_step: float = 0.03  # relaxed step: at least this fraction of the distance so far
    lidar_refine: int = 2  # bisection steps on a hit (overshoot <= min_step / 4 of the range)
    lidar_rays: int = spec.LIDAR_RAYS
    lidar_noise: float = spec.LIDAR_NOISE
    # probability that a ray reads max range (no return), per ray and scan (0 = none; the
    # robustness evaluation's dropped rays, rl.evaluate --lidar-drop)
    lidar_dropout: float = 0.0
    lidar_every: int = spec.LIDAR_PERIOD  # 4 physics steps
    # std of the observed yaw rate's noise per (m/s)^2 (0 = exact; PyBullet's car: ~0.016)
    yaw_rate_noise: float = 0.0
    camera: bool = False
    # the observation also holds "lidar_prev", the scan before the held one (at the reset: the
    # first scan again), and "action_prev", the last command, clipped to [-1, 1] (zeros at the
    # reset): rl.config.ModelConfig.history; rl.envs.wrappers.History for the host backends
    history: bool = False
    camera_width: int = 64
    camera_height: int = 64
    camera_iters: int = 24
    camera_fov_deg: float = spec.CAMERA_FOV_DEG


# The lidar traces a float16 copy of the distance field (values <= ~1.2 m: steps of <= 1 mm,
# far below the 5 cm pixels): half the cache footprint of float32 (Austria's 2000² field).
LIDAR_MAP_DTYPE = jnp.float16
# Wall kept around the drivable area on the JAX maps (make_params): more than any lidar step
# can jump past a wall pixel (a relaxed step is <= lidar_min_step * range), so rays never
# sample outside the map and sphere_trace needs no bounds checks.
LIDAR_WALL_BAND_M = 2.0


class TrackParams(NamedTuple):
    """The track as a pytree of device arrays (pass it as an argument, not a constant).

    Invariant the lidar relies on (it does not bounds-check its lookups): the map is
    surrounded by wall (distance 0) wider than a relaxed lidar step, so no ray samples
    outside it. make_params guarantees it (LIDAR_WALL_BAND_M); build TrackParams by hand only
    with such a band (see rl.envs.calibration.wall_params)."""

    obstacle_m: jax.Array  # (H, W) f32, metres to the wall
    progress: jax.Array  # (H, W) f32
    origin: jax.Array  # (2,) f32
    resolution: jax.Array  # () f32
    grid_pose: jax.Array  # (3,) x y yaw
    rand_pose: jax.Array  # (M, 3) x y yaw, spawn candidates for reset mode "random"
    lidar_map: jax.Array | None = None  # (H*W,) obstacle_m flattened, in LIDAR_MAP_DTYPE


class EnvState(NamedTuple):
    pos: jax.Array  # (2,)
    yaw: jax.Array
    v: jax.Array  # forward speed, m/s
    steer: jax.Array  # wheel angle, CCW positive
    yaw_rate: jax.Array  # the tyres' yaw rate (car_step); vel[5] adds a wall's pivot
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
    still: jax.Array  # int32 physics steps in a row below task.stall_speed
    lidar: jax.Array  # (rays,) held scan
    key: jax.Array
    # domain randomization (JaxRacecar.randomize); None where it is off
    draw: CarDraw | None = None  # this episode's car
    act_buf: jax.Array | None = None  # (action_delay, 2) the last commands, newest first
    obs_prev: dict | None = None  # obs_lag: the observation of the previous step
    # SensorConfig.history; None where it is off
    lidar_prev: jax.Array | None = None  # (rays,) the scan before `lidar`
    action_prev: jax.Array | None = None  # (2,) the last [drive, steering] command


# ------------------------------------------------------------------------------ track


def make_params(track: Track | str | list, max_random: int = 20000, *,
                slot_m: float | None = None, slots: int | None = None) -> TrackParams:
    """Device arrays of a track (numpy work done once here), on the track's cropped map
    (Track.cropped: the drivable area plus 2 m of wall on every side, the same lookups for
    every drivable position): cache-sized, and the wall band lets the lidar skip bounds
    checks (a ray stops in the first wall pixel it samples; no step crosses 2 m of wall).

    Several tracks (a list of Tracks or names, or a "a,b,procedural:1-8" string) are tiled
    into one map (rl.tracks.tile_tracks), each a walled island: random resets spawn on every
    track equally often (max_random / n candidates each) and a car races the track it
    spawned on; the grid start is track 0's.

    ``slot_m`` and ``slots``: the tracks on a fixed grid of ``slots`` slots of ``slot_m``
    metres (rl.tracks.slot_tracks) with exactly ``max_random // slots`` spawns each, so that
    every set of up to ``slots`` tracks gives arrays of the same shapes (the track pool swaps
    them without a recompile)."""
    names = track_names(track) if isinstance(track, str) else None
    if slot_m is not None:
        tracks = [t if isinstance(t, Track) else load_track(t)
                  for t in (names if names is not None else
                            (track if isinstance(track, list | tuple) else [track]))]
        tiled, offsets = slot_tracks(tracks, slot_m, slots, LIDAR_WALL_BAND_M)
        per = max(1, max_random // slots)
        spawns = []
        for i in range(slots):  # unused slots: more spawns on the tracks there are
            t, off = tracks[i % len(tracks)], offsets[i % len(tracks)]
            pose = _random_spawns(t.cropped(LIDAR_WALL_BAND_M), per)
            pick = np.random.default_rng(i).choice(len(pose), per, replace=len(pose) < per)
            spawns.append(pose[np.sort(pick)] + np.array([off[0], off[1], 0.0], np.float32))
        return _params(_checked(tiled), _grid_pose(tracks[0]) + np.float32([*offsets[0], 0]),
                       np.concatenate(spawns))
    if names is not None and len(names) == 1:
        track = load_track(names[0])
    elif names is not None or isinstance(track, list | tuple):
        tracks = [t if isinstance(t, Track) else load_track(t) for t in (names or track)]
        tiled, offsets = tile_tracks(tracks, LIDAR_WALL_BAND_M)
        per = max(1, max_random // len(tracks))
        spawns = []
        for t, off in zip(tracks, offsets, strict=True):
            pose = _random_spawns(t.cropped(LIDAR_WALL_BAND_M), per)
            spawns.append(pose + np.array([off[0], off[1], 0.0], np.float32))
        return _params(_checked(tiled), _grid_pose(tracks[0]) + np.float32([*offsets[0], 0]),
                       np.concatenate(spawns))
    cropped = _checked(track.cropped(LIDAR_WALL_BAND_M))
    return _params(cropped, _grid_pose(track), _random_spawns(cropped, max_random))


def _checked(track: Track) -> Track:
    if np.any(track.obstacle_m[~track.drivable] > 0.0):
        raise ValueError(f"track {track.name!r}: obstacle_m is non-zero off the drivable area; "
                         "the JAX backend needs every non-drivable pixel to be wall")
    return track


def _params(track: Track, grid_pose: np.ndarray, rand_pose: np.ndarray) -> TrackParams:
    return TrackParams(
        obstacle_m=jnp.asarray(track.obstacle_m, jnp.float32),
        progress=jnp.asarray(track.progress, jnp.float32),
        origin=jnp.asarray(track.origin, jnp.float32),
        resolution=jnp.asarray(track.resolution, jnp.float32),
        grid_pose=jnp.asarray(grid_pose),
        rand_pose=jnp.asarray(rand_pose),
        lidar_map=jnp.asarray(track.obstacle_m.reshape(-1), LIDAR_MAP_DTYPE),
    )


def _grid_pose(track: Track) -> np.ndarray:
    """The grid start (x, y, yaw): racecar_gym's AutomaticGridStrategy (spec.grid_pose), the
    PyBullet backend's too. Computed on the uncropped track: the cropped map's origin, moved by
    whole pixels in floating point, can shift racecar_gym's int() pixel lookup by one."""
    return np.asarray(spec.grid_pose(track), np.float32)


def _random_spawns(track: Track, max_random: int) -> np.ndarray:
    """(M, 3) x y yaw spawn candidates: obstacle > margin, heading toward the mean position
    of the progress bin 2.5-5 % ahead (one track: the bins would mix tracks otherwise)."""
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
    return np.stack([px, py, yaw], 1).astype(np.float32)


def _lookup(grid, params: TrackParams, x, y):
    h, w = grid.shape
    r = jnp.floor(h - (y - params.origin[1]) / params.resolution).astype(jnp.int32)
    c = jnp.floor((x - params.origin[0]) / params.resolution).astype(jnp.int32)
    return grid[jnp.clip(r, 0, h - 1), jnp.clip(c, 0, w - 1)]


def _hash_uniform(key, n: int):
    """n uniform [0, 1) floats from one key: a 32-bit integer hash (lowbias32) of the ray
    index plus a seed drawn from `key` — ~10x cheaper on CPU than jax.random.uniform's
    threefry per element, and as reproducible (the seed comes from the env's key)."""
    seed = jax.random.bits(key, (), jnp.uint32)
    h = jnp.arange(n, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) + seed
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    h = h ^ (h >> 16)
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def sphere_trace(params: TrackParams, x, y, angles, iters: int, max_dist: float,
                 min_step: float = 0.015, refine: int = 0, dirs=None):
    """Distance along world-frame rays from (x, y) to the wall, by sphere tracing the
    metric distance field; an unconverged ray reports where it stopped plus the remaining
    clearance.

    Relaxed: a step is never shorter than `min_step` times the distance covered (grazing
    rays would otherwise crawl along a wall), so a ray may stop up to that step past the
    wall; `refine` bisection steps on [t / (1 + min_step), t] then shrink that overshoot 2x
    each (no per-ray "last free point" is carried through the loop: the loop state is t
    alone). Every ray takes all `iters` steps: on the CPU a fixed, fused loop beat
    compacting the still-open rays after a few steps, and on an accelerator it is the
    natural form. `dirs` = (cos, sin) of the angles, if the caller has them cheaper (then
    `angles` is unused)."""
    dx, dy = (jnp.cos(angles), jnp.sin(angles)) if dirs is None else dirs
    eps = 0.5 * params.resolution
    h, w = params.obstacle_m.shape
    inv = 1.0 / params.resolution
    flat = params.obstacle_m.reshape(-1) if params.lidar_map is None else params.lidar_map
    # pixel of (x + t dx, y + t dy): row = h - (y - oy) / res, col = (x - ox) / res
    r0, c0 = h - (y - params.origin[1]) * inv, (x - params.origin[0]) * inv
    rdy, cdx = -dy * inv, dx * inv

    def look(t):
        r = (r0 + t * rdy).astype(jnp.int32)
        c = (c0 + t * cdx).astype(jnp.int32)
        # in bounds by construction (make_params keeps LIDAR_WALL_BAND_M of wall around the
        # track); truncation is floor for the non-negative pixel coordinates inside the map
        return flat.at[r * w + c].get(mode="promise_in_bounds").astype(jnp.float32)

    def body(_, t):
        d = look(t)
        return jnp.minimum(t + jnp.where(d < eps, 0.0, jnp.maximum(d, min_step * t)), max_dist)

    t = jax.lax.fori_loop(0, iters, body, jnp.zeros_like(dx))
    d = look(t)
    hit = d < eps
    if refine:
        def bisect(_, c):
            lo, hi = c
            mid = 0.5 * (lo + hi)
            inside = look(mid) < eps
            return jnp.where(inside, lo, mid), jnp.where(inside, mid, hi)

        # the last step was either safe (t is at the wall) or a relaxed one of min_step * t
        _, hi = jax.lax.fori_loop(0, refine, bisect, (t / (1.0 + min_step), t), unroll=True)
        return jnp.where(hit, hi, jnp.minimum(t + d, max_dist))
    return jnp.minimum(t + jnp.where(hit, 0.0, d), max_dist)


# ------------------------------------------------------------------------------ env


@dataclass(frozen=True)
class JaxRacecar:
    task: TaskConfig = TaskConfig()
    dynamics: Dynamics = Dynamics()
    sensors: SensorConfig = SensorConfig()
    randomize: RandomizeConfig = RandomizeConfig()  # per-episode car and sensor draws

    def __post_init__(self):
        if self.dynamics.actuator != self.task.actuator:
            raise ValueError(f"JaxRacecar: the task's actuator {self.task.actuator!r} is not the "
                             f"car's ({self.dynamics.actuator!r}); build Dynamics(actuator=…) "
                             "from the task (rl.factory.make_sim does)")
        if self.dynamics.model != CARS[self.task.car].get("model", "kinematic"):
            raise ValueError(f"JaxRacecar: the task's car {self.task.car!r} is not the "
                             f"dynamics' model ({self.dynamics.model!r}); build it with "
                             "jax_env.car(task.car, …) (rl.factory.make_sim does)")

    # ---- sensors
    def _lidar(self, params, pos, yaw, key, draw: CarDraw | None = None):
        s = self.sensors
        g = NO_DRAW if draw is None else draw
        mx, my, _ = spec.LIDAR_MOUNT
        c, si = jnp.cos(yaw), jnp.sin(yaw)
        lx, ly = pos[0] + c * mx - si * my, pos[1] + si * mx + c * my
        body = spec.lidar_angles()[:: spec.LIDAR_RAYS // s.lidar_rays]
        bc, bs = (jnp.asarray(np.cos(body), jnp.float32), jnp.asarray(np.sin(body), jnp.float32))
        dirs = (c * bc - si * bs, si * bc + c * bs)  # rotate the body-frame rays by yaw
        d = sphere_trace(params, lx, ly, None, s.lidar_iters, spec.LIDAR_RANGE,
                         s.lidar_min_step, s.lidar_refine, dirs=dirs)
        amp = s.lidar_noise if g.lidar_noise is None else g.lidar_noise
        noise = 1.0 + amp * (2.0 * _hash_uniform(key, d.shape[-1]) - 1.0)
        scan = spec.lidar_scan(d, noise, xp=jnp)
        p = g.lidar_dropout
        if s.lidar_dropout:  # a fixed rate (evaluation) on top of the episode's draw, if any
            p = s.lidar_dropout if p is None else jnp.maximum(p, s.lidar_dropout)
        if p is not None:  # dropped rays read max range (no return)
            drop = _hash_uniform(jax.random.fold_in(key, 1), d.shape[-1]) < p
            scan = jnp.where(drop, jnp.float32(spec.LIDAR_MAX), scan)
        return scan

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
        vel = state.vel
        coef = self.sensors.yaw_rate_noise
        if state.draw is not None and state.draw.yaw_rate_noise is not None:
            coef = state.draw.yaw_rate_noise  # this episode's (env's level included)
        if not isinstance(coef, int | float) or coef:  # a python 0 = off: no code
            # PyBullet's chassis wobbles at speed: its measured yaw rate carries ~white noise
            # (at the policy rate) of std ~0.016 v^2 rad/s (0.10 at 2.3 m/s, 0.22 at 3.8)
            k = jax.random.fold_in(state.key, state.tick)
            w = coef * state.v**2 * jax.random.normal(k, ())
            vel = vel + jnp.stack([0.0, self.dynamics.com_offset * w, 0.0, 0.0, 0.0, w])
        obs = {"pose": pose, "velocity": vel, "acceleration": state.acc,
               "lidar": state.lidar, "time": state.time[None]}
        if self.sensors.history:
            obs["lidar_prev"], obs["action_prev"] = state.lidar_prev, state.action_prev
        if self.sensors.camera or self.task.observe_camera:
            obs["rgb_camera"] = self._camera(params, state.pos, state.yaw)
        return obs

    def _observe(self, state: EnvState, params) -> tuple[dict, EnvState]:
        """The observation the policy gets now, and the state that remembers it: `_obs`, or
        with observation lag (randomize.obs_lag) in an episode that drew it, the previous
        call's observation (the first call of an episode, at its reset, returns its own)."""
        obs = self._obs(state, params)
        if not self.randomize.obs_lag:
            return obs, state
        prev = obs if state.obs_prev is None else state.obs_prev
        lag = state.draw.obs_lag  # None: every episode lags (obs_lag = 1)
        out = prev if lag is None else jax.tree.map(lambda p, o: jnp.where(lag, p, o), prev, obs)
        if self.sensors.history:  # the policy knows the command it gave: never stale
            out = {**out, "action_prev": obs["action_prev"]}
        return out, state._replace(obs_prev=obs)

    def _draw(self, key) -> CarDraw | None:
        """This episode's randomized car: each quantity uniform in its configured range,
        None where the range is zero (and None for the whole when nothing is randomized)."""
        r = self.randomize
        if not r.enabled:
            return None
        # one U[0, 1) per field from one call (a reset is computed every policy step: keep it
        # cheap); each field has its own, so a draw does not depend on the other ranges
        u = dict(zip(CarDraw._fields, jax.random.uniform(key, (len(CarDraw._fields),)),
                     strict=True))

        def uniform(name, lo, hi):
            return lo + (hi - lo) * u[name] if (lo or hi) else None

        def factor(name):
            a = getattr(r, name)
            x = uniform(name, -a, a)
            return None if x is None else 1.0 + x

        def level(name, nominal):
            x = uniform(name, *getattr(r, name))
            return None if x is None else jnp.maximum(nominal + x, 0.0)

        n = r.action_delay
        return CarDraw(
            mass=factor("mass"), grip=factor("grip"), motor_gain=factor("motor_gain"),
            steer_gain=factor("steer_gain"),
            steer_offset=uniform("steer_offset", -r.steer_offset, r.steer_offset),
            yaw_rate_noise=level("yaw_rate_noise", self.sensors.yaw_rate_noise),
            action_delay=(jnp.minimum(u["action_delay"] * (n + 1), n).astype(jnp.int32)
                          if n else None),
            # obs_lag = 1: every episode lags (no draw, no per-car choice)
            obs_lag=u["obs_lag"] < r.obs_lag if 0.0 < r.obs_lag < 1.0 else None,
            lidar_noise=level("lidar_noise", self.sensors.lidar_noise),
            lidar_dropout=uniform("lidar_dropout", 0.0, r.lidar_dropout),
        )

    def _info(self, state: EnvState) -> dict:
        return {"wall_collision": state.collision, "progress": state.progress,
                "lap": state.lap, "checkpoint": state.checkpoint,
                "wrong_way": state.wrong_way, "time": state.time}

    # ---- reset
    def _spawn(self, key, params: TrackParams) -> EnvState:
        """A fresh state at the reset pose; its lidar is not yet scanned (age = due)."""
        k_pose, k_next = jax.random.split(key)
        # (a key of its own, so that the pose and noise draws are those of today's car)
        draw = self._draw(jax.random.fold_in(key, 1))
        n_delay = self.randomize.action_delay
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
            collision=jnp.bool_(False), still=jnp.int32(0),
            lidar=jnp.zeros(self.sensors.lidar_rays, jnp.float32), key=k_next,
            draw=draw, act_buf=jnp.zeros((n_delay, 2), jnp.float32) if n_delay else None,
            **({"lidar_prev": jnp.zeros(self.sensors.lidar_rays, jnp.float32),
                "action_prev": jnp.zeros(2, jnp.float32)} if self.sensors.history else {}),
        )

    def _scan(self, state: EnvState, params) -> EnvState:
        k_lidar, k_next = jax.random.split(state.key)
        lidar = self._lidar(params, state.pos, state.yaw, k_lidar, state.draw)
        if self.sensors.history:
            state = state._replace(lidar_prev=state.lidar)
        return state._replace(lidar=lidar, lidar_age=jnp.int32(0), key=k_next)

    def _refresh(self, state: EnvState, params) -> EnvState:
        """Scan if the 25 Hz period is due, else hold.

        One env: lax.cond, so a held step costs no tracing. Under vmap (a custom batching
        rule): every env is traced and the due ones keep the scan — what vmap of lax.cond
        would do, except that vmap of lax.cond with a batched predicate broadcasts *every*
        operand, the track maps included, to the batch. XLA sometimes simplifies that copy
        away and sometimes not (with the unchecked lidar gathers it did not: a batched step
        ~10× slower; tests/test_jax_env.py checks the compiled step for such copies); with
        this rule the maps are never batched."""
        every = self.sensors.lidar_every
        scan = self._scan

        @jax.custom_batching.custom_vmap
        def refresh(state, params):
            return jax.lax.cond(state.lidar_age >= every, lambda s: scan(s, params),
                                lambda s: s, state)

        @refresh.def_vmap
        def _batched(axis_size, in_batched, state, params):
            state_b, params_b = in_batched
            state = jax.tree.map(
                lambda x, b: x if b else jnp.broadcast_to(x, (axis_size, *jnp.shape(x))),
                state, state_b)
            axes = jax.tree.map(lambda b: 0 if b else None, params_b)
            scanned = jax.vmap(scan, in_axes=(0, axes))(state, params)
            due = state.lidar_age >= every
            out = jax.tree.map(
                lambda a, b: jnp.where(jnp.reshape(due, due.shape + (1,) * (a.ndim - 1)), a, b),
                scanned, state)
            return out, jax.tree.map(lambda _: True, out)

        return refresh(state, params)

    def reset(self, key, params: TrackParams):
        state = self._scan(self._spawn(key, params), params)
        if self.sensors.history:  # no scan before the first: it stands in for its own past
            state = state._replace(lidar_prev=state.lidar)
        obs, state = self._observe(state, params)
        return obs, state

    # ---- step
    def _clearance(self, params, px, py):
        """Bilinear metric distance to the wall at points (px, py) (pixel centres)."""
        f = params.obstacle_m
        h, w = f.shape
        fr = h - (py - params.origin[1]) / params.resolution - 0.5
        fc = (px - params.origin[0]) / params.resolution - 0.5
        r0, c0 = jnp.floor(fr), jnp.floor(fc)
        wr, wc = fr - r0, fc - c0
        r0 = jnp.clip(r0.astype(jnp.int32), 0, h - 1)
        c0 = jnp.clip(c0.astype(jnp.int32), 0, w - 1)
        r1, c1 = jnp.minimum(r0 + 1, h - 1), jnp.minimum(c0 + 1, w - 1)
        top = f[r0, c0] * (1.0 - wc) + f[r0, c1] * wc
        bot = f[r1, c0] * (1.0 - wc) + f[r1, c1] * wc
        return top * (1.0 - wr) + bot * wr

    def _contact(self, params, pos, yaw):
        """(smallest footprint-circle clearance to the wall, unit wall normal into the track
        there, that circle's offset along the body x axis)."""
        dyn = self.dynamics
        xs = jnp.asarray(dyn.footprint_x, jnp.float32)
        px = pos[0] + jnp.cos(yaw) * xs
        py = pos[1] + jnp.sin(yaw) * xs
        d = self._clearance(params, px, py)
        i = jnp.argmin(d)
        e = params.resolution
        q = jnp.stack([px[i] + e, px[i] - e, px[i], px[i]])
        r = jnp.stack([py[i], py[i], py[i] + e, py[i] - e])
        g4 = self._clearance(params, q, r)
        g = jnp.stack([g4[0] - g4[1], g4[2] - g4[3]])
        normal = g / jnp.maximum(jnp.linalg.norm(g), 1e-6)
        return d[i], normal, xs[i]

    def _wall(self, params, pos, yaw, v, yaw_rate, a_steer, was_in_contact):
        """Wall contact of the free move's pose (see the module docstring): the speed into
        the wall is removed, and on the impact (the first step of a contact) the speed along
        it pays Coulomb friction on the speed removed; a car still
        pushing into the wall pivots about its contact circle toward the wall's tangent
        (the one its steering asks for, else the nearer); the footprint is then pushed out
        along the wall normal. Returns pos, yaw, v, yaw_rate, contact."""
        dyn = self.dynamics
        r_car = dyn.footprint_r
        d, n, xi = self._contact(params, pos, yaw)
        pen = d < r_car
        c, s = jnp.cos(yaw), jnp.sin(yaw)
        hn = c * n[0] + s * n[1]  # < 0: heading into the wall
        into = pen & (hn < 0.0) & (v > 0.0)
        sin_t = jnp.clip(-hn, 0.0, 1.0)
        cos_t = jnp.sqrt(jnp.maximum(1.0 - sin_t * sin_t, 0.0))
        mu = jnp.where(was_in_contact, 0.0, dyn.wall_friction)
        v_new = jnp.where(into, jnp.maximum(v * (cos_t - mu * sin_t), 0.0), v)
        # pivot: turn toward a tangent t = ±(-n_y, n_x); CCW is +
        hxn = c * n[1] - s * n[0]  # h x n: > 0 -> the nearer tangent is counter-clockwise
        near = jnp.sign(jnp.where(hxn == 0.0, 1.0, hxn))
        want = jnp.sign(spec.STEER_SIGN * a_steer)
        turn = jnp.where(jnp.abs(a_steer) > dyn.wall_steer_pick, want, near)
        rate = dyn.wall_pivot_rate * jnp.minimum(1.0, sin_t / dyn.wall_pivot_taper)
        dpsi = jnp.where(into, turn * rate * dyn.dt, 0.0)
        cx, cy = pos[0] + c * xi, pos[1] + s * xi  # the contact circle's centre
        cp, sp = jnp.cos(dpsi), jnp.sin(dpsi)
        rx, ry = pos[0] - cx, pos[1] - cy
        pos = jnp.stack([cx + cp * rx - sp * ry, cy + sp * rx + cp * ry])
        yaw = yaw + dpsi
        yaw_rate = yaw_rate + dpsi / dyn.dt
        # push the footprint out of the wall (deepest circle first, a few passes)
        # (the last pass's clearance, before its push, says whether it still touches)
        for _ in range(dyn.wall_iters):
            d, n, _ = self._contact(params, pos, yaw)
            pos = pos + jnp.maximum(r_car - d, 0.0) * n
        contact = pen | (d < r_car + dyn.wall_skin)
        return pos, yaw, v_new, yaw_rate, contact

    def _advance(self, state: EnvState, action, params: TrackParams):
        """Physics and race bookkeeping of one step; the lidar is left as it was."""
        dyn, task = self.dynamics, self.task
        action = spec.action_array(action, jnp)
        a_motor, a_steer = action[0], action[1]
        a_motor = jnp.clip(a_motor, -1.0, 1.0)
        a_steer = jnp.clip(a_steer, -1.0, 1.0)
        commanded = jnp.stack([a_motor, a_steer]) if self.sensors.history else None
        if task.actuator == "speed":  # the task's speed range (identity at racecar_gym's)
            a_motor = spec.speed_command(a_motor, task.speed_max, task.speed_min)
        act_buf = state.act_buf
        if act_buf is not None:  # action delay: apply the command of d physics steps ago
            now = jnp.stack([a_motor, a_steer])
            applied = now
            for i in range(act_buf.shape[0]):  # a few selects (a gather is dearer on CPU)
                applied = jnp.where(state.draw.action_delay == i + 1, act_buf[i], applied)
            act_buf = jnp.concatenate([now[None], act_buf[:-1]])
            a_motor, a_steer = applied[0], applied[1]
        dt = dyn.dt
        v_new, steer, yaw_rate = car_step(dyn, state.v, state.steer, state.yaw_rate,
                                          a_motor, a_steer, draw=state.draw)
        v_mid = 0.5 * (state.v + v_new)
        # the bicycle model moves the rear axle; the pose (CoM) rides com_offset ahead of it
        b = dyn.com_offset
        c0, s0 = jnp.cos(state.yaw), jnp.sin(state.yaw)
        yaw_new = state.yaw + yaw_rate * dt
        yaw_mid = state.yaw + 0.5 * yaw_rate * dt
        rear = state.pos - b * jnp.stack([c0, s0])
        rear = rear + v_mid * dt * jnp.stack([jnp.cos(yaw_mid), jnp.sin(yaw_mid)])
        pos_new = rear + b * jnp.stack([jnp.cos(yaw_new), jnp.sin(yaw_new)])
        w_free = yaw_rate  # the tyres' yaw rate (state); the wall's pivot is observed only
        pos_new, yaw_new, v_new, yaw_rate, hit = self._wall(params, pos_new, yaw_new, v_new,
                                                            yaw_rate, a_steer, state.collision)
        yaw_new = jnp.arctan2(jnp.sin(yaw_new), jnp.cos(yaw_new))
        # body-frame velocity of the CoM: forward v, sideways com_offset * yaw rate
        vel = jnp.stack([v_new, b * yaw_rate, 0.0, 0.0, 0.0, yaw_rate]).astype(jnp.float32)
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
                             yaw_rate=w_free, vel=vel, acc=accel, time=time, tick=tick,
                             lidar_age=state.lidar_age + 1, lap=lap, checkpoint=cp,
                             progress=prog, total=total, wrong_ema=ema, wrong_way=wrong,
                             collision=hit, act_buf=act_buf, action_prev=commanded,
                             still=jnp.where(v_new < task.stall_speed, state.still + 1, 0))
        reward = task.progress_reward * delta + task.collision_reward * hit + task.frame_reward
        if task.proximity_reward:
            d, _, _ = self._contact(params, pos_new, yaw_new)
            depth = (task.wall_margin - (d - dyn.footprint_r)) / task.wall_margin
            reward = reward + task.proximity_reward * jnp.clip(depth, 0.0, 1.0)
        terminated = (lap > task.laps) | (task.terminate_on_collision & hit)
        if task.stall_time > 0:
            stalled = new.still >= int(round(task.stall_time / dt))
            reward = reward + jnp.where(stalled & ~hit, task.stall_paid, 0.0)
            terminated = terminated | stalled
        reward = reward.astype(jnp.float32)
        truncated = (tick >= int(round(task.time_limit / dt))) & ~terminated
        return new, reward, terminated, truncated

    def step(self, state: EnvState, action, params: TrackParams):
        """One env: obs (after the action), state, reward, terminated, truncated, info."""
        new, reward, terminated, truncated = self._advance(state, action, params)
        obs, new = self._observe(self._refresh(new, params), params)
        return obs, new, reward, terminated, truncated, self._info(new)


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
    if env.sensors.history:
        spaces.update(history_spaces(env.sensors.lidar_rays))
    if env.sensors.camera or env.task.observe_camera:
        s = env.sensors
        spaces["rgb_camera"] = gym.spaces.Box(0, 255, (s.camera_height, s.camera_width, 3),
                                              np.uint8)
    return gym.spaces.Dict(spaces)


def history_spaces(rays: int) -> dict[str, gym.spaces.Box]:
    """The spaces of the two observations :attr:`SensorConfig.history` adds."""
    return {"lidar_prev": gym.spaces.Box(spec.LIDAR_MIN_RANGE, spec.LIDAR_MAX, (rays,),
                                         np.float32),
            "action_prev": gym.spaces.Box(-1.0, 1.0, (2,), np.float32)}


def action_space(actuator: str = "motor") -> gym.spaces.Dict:
    return gym.spaces.Dict({
        actuator: gym.spaces.Box(-1.0, 1.0, (1,), np.float32),
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
        task = task or TaskConfig()
        self.sim = JaxRacecar(task, dynamics or car(task.car, actuator=task.actuator),
                              sensors or SensorConfig())
        self.params = params if params is not None else make_params(track)
        self.observation_space = observation_space(self.sim)
        self.action_space = action_space(task.actuator)
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
        a = jnp.asarray(spec.action_array(action))
        obs, self._state, r, term, trunc, info = self._step(self._state, a, self.params)
        return (_np_obs(obs), float(r), bool(term), bool(trunc),
                _np_info(info, self._state))

    def render(self):
        if self.render_mode == "rgb_array" and self._state is not None:
            sim = replace(self.sim, sensors=replace(self.sim.sensors, camera=True))
            return np.asarray(sim._camera(self.params, self._state.pos, self._state.yaw))
        return None
