"""The pure-JAX backend: gymnasium conformance, a scripted lap, collisions, wrong way,
signed reward, seeding, truncation, lidar accuracy. Jit compiles are shared per module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from etl import configlib
from rl.drivers import drive, drive_line
from rl.envs import spec
from rl.envs.functional import RacecarFunctional
from rl.envs.jax_env import (
    Dynamics,
    JaxRacecar,
    JaxRacecarEnv,
    SensorConfig,
    car,
    car_step,
    make_params,
    sphere_trace,
)
from rl.envs.spec import TaskConfig
from rl.tracks import load_track


@pytest.fixture(scope="module")
def params(track):
    return make_params(track)


@pytest.fixture(scope="module")
def grid_env():
    """Grid start, collision ends the episode, short time limit: one compile for the
    collision / wrong-way / truncation tests."""
    env = JaxRacecar(TaskConfig(time_limit=4.0, terminate_on_collision=True,
                                collision_reward=-10.0, frame_reward=-0.01))
    return env, jax.jit(env.reset), jax.jit(env.step)


def test_gymnasium_checker_and_seeding(params):
    env = JaxRacecarEnv(params=params, task=TaskConfig(reset_mode="random"))
    check_env(env, skip_render_check=True)
    a = {"motor": np.array([0.5], np.float32), "steering": np.array([0.2], np.float32)}

    def episode(seed):
        obs, _ = env.reset(seed=seed)
        scans = [obs["lidar"]]
        for _ in range(6):
            obs, *_ = env.step(a)
            scans.append(obs["lidar"])
        return obs["pose"], np.stack(scans)

    p1, s1 = episode(3)
    p2, s2 = episode(3)
    p3, _ = episode(4)
    assert np.array_equal(p1, p2) and np.array_equal(s1, s2)
    assert not np.array_equal(p1, p3)
    # the scan is held between 25 Hz refreshes: steps 1-3 repeat step 0's, step 4 is new
    assert np.array_equal(s1[1], s1[0]) and np.array_equal(s1[3], s1[0])
    assert not np.array_equal(s1[4], s1[3])
    assert env.observation_space.contains(env.reset(seed=0)[0])


def test_scripted_driver_completes_a_lap(track, params):
    env = JaxRacecar(TaskConfig(laps=1, time_limit=60.0))
    out = jax.jit(drive, static_argnums=(0, 3))(env, params, jax.random.PRNGKey(0), 6000)
    out = {k: np.asarray(v) for k, v in out.items()}
    assert out["terminated"].any(), "no lap within 60 s"
    end = int(np.argmax(out["terminated"]))
    assert out["collision"][: end + 1].sum() == 0
    assert out["lap"][end] == 2
    # one lap of signed progress reward (the grid start sits just past the line)
    assert out["reward"][: end + 1].sum() == pytest.approx(100.0, abs=3.0)
    speed = track.lap_length_m / (end * spec.PHYSICS_DT)
    assert 2.0 < speed < 4.0


def centreline_lap(track, params, n: int = 3000):
    """The privileged centreline driver (pure pursuit on Track.centreline) for n steps."""
    env = JaxRacecar(TaskConfig(laps=1, time_limit=60.0))
    out = jax.jit(drive_line, static_argnums=(0, 3))(env, params, jax.random.PRNGKey(0), n,
                                                      track.centreline)
    return (np.asarray(out[k]) for k in ("collision", "terminated", "reward"))


def test_centreline_driver_clean_lap(track, params):
    """procedural:0: a clean lap in 19.71 s (PyBullet: 19.76 s, tests/test_bullet_env.py)."""
    col, term, rew = centreline_lap(track, params)
    assert term.any(), "no lap in 30 s"
    end = int(np.argmax(term))
    assert col[: end + 1].sum() == 0
    assert 17.0 < end * spec.PHYSICS_DT < 23.0
    assert rew[: end + 1].sum() == pytest.approx(100.0, abs=3.0)


def test_collision_terminates_and_penalizes(grid_env, track, params):
    env, reset, step = grid_env
    obs, st = reset(jax.random.PRNGKey(0), params)
    for _ in range(400):  # full lock to the right from the grid slot: into the wall
        obs, st, r, term, trunc, info = step(st, jnp.array([1.0, 1.0]), params)
        if bool(term):
            break
    assert bool(info["wall_collision"]) and bool(term) and not bool(trunc)
    assert float(r) < -9.0
    # contact is resolved before it digs in: every footprint circle stays off the wall
    d = [float(track.value(track.obstacle_m, np.array([st.pos[0] + np.cos(st.yaw) * x]),
                           np.array([st.pos[1] + np.sin(st.yaw) * x]))[0])
         for x in env.dynamics.footprint_x]
    assert min(d) > 0.5 * env.dynamics.footprint_r


def test_wrong_way_and_signed_reward(grid_env, params):
    env, reset, step = grid_env
    obs, st = reset(jax.random.PRNGKey(0), params)
    st = st._replace(pos=jnp.array([1.0, 0.0]), yaw=jnp.float32(np.pi))  # face backwards
    total, wrong = 0.0, False
    for _ in range(250):
        obs, st, r, term, trunc, info = step(st, jnp.array([0.3, 0.0]), params)
        total += float(r)
        wrong |= bool(info["wrong_way"])
        if bool(term) or bool(trunc):
            break
    assert wrong, "driving backwards over the line was not flagged wrong_way"
    assert float(st.pos[0]) < -0.5  # it did cross the start line backwards
    assert total < -1.0  # backwards costs, and the line crossing is no +100 windfall
    # nor a -100 one: ~5 m backwards is ~-8 of progress, plus -2.5 of frame reward
    assert total > -20.0


def test_truncation_at_time_limit(grid_env, params):
    env, reset, step = grid_env
    obs, st = reset(jax.random.PRNGKey(1), params)
    n = 0
    while True:
        obs, st, r, term, trunc, info = step(st, jnp.array([0.0, 0.0]), params)  # stand
        n += 1
        if bool(term) or bool(trunc):
            break
    assert bool(trunc) and not bool(term)
    assert n == 400 and float(obs["time"][0]) == pytest.approx(4.0, abs=0.011)


def test_lidar_matches_brute_force(track, params):
    x, y = 1.0, 0.2
    ang = jnp.asarray(np.linspace(-np.pi, np.pi, 90, endpoint=False), jnp.float32)
    sc = SensorConfig()
    d = np.asarray(jax.jit(lambda p, x, y, a: sphere_trace(
        p, x, y, a, sc.lidar_iters, 15.0, sc.lidar_min_step, sc.lidar_refine))(
        params, jnp.float32(x), jnp.float32(y), ang))
    # brute force: march 1 cm steps until the metric field says "in the wall"
    t = np.arange(0.0, 15.0, 0.01)
    ref = []
    for a in np.asarray(ang):
        v = track.value(track.obstacle_m, x + t * np.cos(a), y + t * np.sin(a))
        hit = np.nonzero(v < 0.025)[0]
        ref.append(t[hit[0]] if len(hit) else 15.0)
    err = np.abs(d - np.asarray(ref))
    # relaxed steps + 2 bisections: over 40 random poses x 1080 rays (procedural:0) the
    # error is median 0.005 / p90 0.025 / p99 0.57 m (the p99: 15 m corridor rays that do
    # not converge in 24 steps of <= 1 m and so read short)
    assert np.median(err) < 0.02 and np.percentile(err, 90) < 0.1, err


def test_camera_and_batched_functional_env(params):
    env = JaxRacecar(sensors=SensorConfig(camera=True, camera_width=32, camera_height=32,
                                          lidar_rays=270))
    obs, st = jax.jit(env.reset)(jax.random.PRNGKey(0), params)
    img = np.asarray(obs["rgb_camera"])
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert len(np.unique(img.reshape(-1, 3), axis=0)) >= 3  # sky, wall, floor
    assert obs["lidar"].shape == (270,)
    # the step PPO trains with: 8 cars, vmapped, auto-resetting after the 0.05 s limit
    sim = JaxRacecar(TaskConfig(reset_mode="random", time_limit=0.05),
                     sensors=SensorConfig(lidar_rays=270))
    fenv = RacecarFunctional(sim, lambda o: o, action_repeat=1)
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    obs, st = jax.jit(jax.vmap(fenv.reset, in_axes=(0, None)))(keys, params)
    assert obs["lidar"].shape == (8, 270)
    step = jax.jit(jax.vmap(fenv.step, in_axes=(0, 0, 0, None)))
    for _ in range(6):
        obs, st, r, term, trunc, final, info = step(keys, st, jnp.tile(jnp.array([[0.5, 0.0]]),
                                                                      (8, 1)), params)
        assert float(final["time"][0, 0]) <= 0.05 + 1e-6
    assert r.shape == (8,) and float(obs["time"][0, 0]) < 0.05


@pytest.mark.parametrize("angle,steer", [(45.0, 0.0), (90.0, 1.0)])
def test_wall_contact_scrapes_along_the_wall(angle, steer):
    """Nose-first into a straight wall (motor 0.3, the gap follower's push): the speed into
    the wall is removed, the contact pivots the car along the wall and it drives on (as the
    PyBullet car does, `wall_contact_probe("bullet", ...)`: escape ~1.2-1.5 s); the
    footprint never enters the wall and the contact flag holds while it touches."""
    from rl.envs.calibration import wall_contact_probe

    out = wall_contact_probe("jax", angle_deg=angle, motor=0.3, steer_after=steer,
                             seconds=2.5)
    tr = out["trace"]
    assert out["contact"] and out["impact_speed"] > 1.5
    assert out["min_clearance"] > -2e-3  # no penetration (bilinear field, float32)
    assert np.isfinite(out["escape_s"]) and out["escape_s"] < 2.0, out
    # it ends up moving along the wall, not stuck and not through it
    assert np.hypot(tr[-1, 4], tr[-1, 5]) > 1.0 and abs(np.sin(tr[-1, 3])) < 0.5
    assert tr[:, 2].max() < 1.5 - spec.CAR_WIDTH / 2 + 2e-3  # the pose stays off the face
    k = int(np.argmax(tr[:, 6] > 0))
    pinned = tr[k:k + 20]  # the first 0.2 s after impact: pressed against the wall
    assert (pinned[:, 6] > 0).all()


def test_vmapped_step_is_the_one_env_step(params):
    """The vmapped step (the custom batching rule of _refresh: every env traced, the due ones
    keep their scan) gives exactly the states and scans of the one-env step (lax.cond)."""
    env = JaxRacecar(TaskConfig(reset_mode="random"), sensors=SensorConfig(lidar_rays=270))
    n = 12
    keys = jax.random.split(jax.random.PRNGKey(3), n)
    _, st = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
    step_p = jax.jit(jax.vmap(lambda s, a: env.step(s, a, params)))
    acts = jnp.stack([jnp.full((n,), 0.6), jnp.linspace(-0.5, 0.5, n)], 1)
    st_p, scanned = st, np.zeros(n, int)
    for _ in range(9):
        ob_p, st_p, r_p, *_ = step_p(st_p, acts)
        scanned += np.asarray(st_p.lidar_age) == 0
    assert scanned.min() >= 2  # every env rescanned at 25 Hz (9 steps = 2 periods + 1)
    step_1 = jax.jit(lambda s, a: env.step(s, a, params))
    for i in (0, 5):
        s1 = jax.tree.map(lambda x, i=i: x[i], st)
        for _ in range(9):
            ob1, s1, *_ = step_1(s1, acts[i])
        np.testing.assert_array_equal(np.asarray(ob1["lidar"]), np.asarray(ob_p["lidar"][i]))
        np.testing.assert_array_equal(np.asarray(s1.key), np.asarray(st_p.key[i]))


def test_batched_functional_step_resets_only_where_needed_and_exactly(params):
    """The vmapped functional step computes the batch's resets (a lidar scan each) only in a
    step where some episode ended (its custom batching rule); its every output is exactly the
    one-env step's, which always computes the reset — over steps where none, some and (with
    random starts) different episodes ended."""
    sim = JaxRacecar(TaskConfig(reset_mode="random", time_limit=0.2),
                     sensors=SensorConfig(lidar_rays=108))
    fenv = RacecarFunctional(sim, lambda o: o, action_repeat=2)
    n = 6
    _, st = jax.vmap(fenv.reset, in_axes=(0, None))(jax.random.split(jax.random.PRNGKey(5), n),
                                                     params)
    step_b = jax.jit(jax.vmap(fenv.step, in_axes=(0, 0, 0, None)))
    step_1 = jax.jit(fenv.step)
    acts = jnp.stack([jnp.full((n,), 1.0), jnp.linspace(-1.0, 1.0, n)], 1)
    ones = [jax.tree.map(lambda x, i=i: x[i], st) for i in range(n)]
    ended = []
    for t in range(16):  # 0.02 s per policy step: every episode is cut at 0.2 s
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(6), t), n)
        out = step_b(keys, st, acts, params)
        ended.append(np.asarray(out[3] | out[4]))
        for i in range(n):
            one = step_1(keys[i], ones[i], acts[i], params)
            for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(out), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[i])
            ones[i] = one[1]
        st = out[1]
    ended = np.array(ended)
    assert (~ended.any(1)).sum() >= 5 and ended.any(1).sum() >= 1  # steps with and without


def test_vmapped_step_does_not_copy_the_maps_per_env(params):
    """vmap of lax.cond with a batched predicate broadcasts every operand to the batch; the
    lidar refresh must not do that to the track maps (it did: 100x slower PPO rollouts)."""
    env = JaxRacecar(TaskConfig(), sensors=SensorConfig(lidar_rays=108))
    n = 64
    _, st = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(jax.random.PRNGKey(0), n),
                                                   params)
    hlo = jax.jit(jax.vmap(env.step, in_axes=(0, 0, None))).lower(
        st, jnp.zeros((n, 2)), params).compile().as_text()
    import re

    sizes = [np.prod([int(d) for d in dims.split(",")])
             for dims in re.findall(r"(?:f16|f32|s32|pred)\[([0-9,]+)\]", hlo)]
    assert max(sizes) < 2 * params.obstacle_m.size, max(sizes)


def test_params_pad_a_map_without_wall_margin(track, params):
    """A map cut right at the drivable area (no wall beyond it) is padded with wall by
    make_params, so the lidar (which skips bounds checks) reads the same as on the full map."""
    tight = track.cropped(0.0)
    rows, cols = np.nonzero(tight.drivable)
    assert rows.min() == 0 and cols.min() == 0  # drivable pixels on the map's edge
    p2 = make_params(tight)
    assert p2.obstacle_m.shape == params.obstacle_m.shape
    env = JaxRacecar(TaskConfig(reset_mode="random"))
    reset = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))
    keys = jax.random.split(jax.random.PRNGKey(0), 16)
    np.testing.assert_array_equal(np.asarray(reset(keys, params)[0]["lidar"]),
                                  np.asarray(reset(keys, p2)[0]["lidar"]))


def test_params_reject_a_distance_field_off_the_track(track):
    bad = track.obstacle_m.copy()
    bad[~track.drivable] = 0.3
    from dataclasses import replace

    with pytest.raises(ValueError, match="non-drivable pixel to be wall"):
        make_params(replace(track, obstacle_m=bad))


def test_several_tracks_in_one_map():
    """make_params on a track list: spawns on every track about equally, each heading
    along its own track's progress, and a gap-following car stays on (and makes progress
    around) the track it spawned on."""
    from rl.tracks import tile_tracks

    tracks = [load_track(f"procedural:{i}") for i in range(3)]
    params = make_params("procedural:0,procedural:1,procedural:2")
    tiled, offsets = tile_tracks(tracks, 2.0)
    pose = np.asarray(params.rand_pose)

    def tile_of(x, y):
        """Index of the track whose drivable area holds world point (x, y), else -1."""
        out = np.full(len(x), -1)
        for i, (t, (dx, dy)) in enumerate(zip(tracks, offsets, strict=True)):
            h, w = t.shape
            r = np.floor(h - (y - dy - t.origin[1]) / t.resolution).astype(int)
            c = np.floor((x - dx - t.origin[0]) / t.resolution).astype(int)
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            on = np.zeros(len(x), bool)
            on[inside] = t.drivable[r[inside], c[inside]]
            out[on] = i
        return out

    tiles = tile_of(pose[:, 0], pose[:, 1])
    counts = np.bincount(tiles, minlength=3)
    assert (tiles >= 0).all() and counts.min() > 0.3 * len(pose) and counts.sum() == len(pose)
    step = 0.3  # a short step along the spawn heading gains progress on the spawn's track
    ahead = tiled.value(tiled.progress, pose[:, 0] + step * np.cos(pose[:, 2]),
                        pose[:, 1] + step * np.sin(pose[:, 2]))
    here = tiled.value(tiled.progress, pose[:, 0], pose[:, 1])
    gain = (ahead - here + 0.5) % 1.0 - 0.5
    assert np.mean(gain > 0) > 0.95
    env = JaxRacecar(TaskConfig(reset_mode="random", time_limit=30.0))
    keys = jax.random.split(jax.random.PRNGKey(1), 12)
    out = jax.jit(jax.vmap(lambda k: drive(env, params, k, 800)))(keys)
    x0, y0 = np.asarray(out["pose"][:, 0, 0]), np.asarray(out["pose"][:, 0, 1])
    x1, y1 = np.asarray(out["pose"][:, -1, 0]), np.asarray(out["pose"][:, -1, 1])
    np.testing.assert_array_equal(tile_of(x0, y0), tile_of(x1, y1))
    assert len(set(tile_of(x0, y0))) >= 2
    assert np.asarray(out["reward"]).sum(1).min() > 10  # every car gains > 0.1 lap in 8 s


def _footprint_clearance(track, x, y, yaw):
    """Independent check: the footprint circles' distance to the wall, nearest pixel."""
    return min(float(track.value(track.obstacle_m, np.array([x + np.cos(yaw) * fx]),
                                 np.array([y + np.sin(yaw) * fx]))[0]) - spec.FOOTPRINT_R
               for fx in spec.FOOTPRINT_X)


