"""Per-episode domain randomization of the JAX car ([env.randomize]) and the speed floor
(env.min_speed): every draw lies in its range and varies per episode, reaches the physics or
the sensor it is meant for, and with every range zero the car is today's, bit for bit.

Physics checks run on an open floor (one far wall) with hand-set draws through one compiled
rollout (a full CarDraw, identity but for the quantity under test); the per-episode and
bit-identity checks run the fast runner's functional step on a track with random resets."""

from __future__ import annotations

import functools
import json
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etl import configlib
from rl import factory
from rl.config import RandomizeConfig, RLConfig, load_config
from rl.envs import spec
from rl.envs.calibration import wall_params
from rl.envs.functional import RacecarFunctional
from rl.envs.jax_env import CarDraw, Dynamics, JaxRacecar, SensorConfig, make_params
from rl.envs.spec import TaskConfig
from rl.ppo import EXIT_OK, run

RAYS = 108
T = 100  # physics steps (1 s) per physics rollout
N_DELAY = 3
# every quantity randomized: the draw-range and per-episode checks
ALL = RandomizeConfig(mass=0.15, grip=0.2, motor_gain=0.1, steer_gain=0.1, steer_offset=0.02,
                      yaw_rate_noise=(0.01, 0.03), action_delay=N_DELAY, obs_lag=0.5,
                      lidar_noise=(-0.02, 0.03), lidar_dropout=0.05)
# the open-floor physics car: a stall ends the episode after 0.5 s (checked with the floor)
PHYS_TASK = TaskConfig(time_limit=1e6, stall_time=0.5)


@pytest.fixture(scope="module")
def floor():
    return wall_params(wall_y=5.0, x_range=(-6.0, 12.0), y_min=-5.0)


@pytest.fixture(scope="module")
def params(track):
    return make_params(track)


def draws(**values) -> CarDraw:
    """Four cars' draws: the identity car but for ``values`` (a scalar, or one value per car,
    the last repeated to four: every check then shares one compile)."""
    base = dict(mass=1.0, grip=1.0, motor_gain=1.0, steer_gain=1.0, steer_offset=0.0,
                yaw_rate_noise=0.0, action_delay=0, obs_lag=False,
                lidar_noise=spec.LIDAR_NOISE, lidar_dropout=0.0)
    base.update(values)
    dtype = {"action_delay": jnp.int32, "obs_lag": jnp.bool_}

    def four(v):
        v = list(np.atleast_1d(v))
        return np.array(v + v[-1:] * (4 - len(v)))

    return CarDraw(**{k: jnp.asarray(four(v), dtype.get(k, jnp.float32))
                      for k, v in base.items()})


@functools.partial(jax.jit, static_argnums=0)
def _roll(sim: JaxRacecar, floor, draw: CarDraw, actions):
    """Each car (a batch of draws) from the grid pose at rest through `actions` (T, 2):
    (v, yaw, steer, terminated) per physics step, (n, T) each."""
    def one(d):
        st = sim._spawn(jax.random.PRNGKey(0), floor)._replace(draw=d)

        def body(st, a):
            new, _, term, _ = sim._advance(st, a, floor)
            return new, (new.v, new.yaw, new.steer, term)

        return jax.lax.scan(body, st, actions)[1]

    return jax.vmap(one)(draw)


def roll(floor, draw, motor, steer=0.0, min_speed=0.0):
    """`_roll` of the open-floor car with action delay (buffer) and the other physics draws
    present, so that every check shares one compile (two with the speed floor)."""
    sim = JaxRacecar(PHYS_TASK, Dynamics(min_speed=min_speed),
                     randomize=RandomizeConfig(mass=0.1, grip=0.1, motor_gain=0.1,
                                               steer_gain=0.1, steer_offset=0.01,
                                               action_delay=N_DELAY))
    a = np.stack(np.broadcast_arrays(np.asarray(motor, np.float32),
                                     np.asarray(steer, np.float32)), -1)
    a = np.broadcast_to(a, (T, 2))
    return [np.asarray(x) for x in _roll(sim, floor, draw, jnp.asarray(a))]


# --------------------------------------------------------------------------- config