def test_proximity_reward_scales_with_depth_into_the_wall_band(track, params):
    """Driving at full lock into the wall: with proximity_reward the reward differs from the
    plain one by proximity_reward * depth, depth = (margin - clearance) / margin in [0, 1] —
    nothing outside the band, more the closer the car gets."""
    margin = 0.3
    plain = JaxRacecar(TaskConfig(time_limit=10.0))
    near = JaxRacecar(TaskConfig(time_limit=10.0, proximity_reward=-1.0, wall_margin=margin))
    _, s0 = jax.jit(plain.reset)(jax.random.PRNGKey(0), params)
    step_p, step_n = jax.jit(plain.step), jax.jit(near.step)
    a = jnp.array([0.4, 0.6])
    st, diffs, depths = s0, [], []
    for _ in range(300):
        _, st_p, r_p, *_ = step_p(st, a, params)
        _, st_n, r_n, *_ = step_n(st, a, params)
        assert np.array_equal(np.asarray(st_p.pos), np.asarray(st_n.pos))  # same dynamics
        st = st_p
        diffs.append(float(r_n - r_p))
        c = _footprint_clearance(track, float(st.pos[0]), float(st.pos[1]), float(st.yaw))
        depths.append(min(max((margin - c) / margin, 0.0), 1.0))
    diffs, depths = np.array(diffs), np.array(depths)
    assert (diffs <= 0).all()
    assert depths.max() > 0.5 and (depths == 0).any()  # the run crosses the band
    # bilinear (env) vs nearest-pixel (here) distances: within a pixel of each other
    np.testing.assert_allclose(-diffs, depths, atol=0.05 / margin + 1e-3)