def test_config_section_loads_checks_and_defaults_to_today(tmp_path):
    cfg = configlib.load(RLConfig, None, [
        "env.randomize.mass=0.15", "env.randomize.yaw_rate_noise=[0.0, 0.03]",
        "env.randomize.action_delay=2", "env.min_speed=0.5"])
    assert cfg.env.randomize == RandomizeConfig(mass=0.15, yaw_rate_noise=(0.0, 0.03),
                                                action_delay=2)
    assert cfg.env.randomize.enabled and not RandomizeConfig().enabled
    assert cfg.env.min_speed == 0.5
    for bad, key in [("env.randomize.mass=1.5", "env.randomize.mass"),
                     ("env.randomize.lidar_noise=[0.03, -0.03]", "env.randomize.lidar_noise"),
                     ("env.randomize.action_delay=-1", "env.randomize.action_delay"),
                     ("env.randomize.obs_lag=2.0", "env.randomize.obs_lag"),
                     ("env.randomize.grip='x'", "env.randomize.grip"),
                     ("env.randomize.masss=0.1", "env.randomize.masss"),
                     ("env.min_speed=-1.0", "env.min_speed")]:
        with pytest.raises(configlib.ConfigError, match=key.replace(".", r"\.")):
            configlib.load(RLConfig, None, [bad])
    # the commented example in configs/rl_racecar.toml is a valid section
    text = (Path(__file__).parents[1] / "configs/rl_racecar.toml").read_text()
    block = text[text.index("# [env.randomize]"):].split("\n\n")[0]
    section = tomllib.loads("\n".join(line.removeprefix("# ") for line in block.splitlines()))
    rand = configlib.from_dict(RandomizeConfig, section["env"]["randomize"], "env.randomize")
    assert rand.enabled


# --------------------------------------------------------------------------- (a) the draws


def test_draws_lie_in_their_ranges_and_differ_between_seeds():
    sim = JaxRacecar(sensors=SensorConfig(yaw_rate_noise=0.005), randomize=ALL)
    d = jax.jit(jax.vmap(sim._draw))(jax.random.split(jax.random.PRNGKey(0), 2000))
    d = {k: np.asarray(v) for k, v in d._asdict().items()}
    for name in ("mass", "grip", "motor_gain", "steer_gain"):
        x = getattr(ALL, name)
        assert np.all((d[name] >= 1 - x) & (d[name] <= 1 + x)), name
        assert d[name].std() > x / 3, name  # ~ uniform: std = x / sqrt(3)
    assert np.all(np.abs(d["steer_offset"]) <= ALL.steer_offset)
    assert d["steer_offset"].std() > ALL.steer_offset / 3
    # levels: the nominal (env.yaw_rate_noise; spec lidar noise) + U(lo, hi)
    y = d["yaw_rate_noise"]
    assert y.min() >= 0.005 + 0.01 - 1e-7 and y.max() <= 0.005 + 0.03 + 1e-7
    ln = d["lidar_noise"]
    assert ln.min() >= spec.LIDAR_NOISE - 0.02 - 1e-7 and ln.max() <= spec.LIDAR_NOISE + 0.03
    assert np.all((d["lidar_dropout"] >= 0) & (d["lidar_dropout"] <= ALL.lidar_dropout))
    assert set(np.unique(d["action_delay"])) == set(range(N_DELAY + 1))
    assert 0.45 < d["obs_lag"].mean() < 0.55
    # reproducible per key, different per key
    one = jax.jit(sim._draw)
    a, b, c = one(jax.random.PRNGKey(7)), one(jax.random.PRNGKey(7)), one(jax.random.PRNGKey(8))
    for f in ("mass", "grip", "steer_offset", "lidar_noise"):
        assert getattr(a, f) == getattr(b, f) and getattr(a, f) != getattr(c, f), f
    # a zero range is not drawn at all (and nothing is, with every range zero)
    part = JaxRacecar(randomize=RandomizeConfig(mass=0.1))._draw(jax.random.PRNGKey(0))
    assert part.mass is not None and part.grip is None and part.action_delay is None
    assert JaxRacecar()._draw(jax.random.PRNGKey(0)) is None