def test_stall_ends_the_episode_like_a_crash(params):
    """stall_time: standing still (braking from the grid) for that long terminates the
    episode and pays collision_reward once; moving on, the counter resets; off by default."""
    task = dict(time_limit=10.0, collision_reward=-10.0)
    env = JaxRacecar(TaskConfig(**task, stall_time=0.5))
    off = JaxRacecar(TaskConfig(**task))
    _, st = jax.jit(env.reset)(jax.random.PRNGKey(0), params)
    step, step_off = jax.jit(env.step), jax.jit(off.step)
    st_off = st
    for i in range(1, 51):
        _, st, r, term, *_ = step(st, jnp.array([-1.0, 0.0]), params)
        _, st_off, r_off, term_off, *_ = step_off(st_off, jnp.array([-1.0, 0.0]), params)
        assert not bool(term_off)
        assert bool(term) == (i == 50), i
    assert float(r) == pytest.approx(float(r_off) - 10.0)
    # driving, the counter stays at zero
    _, st = jax.jit(env.reset)(jax.random.PRNGKey(0), params)
    for _ in range(100):
        _, st, r, term, *_ = step(st, jnp.array([0.5, 0.0]), params)
    assert not bool(term) and int(st.still) == 0


def test_stall_penalty_is_its_own_when_set(params):
    """TaskConfig.stall_reward (env.stall_penalty): a stall pays it instead of
    collision_reward; rl.factory passes the config's penalty as its negative."""
    import dataclasses

    from rl import factory
    from rl.config import EnvConfig, RLConfig

    paid = {}
    for name, extra in (("own", {"stall_reward": -7.0}), ("crash", {})):
        env = JaxRacecar(TaskConfig(time_limit=10.0, collision_reward=-0.25, stall_time=0.5,
                                    **extra))
        _, st = jax.jit(env.reset)(jax.random.PRNGKey(0), params)
        step = jax.jit(env.step)
        for _ in range(50):
            _, st, r, term, *_ = step(st, jnp.array([-1.0, 0.0]), params)
        assert bool(term)
        paid[name] = float(r)
    assert paid["own"] == pytest.approx(paid["crash"] + 0.25 - 7.0)
    cfg = RLConfig()
    cfg = dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, stall_penalty=5.0))
    assert factory.task_config(cfg).stall_paid == -5.0
    assert factory.task_config(RLConfig()).stall_reward is None
    with pytest.raises(configlib.ConfigError, match="env.stall_penalty"):
        EnvConfig(stall_penalty=-1.0)