def test_each_episode_draws_its_own_car(params):
    """Through the fast runner's step: the draw holds for an episode, a reset draws anew."""
    sim = JaxRacecar(TaskConfig(reset_mode="random", time_limit=0.4), randomize=ALL,
                     sensors=SensorConfig(lidar_rays=RAYS))
    env = RacecarFunctional(sim, lambda o: o, 4)
    n = 16
    _, carry = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(
        jax.random.split(jax.random.PRNGKey(0), n), params)
    step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    mass, done = [np.asarray(carry[0].draw.mass)], []
    for t in range(25):
        keys = jax.random.split(jax.random.PRNGKey(100 + t), n)
        obs, carry, r, term, trunc, *_ = step(keys, carry, jnp.full((n, 2), 0.5), params)
        mass.append(np.asarray(carry[0].draw.mass))
        done.append(np.asarray(term | trunc))
        assert np.isfinite(np.asarray(r)).all() and np.isfinite(np.asarray(obs["lidar"])).all()
    mass, done = np.stack(mass), np.stack(done)
    assert len(np.unique(mass[0])) == n  # the cars differ
    changed = mass[1:] != mass[:-1]
    assert done.any() and np.array_equal(changed, done)  # new draw exactly at each reset


# --------------------------------------------------------------------------- (b) physics


def test_a_heavier_car_accelerates_and_brakes_less(floor):
    m = np.array([0.85, 1.0, 1.15, 1.15])
    motor = np.where(np.arange(T) < 60, 1.0, -1.0)  # 0.6 s full throttle, 0.4 s full brake
    v = roll(floor, draws(mass=m), motor)[0]
    dyn = Dynamics()
    # from rest at full throttle the motor's force is the limit: a = accel_max / mass
    np.testing.assert_allclose(v[:, 0], dyn.accel_max / m * dyn.dt, rtol=1e-5)
    top = v[:, 59]
    assert top[0] > top[1] > top[2] and top[1] / top[2] > 1.05
    # braking at speed: the brake's torque is the limit: a = -brake_max / mass - drag v
    a = (v[:, 71] - v[:, 70]) / dyn.dt + dyn.drag * v[:, 70]  # (resistance: the v before)
    assert np.all(v[:, 71] > 0.5)
    np.testing.assert_allclose(a, -dyn.brake_max / m, rtol=1e-3)


def test_motor_gain_and_grip(floor):
    v = roll(floor, draws(motor_gain=[0.9, 1.0, 1.1]), 1.0)[0]
    assert v[0, -1] < v[1, -1] < v[2, -1]
    # full lock at speed: a grippier tyre turns harder (the lateral limit, tyre_peak x g)
    v, yaw, *_ = roll(floor, draws(grip=[0.8, 1.0, 1.2]), 1.0, steer=1.0)
    turned = np.abs(np.unwrap(yaw, axis=1)[:, -1])
    assert turned[0] < turned[1] < turned[2]


def test_steering_gain_and_offset(floor):
    _, _, steer, _ = roll(floor, draws(steer_gain=[1.0, 1.1]), 0.5, steer=0.5)
    np.testing.assert_allclose(steer[:2, -1], spec.STEER_SIGN * spec.STEER_MAX_RAD * 0.5
                               * np.array([1.0, 1.1]), rtol=1e-3)
    # zero steering: a straight car, unless offset (CCW positive: yaw grows with the offset)
    _, yaw, steer, _ = roll(floor, draws(steer_offset=[0.0, 0.02, -0.02]), 1.0)
    assert np.all(yaw[0] == 0.0)
    assert yaw[1, -1] > 0.02 and yaw[2, -1] < -0.02
    np.testing.assert_allclose(steer[1:3, -1], [0.02, -0.02], rtol=1e-3)


def test_action_delay_shifts_the_trace(floor):
    """The car with delay d applies the command of d physics steps ago: its trace is the
    undelayed one, d steps later (exactly: it rests at zero command until then)."""
    t = np.arange(T)
    motor = np.where(t < 50, 0.8, -0.4) + 0.1 * np.sin(t)
    steer = np.sin(0.1 * t)
    v, yaw, steer_angle, _ = roll(floor, draws(action_delay=range(N_DELAY + 1)),
                                  motor, steer)
    for d in range(1, N_DELAY + 1):
        np.testing.assert_array_equal(v[d, d:], v[0, :T - d])
        np.testing.assert_array_equal(yaw[d, d:], yaw[0, :T - d])
        np.testing.assert_array_equal(steer_angle[d, d:], steer_angle[0, :T - d])
        assert np.all(v[d, :d] == 0.0)