def test_yaw_rate_noise_is_observation_only(params):
    """SensorConfig.yaw_rate_noise perturbs the observed yaw rate (std ∝ speed², none at rest),
    never the car: poses are identical with and without it."""
    exact = JaxRacecar(TaskConfig(time_limit=10.0))
    noisy = JaxRacecar(TaskConfig(time_limit=10.0), sensors=SensorConfig(yaw_rate_noise=0.016))
    _, st = jax.jit(exact.reset)(jax.random.PRNGKey(0), params)
    o, _ = jax.jit(noisy.reset)(jax.random.PRNGKey(0), params)
    assert float(o["velocity"][5]) == 0.0  # at rest: no noise
    step_e, step_n = jax.jit(exact.step), jax.jit(noisy.step)
    st_n, dw = st, []
    for _ in range(200):
        o_e, st, *_ = step_e(st, jnp.array([1.0, 0.0]), params)
        o_n, st_n, *_ = step_n(st_n, jnp.array([1.0, 0.0]), params)
        np.testing.assert_array_equal(np.asarray(st.pos), np.asarray(st_n.pos))
        dw.append(float(o_n["velocity"][5] - o_e["velocity"][5]) / max(float(st.v), 1e-3) ** 2)
    late = np.array(dw[100:])  # at speed
    assert 0.008 < late.std() < 0.03, late.std()


def test_one_action_converter_both_ways():
    """spec.action_array / action_dict: the racecar action dict ⇄ [motor, steering], one
    action or a batch, numpy or jax."""
    one = {"motor": np.array([0.25], np.float32), "steering": np.array([-0.5], np.float32)}
    np.testing.assert_array_equal(spec.action_array(one), [0.25, -0.5])
    assert spec.action_array({"speed": 0.1, "steering": 0.2}, jnp).shape == (2,)
    batch = np.array([[0.375, -0.5], [1.0, 0.25]], np.float32)
    d = spec.action_dict(batch)
    assert d["motor"].shape == (2, 1) and d["steering"].shape == (2, 1)
    np.testing.assert_array_equal(spec.action_array(d), batch)
    np.testing.assert_array_equal(spec.action_array({k: v[:, 0] for k, v in d.items()}), batch)
    np.testing.assert_array_equal(spec.action_dict(batch[0])["steering"], [-0.5])


def test_speed_actuator_reaches_every_backend_and_the_evaluation():
    """env.actuator = "speed": the task carries it to the JAX car (a mismatch fails loudly),
    to the gymnasium action space and to the host evaluation loop's action dict; a target of
    2 m/s settles the car near 2 × 1.25 m/s (racecar_gym's overshoot) where the same action
    on the motor drives it on, faster."""
    import dataclasses

    from rl import factory
    from rl.config import RLConfig
    from rl.evaluate import _episode_gym

    d = spec.action_dict(np.array([[0.1, 0.2]], np.float32), "speed")
    assert set(d) == {"speed", "steering"}
    with pytest.raises(ValueError, match="actuator"):
        spec.action_dict(np.zeros(2), "throttle")
    with pytest.raises(ValueError, match="actuator"):
        JaxRacecar(TaskConfig(actuator="speed"), Dynamics())
    cfg = RLConfig()
    cfg = dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, actuator="speed"))
    task = factory.task_config(cfg)
    assert task.actuator == "speed"
    sim = factory.make_sim(task)
    assert sim.dynamics.actuator == "speed"
    env = factory.make_env("jax", "procedural:0", task)
    assert set(env.action_space.spaces) == {"speed", "steering"}

    target = 2.0 / spec.SPEED_MAX_VELOCITY * 2.0 - 1.0  # the command for 2 m/s
    speeds = {}
    for actuator in ("speed", "motor"):
        t = dataclasses.replace(task, actuator=actuator, time_limit=2.5,
                                terminate_on_collision=False, reset_mode="grid")
        e = factory.make_env("jax", "procedural:0", t)
        trace, _ = _episode_gym(e, lambda obs: np.array([target, 0.0], np.float32), 0, 4)
        speeds[actuator] = float(np.max(trace["speed"]))
    assert 2.0 < speeds["speed"] < 2.5, speeds  # steady state 2.2 m/s (drag)
    assert speeds["motor"] > speeds["speed"] + 0.1, speeds  # still accelerating


def test_speed_max_caps_the_speed_actuator():
    """env.speed_max: full command on a car capped at 2 m/s drives exactly as racecar_gym's
    car at the command for 2 m/s (the cap reaches the physics, as a rescaled command); the
    default leaves today's car; a cap on the motor actuator, or out of range, is refused."""
    import dataclasses

    from rl import factory
    from rl.config import EnvConfig, RLConfig
    from rl.evaluate import _episode_gym

    assert spec.speed_command(0.3, spec.SPEED_MAX_VELOCITY) == 0.3
    assert spec.speed_command(-1.0, 2.0) == -1.0  # 0 m/s stays 0
    base = TaskConfig(actuator="speed", time_limit=2.5, terminate_on_collision=False)
    capped = dataclasses.replace(base, speed_max=2.0)
    cmd_2 = 2.0 / spec.SPEED_MAX_VELOCITY * 2.0 - 1.0
    runs = {}
    for name, task, a in (("capped", capped, 1.0), ("cmd", base, cmd_2), ("full", base, 1.0)):
        e = factory.make_env("jax", "procedural:0", task)
        trace, _ = _episode_gym(e, lambda obs, a=a: np.array([a, 0.0], np.float32), 0, 4)
        runs[name] = np.asarray(trace["speed"])
    np.testing.assert_allclose(runs["capped"], runs["cmd"], rtol=0, atol=1e-4)
    assert runs["full"].max() > runs["capped"].max() + 0.5
    cfg = RLConfig()
    cfg = dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, actuator="speed",
                                                           speed_max=2.5))
    assert factory.task_config(cfg).speed_max == 2.5
    with pytest.raises(ValueError, match="speed_max"):
        TaskConfig(speed_max=2.0)  # motor actuator
    with pytest.raises(ValueError, match="speed_max"):
        TaskConfig(actuator="speed", speed_max=4.0)
    with pytest.raises(configlib.ConfigError, match="env.speed_max"):
        EnvConfig(actuator="speed", speed_max=0.0)
    with pytest.raises(configlib.ConfigError, match="env.speed_max"):
        EnvConfig(speed_max=3.0)