def test_speed_floor_holds_and_stalls_still_end_the_episode(floor):
    motor = np.where(np.arange(T) < 50, 1.0, -1.0)  # 0.5 s full throttle, then full brake
    free = roll(floor, draws(), motor)[0][0]
    v, _, _, term = roll(floor, draws(), motor, min_speed=1.0)
    v, term = v[0], term[0]
    np.testing.assert_array_equal(v[:50], free[:50])  # the floor does not touch driving
    assert free[-1] < 0.5  # braked, the free car slows far below 1 m/s ...
    reached = int(np.argmax(v >= 1.0))
    assert 0 < reached < 50 and np.all(v[reached:] >= 1.0)  # ... the floored one never does
    assert v[-1] == pytest.approx(1.0, abs=1e-3) and not term.any()
    # below the floor (at rest) nothing pushes the car: a stall still ends it (0.5 s)
    v0, _, _, term0 = roll(floor, draws(), 0.0, min_speed=1.0)
    assert np.all(v0 == 0.0) and int(np.argmax(term0[0])) == 49


# --------------------------------------------------------------------------- (b) sensors


def test_lidar_noise_level_and_dropped_rays(params):
    sim = JaxRacecar(randomize=RandomizeConfig(lidar_noise=(0.0, 0.1), lidar_dropout=0.5))
    pos, yaw = params.grid_pose[:2], params.grid_pose[2]
    scan = jax.jit(jax.vmap(lambda d, k: sim._lidar(params, pos, yaw, k, d)))
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    s = np.asarray(scan(draws(lidar_noise=[0.0, 0.0, 0.1]), keys))
    # noise amplitude 0: the exact scan, whatever the key; 0.1: up to ±10 % of it
    np.testing.assert_array_equal(s[0], s[1])
    near = s[0] < spec.LIDAR_MAX / 1.2  # walls in range, not clipped by the noise
    assert near.mean() > 0.5
    rel = s[2][near] / s[0][near] - 1.0
    assert np.abs(rel).max() <= 0.1 + 1e-5 and np.abs(rel).max() > 0.08
    same = jnp.broadcast_to(keys[0], keys.shape)
    s = np.asarray(scan(draws(lidar_dropout=[0.0, 0.3, 1.0]), same))
    dropped = (s[:, near] == spec.LIDAR_MAX).mean(1)
    assert dropped[0] == 0.0 and 0.2 < dropped[1] < 0.4 and dropped[2] == 1.0
    kept = s[1] < spec.LIDAR_MAX
    np.testing.assert_array_equal(s[1][kept], s[0][kept])  # the rays kept are the scan


def test_yaw_rate_wobble_is_k_v_squared(floor):
    sim = JaxRacecar(randomize=RandomizeConfig(yaw_rate_noise=(0.0, 0.05)))
    st = JaxRacecar()._spawn(jax.random.PRNGKey(0), floor)
    st = st._replace(v=jnp.float32(3.0), vel=jnp.zeros(6).at[0].set(3.0))

    @jax.jit
    def observed(k):
        s = st._replace(draw=CarDraw(yaw_rate_noise=k))
        return jax.vmap(lambda t: sim._obs(s._replace(tick=t), None)["velocity"][5])(
            jnp.arange(2000))

    w = np.asarray(observed(jnp.float32(0.02)))
    assert w.std() == pytest.approx(0.02 * 9.0, rel=0.1) and abs(w.mean()) < 0.02
    assert np.all(np.asarray(observed(jnp.float32(0.0))) == 0.0)


# --------------------------------------------------------------------------- (b, c) functional

LAG_TASK = TaskConfig(reset_mode="random", time_limit=2.0, terminate_on_collision=True)


def functional_run(sim, params, steps: int, n: int = 8):
    """The fast runner's step (vmapped, random resets, random actions): per step the
    observation, the state and the reward."""
    env = RacecarFunctional(sim, lambda o: o, 4)
    obs, carry = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(
        jax.random.split(jax.random.PRNGKey(0), n), params)
    step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    out = [(obs, carry[0], jnp.zeros(n), jnp.zeros(n, bool))]
    key = jax.random.PRNGKey(1)
    for _ in range(steps):
        key, ka, ke = jax.random.split(key, 3)
        a = jax.random.uniform(ka, (n, 2), minval=-1.0, maxval=1.0).at[:, 0].add(0.5)
        obs, carry, r, term, trunc, *_ = step(jax.random.split(ke, n), carry, a, params)
        out.append((obs, carry[0], r, term | trunc))
    return jax.tree.map(lambda *x: np.stack([np.asarray(y) for y in x]), *out)