def test_speed_min_is_a_floor_under_the_speed_command():
    """env.speed_min: the drive action's −1 asks for speed_min, not 0 — a floored car at full
    brake drives exactly as racecar_gym's car at the command for that speed (the floor reaches
    the physics as a rescaled command); +1 still asks for speed_max; out of range, or on the
    motor actuator, it is refused; an unset floor leaves the command as it was."""
    import dataclasses

    from rl import factory
    from rl.config import EnvConfig, RLConfig
    from rl.evaluate import _episode_gym

    smv = spec.SPEED_MAX_VELOCITY
    for a in (-1.0, 0.0, 1.0):
        v = (spec.speed_command(a, 2.5, 0.5) + 1) / 2 * smv
        assert v == pytest.approx(0.5 + (a + 1) / 2 * 2.0)
        assert spec.speed_command(a, 2.5, 0.0) == spec.speed_command(a, 2.5)
    base = TaskConfig(actuator="speed", time_limit=2.5, terminate_on_collision=False)
    floored = dataclasses.replace(base, speed_max=2.5, speed_min=1.0)
    cmd_1 = 1.0 / smv * 2.0 - 1.0
    runs = {}
    for name, task, a in (("floored", floored, -1.0), ("cmd", base, cmd_1), ("stop", base, -1.0)):
        e = factory.make_env("jax", "procedural:0", task)
        trace, _ = _episode_gym(e, lambda obs, a=a: np.array([a, 0.0], np.float32), 0, 4)
        runs[name] = np.asarray(trace["speed"])
    np.testing.assert_allclose(runs["floored"], runs["cmd"], rtol=0, atol=1e-4)
    assert runs["floored"][-1] > 0.8 and runs["stop"].max() < 0.2, runs["stop"].max()
    cfg = RLConfig()
    cfg = dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, actuator="speed",
                                                           speed_min=0.5))
    assert factory.task_config(cfg).speed_min == 0.5
    assert not TaskConfig(actuator="speed").speed_rescaled
    assert TaskConfig(actuator="speed", speed_min=0.5).speed_rescaled
    with pytest.raises(ValueError, match="speed_min"):
        TaskConfig(speed_min=0.5)  # motor actuator
    with pytest.raises(ValueError, match="speed_min"):
        TaskConfig(actuator="speed", speed_max=2.0, speed_min=2.0)
    with pytest.raises(configlib.ConfigError, match="env.speed_min"):
        EnvConfig(actuator="speed", speed_min=-0.1)
    with pytest.raises(configlib.ConfigError, match="env.speed_min"):
        EnvConfig(speed_min=0.5)


# ------------------------------------------------------------------ the front tyre (issue 12)


def _corner(dyn, a, s, entry=1.0, n_entry=300, n=150):
    """The car model alone (car_step, numpy): n_entry steps straight at speed action
    `entry`, then n steps at speed action `a` and steering `s`. Returns the yaw change over
    the n steps, the speed and the yaw rate at the end, and the wheel angle."""
    v = steer = w = yaw = 0.0
    for i in range(n_entry + n):
        act, st = (entry, 0.0) if i < n_entry else (a, s)
        v, steer, w = car_step(dyn, v, steer, w, act, st, True, xp=np)
        if i >= n_entry:
            yaw += float(w) * dyn.dt
    return yaw, float(v), float(w), float(steer)


def test_full_lock_at_speed_saturates_and_scrubs():
    """PyBullet's car at ~3.5 m/s (calibration.SCRUB_*): full lock turns no harder than 60 %
    lock (its lateral acceleration saturates near 3.5 m/s^2) and costs speed (3.1 m/s
    where the straight holds 3.5). A kinematic car would turn 1.7x harder at full lock and
    lose nothing."""
    dyn = car("tyre", actuator="speed")
    _, v_straight, _, _ = _corner(dyn, 1.0, 0.0)
    yaw_full, v_full, w_full, d_full = _corner(dyn, 1.0, 1.0)
    yaw_60, v_60, _, d_60 = _corner(dyn, 1.0, 0.6)
    assert abs(d_full) > 1.6 * abs(d_60)  # the wheels did turn 1/0.6 as far
    assert abs(yaw_full) < 1.15 * abs(yaw_60), (yaw_full, yaw_60)
    kinematic = v_full * np.tan(abs(d_full)) / dyn.wheelbase
    assert abs(w_full) < 0.6 * kinematic, (w_full, kinematic)
    assert 3.0 < v_full < v_straight - 0.25, (v_full, v_straight)
    assert v_full < v_60 < v_straight


@pytest.mark.parametrize("entry,s", [(-0.45, 1.0), (-0.45, 0.3), (0.1, 0.3)])
def test_low_lateral_acceleration_is_kinematic(entry, s):
    """Below ~1 m/s^2 of lateral acceleration (1 m/s at full lock, 2.2 m/s at 30 % lock) the
    yaw rate is at most the kinematic bicycle's v tan(delta) / L and within 8 % of it (the
    tyre's small slip; PyBullet's car at 2.3 m/s and 30 % lock: 8 % below it), and turning
    costs (almost) no speed; a car at rest does not turn at all."""
    dyn = car("tyre", actuator="speed")
    _, v_straight, _, _ = _corner(dyn, entry, 0.0, entry=entry)
    _, v, w, d = _corner(dyn, entry, s, entry=entry)
    assert v * abs(w) < 1.0
    kinematic = v * np.tan(d) / dyn.wheelbase
    assert 0.92 * abs(kinematic) < abs(w) <= 1.001 * abs(kinematic), (w, kinematic)
    assert np.sign(w) == np.sign(kinematic)
    assert v == pytest.approx(v_straight, abs=0.02)
    v0 = d0 = w0 = 0.0
    for _ in range(100):  # at rest (motor actuator, no drive), full lock
        v0, d0, w0 = car_step(dyn, v0, d0, w0, 0.0, 1.0, False, xp=np)
    assert v0 == 0.0 and w0 == 0.0 and abs(d0) > 0.2


def test_tyre_curve_shape():
    """Pacejka's F = peak sin(C atan(B slip)): odd, slope tyre_stiffness at zero slip, never
    above the peak; C = 1 rises monotonically toward the peak; C > 1 peaks at
    B slip = tan(pi / 2C) and falls past it toward peak sin(C pi / 2)."""
    from rl.envs.jax_env import tyre_curve

    slip = np.linspace(-3.0, 3.0, 6001)
    dyn = car("tyre")
    f = tyre_curve(dyn, slip, dyn.tyre_peak, xp=np)
    np.testing.assert_allclose(f, -f[::-1], atol=1e-12)
    h = 1e-7
    slope = (tyre_curve(dyn, h, dyn.tyre_peak, np) - tyre_curve(dyn, -h, dyn.tyre_peak, np))
    assert slope / (2 * h) == pytest.approx(dyn.tyre_stiffness, rel=1e-6)
    assert np.all(np.diff(f) > 0) and np.abs(f).max() < dyn.tyre_peak
    assert f[-1] > 0.98 * dyn.tyre_peak  # saturated at 3 units of slip
    c, peak = 1.6, 2.0
    shaped = car("tyre", tyre_shape=c)
    g = tyre_curve(shaped, slip, peak, xp=np)
    i = int(np.argmax(g))
    b = shaped.tyre_stiffness / (c * peak)
    assert b * slip[i] == pytest.approx(np.tan(np.pi / (2 * c)), abs=b * 1e-3)
    assert g[i] == pytest.approx(peak, rel=1e-4)  # the grid point nearest the peak
    far = tyre_curve(shaped, 1e6, peak, xp=np)
    assert far == pytest.approx(peak * np.sin(c * np.pi / 2), rel=1e-3)
    assert far < g[-1] < g[i]  # falls past the peak toward the sliding force