@pytest.fixture(scope="module")
def today(params):
    """Today's car (no [env.randomize] section): 100 policy steps of 8 cars."""
    return functional_run(JaxRacecar(LAG_TASK, sensors=SensorConfig(lidar_rays=RAYS)),
                          params, 100)


def test_zero_ranges_are_todays_car_bit_for_bit(params, today):
    """Every range written out as zero, through the config and the factory: the same states,
    observations and rewards, bit for bit, over 100 policy steps with random resets."""
    zero = {k: [0.0, 0.0] if isinstance(v, list) else type(v)(0)
            for k, v in configlib.to_dict(RandomizeConfig()).items()}
    cfg = configlib.load(RLConfig, None, [*(f"env.randomize.{k}={v}" for k, v in zero.items()),
                                          "env.min_speed=0.0", f"env.lidar_rays={RAYS}"])
    sim = factory.make_functional(cfg, lambda o: o)[0].env  # its car, sensors, randomization
    sim = JaxRacecar(LAG_TASK, sim.dynamics, sim.sensors, sim.randomize)  # today's task
    assert sim.randomize == RandomizeConfig() and sim.dynamics == Dynamics()
    obs, state, reward, done = functional_run(sim, params, 100)
    obs0, state0, reward0, done0 = today
    assert done0.sum() > 5  # episodes ended and reset along the way
    assert state.draw is None and state.act_buf is None and state.obs_prev is None
    for a, b in zip(jax.tree.leaves((obs, state, reward, done)),
                    jax.tree.leaves((obs0, state0, reward0, done0)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_observation_lag_returns_the_previous_policy_steps_observation(params, today):
    sim = JaxRacecar(LAG_TASK, sensors=SensorConfig(lidar_rays=RAYS),
                     randomize=RandomizeConfig(obs_lag=1.0))
    obs, state, reward, done = functional_run(sim, params, 30)
    obs0, state0, reward0, done0 = jax.tree.map(lambda x: x[:31], today)
    assert state.draw.obs_lag is None  # obs_lag = 1: every episode, no per-car choice
    np.testing.assert_array_equal(state.pos, state0.pos)  # the same cars, driven the same
    np.testing.assert_array_equal(reward, reward0)
    # an observation after a step is the one before it; after a reset, the reset's own
    fresh = np.concatenate([np.ones((1, 8), bool), done0[1:]])
    for k in obs0:
        lag, now = obs[k], obs0[k]
        for t in range(1, 31):
            for i in range(8):
                want = now[t, i] if fresh[t, i] else now[t - 1, i]
                np.testing.assert_array_equal(lag[t, i], want, err_msg=f"{k} t={t} car={i}")
        assert not np.array_equal(lag, now)


@pytest.mark.slow
def test_a_randomized_run_resumes_exactly(tmp_path):
    """The randomized env state (draws, action buffer, lagged observation) is checkpointed
    with the run: 2 updates in one go == 1 update, stop, resume, 1 more."""
    sets = ["ppo.num_envs=8", "ppo.num_steps=16", "ppo.num_minibatches=2",
            "ppo.update_epochs=1", "ppo.total_timesteps=256", "model.hidden=[16]",
            "env.time_limit=1.0", f"env.lidar_rays={RAYS}", "updates_per_log=1",
            "ckpt_every=1", f"runs_dir='{tmp_path}'", "env.min_speed=0.3",
            *(f"env.randomize.{k}={v}" for k, v in [
                ("mass", 0.15), ("grip", 0.2), ("steer_offset", 0.02), ("action_delay", 2),
                ("obs_lag", 0.5), ("lidar_noise", [-0.02, 0.03]), ("lidar_dropout", 0.05),
                ("yaw_rate_noise", [0.0, 0.03])])]
    cfg = lambda name: load_config(Path(__file__).parents[1] / "configs/rl_tiny.toml",
                                   [*sets, f"run_name='{name}'"])
    assert run(cfg("straight"), max_updates=2) == EXIT_OK
    assert run(cfg("split"), max_updates=1) == EXIT_OK
    assert run(cfg("split"), max_updates=2) == EXIT_OK
    a, b = ([json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("straight", "split"))
    assert [m["env_steps"] for m in a] == [m["env_steps"] for m in b] == [128, 256]
    for x, y in zip(a, b, strict=True):
        for k in ("loss/total", "reward_mean"):
            assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-7), k