# each front-tyre / steering field of Dynamics, a changed value, and a protocol where it acts
# (calibration.SCRUB_*-like open-floor runs with the speed actuator; the brake fields: the
# motor's brake-and-turn; tyre_slip_v: a start from rest at full lock)
_TYRE_FIELDS = {
    "tyre_peak": (1.6, "scrub"), "tyre_stiffness": (60.0, "scrub"),
    "tyre_shape": (1.6, "scrub"), "yaw_inertia": (0.15, "slalom"),
    "cornering_drag": (3.0, "scrub"), "traction_lateral": (0.0, "scrub"),
    "tyre_slip_v": (1.5, "start"), "steer_tau": (0.2, "slalom"),
    "brake_yaw_loss": (0.3, "brake"), "brake_yaw_loss_slope": (0.0, "brake"),
    "brake_yaw_loss_v": (4.0, "brake"),
}


def _protocol(kind):
    n = 450
    i = np.arange(n)
    speed = np.full(n, kind != "brake")
    a = np.where(i < 300, 1.0, {"scrub": 1.0, "slalom": 0.6, "brake": -0.3, "start": 1.0}[kind])
    s = np.where(i < 300, 0.0, 1.0)
    if kind == "slalom":
        s = np.where(i < 300, 0.0, np.where((i - 300) // 25 % 2 == 0, 1.0, -1.0))
    if kind == "start":  # from rest: motor 0.2 at full lock from the first step
        speed, a, s = np.zeros(n, bool), np.full(n, 0.2), np.ones(n)
    return speed, a, s


@pytest.mark.parametrize("field", list(_TYRE_FIELDS))
def test_each_tyre_parameter_reaches_the_physics(field):
    """Changing one field of the tyre model changes the car's speed or yaw on the protocol
    where it acts (and the nominal car is reproduced when it is not changed)."""
    from dataclasses import replace

    from rl.envs.calibration import open_floor_jax_batch

    value, kind = _TYRE_FIELDS[field]
    assert getattr(car("tyre"), field) != value
    acts = _protocol(kind)
    base = open_floor_jax_batch(car("tyre"), *acts)[0]
    again = open_floor_jax_batch(replace(car("tyre"), **{field: getattr(car("tyre"), field)}),
                                 *acts)[0]
    np.testing.assert_array_equal(base, again)
    changed = open_floor_jax_batch(replace(car("tyre"), **{field: value}), *acts)[0]
    gap = max(np.abs(changed[:, 2] - base[:, 2]).max(), np.abs(changed[:, 3] - base[:, 3]).max())
    assert gap > 0.02, (field, gap)


def test_grip_draw_scales_the_tyre_peak():
    """A grip draw g is the nominal car with tyre_peak, slip_gain and brake_slip x g and
    the braked-grip loss / g, step for step (car_step, numpy); g = 1 is the nominal car."""
    from dataclasses import replace

    from rl.envs.jax_env import CarDraw

    dyn = car("tyre")
    for g in (0.8, 1.0, 1.25):
        scaled = replace(dyn, tyre_peak=dyn.tyre_peak * g, slip_gain=dyn.slip_gain * g,
                         brake_slip=dyn.brake_slip * g)
        for speed_mode, a in ((True, 1.0), (False, 1.0)):
            x = y = (0.0, 0.0, 0.0)
            for i in range(450):
                s = 0.0 if i < 300 else 1.0
                x = car_step(dyn, *x, a, s, speed_mode, xp=np, draw=CarDraw(grip=g))
                y = car_step(scaled, *y, a, s, speed_mode, xp=np)
                np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)
            if g == 1.0:
                z = (0.0, 0.0, 0.0)
                for i in range(450):
                    z = car_step(dyn, *z, a, 0.0 if i < 300 else 1.0, speed_mode, xp=np)
                np.testing.assert_array_equal(np.array(x), np.array(z))
    # and the peak is what scales the car's grip at full lock and speed
    yaws = []
    for g in (0.8, 1.25):
        v = st = w = yaw = 0.0
        for i in range(450):
            v, st, w = car_step(dyn, v, st, w, 1.0, 0.0 if i < 300 else 1.0, True, xp=np,
                                draw=CarDraw(grip=g))
            yaw += float(w) * dyn.dt
        yaws.append(abs(yaw))
    assert yaws[0] < yaws[1] - 0.1, yaws


# ------------------------------------------------------------------ the car model switch


def test_the_default_car_is_the_kinematic_bicycle():
    """Dynamics() / car() is the kinematic model: its yaw rate is v tan(delta) / L at the
    step's midpoint speed, saturated by understeer, whatever yaw rate comes in (it keeps no
    yaw-rate state); the tyre car is another car."""
    dyn = car()
    assert dyn == Dynamics() and dyn.model == "kinematic"
    v = steer = 0.0
    for i in range(400):  # 3 s straight at speed action 1, then full lock
        s = 0.0 if i < 300 else 1.0
        v_new, steer_new, w = car_step(dyn, v, steer, 0.0, 1.0, s, True, xp=np)
        v_mid = 0.5 * (v + v_new)
        k = v_mid * np.tan(steer_new) / dyn.wheelbase
        assert w == pytest.approx(k / (1.0 + dyn.understeer * (v_mid * k) ** 2), rel=1e-12)
        again = car_step(dyn, v, steer, 5.0, 1.0, s, True, xp=np)  # another yaw rate in
        np.testing.assert_array_equal(np.array(again), np.array((v_new, steer_new, w)))
        v, steer = v_new, steer_new
    tyre = car("tyre", actuator="speed")
    assert tyre.model == "tyre" and tyre.steer_tau != dyn.steer_tau
    with pytest.raises(ValueError, match="unknown car model 'slick'"):
        car("slick")


def test_the_task_chooses_the_jax_car():
    """env.car reaches the simulator the runner and the evaluation build (rl.factory.make_sim
    from the task), and a simulator whose dynamics disagree with its task is refused."""
    from rl import factory
    from rl.config import RLConfig
    from rl.evaluate import _task

    cfg = RLConfig()
    assert factory.make_sim(factory.task_config(cfg)).dynamics.model == "kinematic"
    import dataclasses

    tyre_cfg = dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, car="tyre"))
    sim = factory.make_sim(factory.task_config(tyre_cfg))
    assert sim.dynamics == car("tyre")
    assert _task(10.0, True, False, "speed", "tyre").car == "tyre"
    assert JaxRacecarEnv("procedural:0", TaskConfig(car="tyre")).sim.dynamics.model == "tyre"
    with pytest.raises(ValueError, match="the task's car 'tyre' is not the dynamics' model"):
        JaxRacecar(TaskConfig(car="tyre"), Dynamics())
    with pytest.raises(ValueError):
        TaskConfig(car="slick")


def test_tyre_lock_car_loses_front_grip_only_under_hard_speed_braking():
    """The "tyre_lock" car (TYRE_LOCK_CAR) is the tyre car whose front tyre loses grip while
    the speed actuator holds the wheels far below the car's speed (Dynamics.speed_brake_*).
    From calibration.LOCK_ENTRY (~2.9 m/s) at full lock: with the target at ~0 m/s it yaws
    less than the tyre car in the first 0.4 s; with a target near the car's speed, on the
    motor actuator, and with speed_brake_loss = 0 it is exactly the tyre car."""
    from rl.envs import calibration as cal
    from rl.envs.jax_env import CARS

    assert CARS["tyre_lock"]["model"] == "tyre"
    n = cal.SCRUB_AT + cal.LOCK_STEPS
    at = cal.SCRUB_AT - 1

    def yaw(dyn, pol, k=40):
        tr = cal.open_floor_jax(dyn, pol, n)
        return float(tr[at + k, 2] - tr[at, 2]), tr

    tyre, lock = car("tyre", actuator="speed"), car("tyre_lock", actuator="speed")
    hard = cal.scrub_policy(-1.0, 1.0, entry=cal.LOCK_ENTRY)
    y_tyre, _ = yaw(tyre, hard)
    y_lock, _ = yaw(lock, hard)
    assert y_tyre < -0.25 and -0.25 < y_lock < 0.6 * y_tyre, (y_tyre, y_lock)
    # a target close to the car's speed: the wheels do not slide, the cars are one
    near = cal.scrub_policy(0.3, 1.0, entry=cal.LOCK_ENTRY)
    np.testing.assert_array_equal(yaw(tyre, near)[1], yaw(lock, near)[1])
    # no loss: exactly the tyre car, hard braking included
    off = car("tyre_lock", actuator="speed", speed_brake_loss=0.0)
    np.testing.assert_array_equal(yaw(tyre, hard)[1], yaw(off, hard)[1])
    # the motor actuator's brake has its own grip loss (brake_yaw_*), untouched
    brake = cal.brake_turn_policy(-1.0)
    np.testing.assert_array_equal(cal.open_floor_jax(car("tyre"), brake, 450),
                                  cal.open_floor_jax(car("tyre_lock"), brake, 450))


def test_the_task_chooses_the_tyre_lock_car():
    """env.car = "tyre_lock" reaches the simulator (rl.factory.make_sim) with its constants."""
    import dataclasses

    from rl import factory
    from rl.config import RLConfig

    cfg = RLConfig()
    cfg = dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, car="tyre_lock"))
    sim = factory.make_sim(factory.task_config(cfg))
    assert sim.dynamics == car("tyre_lock") and sim.dynamics.speed_brake_loss > 0
    assert JaxRacecarEnv("procedural:0", TaskConfig(car="tyre_lock")).sim.dynamics.model == "tyre"
    with pytest.raises(ValueError, match="the task's car 'tyre_lock' is not the dynamics'"):
        JaxRacecar(TaskConfig(car="tyre_lock"), Dynamics())


def test_the_calibration_grid_recovers_a_known_car(tmp_path):
    """benchmarks.envs.grid_dynamics against traces of a known car (the "PyBullet" cache
    written from the JAX tyre_lock car itself): the grid's best set is that car's, well ahead
    of the next, and a bad grid is refused with the reason."""
    from benchmarks import envs as bench
    from rl.envs.calibration import open_floor_jax

    truth = car("tyre_lock")
    cache = tmp_path / "traces.npz"
    np.savez(cache, **{k: open_floor_jax(truth, pol, n)
                       for k, (n, pol) in bench.fit_protocols().items()})
    lock = truth.speed_brake_loss
    out = bench.grid_dynamics(f"speed_brake_loss=0,{lock};"
                              f"speed_brake_slip0={truth.speed_brake_slip0},0.8;"
                              f"speed_brake_loss_v=1,{truth.speed_brake_loss_v}",
                              str(cache), base="tyre", protocols_prefix="lock")
    best_rms, best = out[0]
    assert best == {"speed_brake_loss": lock, "speed_brake_slip0": truth.speed_brake_slip0,
                    "speed_brake_loss_v": truth.speed_brake_loss_v}
    # (not 0: the residual compares a smoothed reference yaw rate with the raw one)
    assert len(out) == 8 and best_rms < 0.6 * out[1][0], out
    with pytest.raises(SystemExit, match="not field=v1"):
        bench.grid_dynamics("speed_brake_loss", str(cache))
    with pytest.raises(SystemExit, match="no fit protocol starts with 'nope'"):
        bench.grid_dynamics("speed_brake_loss=0", str(cache), protocols_prefix="nope")
