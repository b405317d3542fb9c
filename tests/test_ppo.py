"""PPO: the loss pieces against hand-computed values, and both runners learning."""

from __future__ import annotations

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _toy_envs import Clock, PointMass, PointMassGym, clock_gym
from flax import nnx

from rl.agent import MLPActorCritic
from rl.ppo_core import PPOConfig, RunningMeanStd, gae, ppo_loss
from rl.runners import FastRunner, GymRunner


def test_gae_by_hand():
    # one env, three steps; the episode terminates after step 1, step 2 is truncated
    r = jnp.array([[1.0], [2.0], [3.0]])
    v = jnp.array([[0.5], [1.0], [1.5]])
    term = jnp.array([[False], [True], [False]])
    trunc = jnp.array([[False], [False], [True]])
    final_v = jnp.array([[0.0], [0.0], [4.0]])
    adv, ret = gae(r, v, term, trunc, jnp.array([9.0]), 0.9, 0.8, final_v)
    d2 = 3.0 + 0.9 * 4.0 - 1.5  # truncated: bootstrap from the final observation's value
    d1 = 2.0 - 1.0  # terminated: no bootstrap
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    a1 = d1
    a0 = d0 + 0.9 * 0.8 * a1
    np.testing.assert_allclose(adv[:, 0], [a0, a1, d2], rtol=1e-6)
    np.testing.assert_allclose(ret, adv + v, rtol=1e-6)


def test_ppo_loss_clipping_by_hand():
    cfg = PPOConfig(clip_eps=0.2, vf_coef=0.5, ent_coef=0.01, norm_adv=False, clip_value=True)
    old_lp = jnp.zeros(2)
    new_lp = jnp.log(jnp.array([1.5, 0.5]))  # ratios 1.5 and 0.5
    adv = jnp.array([1.0, -1.0])
    total, info = ppo_loss(
        new_lp, old_lp, adv, jnp.array([2.0, 0.0]), jnp.array([1.0, 0.0]),
        jnp.array([1.0, 1.0]), jnp.array([0.3, 0.3]), cfg,
    )  # fmt: skip
    # ratio 1.5, A=+1: min(1.5, 1.2) = 1.2 → −1.2; ratio 0.5, A=−1: min(−0.5, −0.8) = −0.8 → 0.8
    assert float(info.policy) == pytest.approx((-1.2 + 0.8) / 2)
    # value: v=2 (clipped to 1.2) vs ret 1 → max(1, 0.04) = 1; v=0 → 1; 0.5 · mean = 0.5
    assert float(info.value) == pytest.approx(0.5)
    assert float(total) == pytest.approx(-0.2 + 0.5 * 0.5 - 0.01 * 0.3)
    assert float(info.clip_frac) == 1.0


def test_advantage_normalization_per_minibatch():
    cfg = PPOConfig(norm_adv=True, clip_eps=10.0, vf_coef=0.0)
    adv = jnp.array([1.0, 2.0, 3.0, 4.0])
    lp = jnp.zeros(4)
    _, info = ppo_loss(lp, lp, adv, lp, lp, lp, lp, cfg)
    assert float(info.policy) == pytest.approx(0.0, abs=1e-6)  # ratio 1: −mean(normalized A) = 0


def test_running_mean_std_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (1000, 3))
    rms = RunningMeanStd.create((3,))
    for chunk in np.split(x, 10):
        rms = rms.update(jnp.asarray(chunk))
    np.testing.assert_allclose(rms.mean, x.mean(0), rtol=1e-3)
    np.testing.assert_allclose(rms.var, x.var(0), rtol=1e-3)


def _random_return(env, key, n=64):
    rets = []
    for k in jax.random.split(key, n):
        obs, s = env.reset(k, None)
        total = 0.0
        for t in range(env.max_steps):
            a = jax.random.uniform(jax.random.fold_in(k, t), (2,), minval=-1, maxval=1)
            obs, s, r, *_ = env.step(k, s, a, None)
            total += float(r)
        rets.append(total)
        if len(rets) >= 4:
            break
    return float(np.mean(rets))


@pytest.fixture(scope="module")
def fast_result():
    env = PointMass()
    cfg = PPOConfig(num_envs=32, num_steps=64, total_timesteps=32 * 64 * 40, learning_rate=1e-3)
    model = MLPActorCritic(env.obs_dim, env.action_dim, (64, 64), rngs=nnx.Rngs(0))
    runner = FastRunner(env, model, cfg)
    rs = runner.init(jax.random.key(0))
    rs, m0 = runner.run(rs, 1)
    rs, m = runner.run(rs, 39)
    return env, runner, rs, m0, m


def test_fast_runner_solves_point_mass(fast_result):
    env, runner, rs, m0, m = fast_result
    first = float(np.nanmean(m0["episode/ep_return"]))
    last = float(np.nanmean(m["episode/ep_return"][-5:]))
    rand = _random_return(env, jax.random.key(1))
    assert last > first + 30 and last > rand + 30, (first, last, rand)
    assert last > -15.0  # near the optimum (≈ −6); a policy that stands still scores ≈ −50


def _vector(make, n):
    return gym.vector.SyncVectorEnv([make for _ in range(n)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def test_both_runners_normalize_and_learn_alike():
    """On an environment whose observations depend only on time, both runners fold the same
    observations into the statistics before normalizing them, so they record the same
    normalized observations and end with the same statistics; given one rollout, their
    learning steps give the same parameters."""
    n, steps = 4, 7  # episodes of 5 steps: resets inside the rollout
    cfg = PPOConfig(num_envs=n, num_steps=steps, total_timesteps=n * steps * 4, norm_obs=True)
    model = MLPActorCritic(3, 2, (16,), rngs=nnx.Rngs(0))
    fast = FastRunner(Clock(5), model, cfg)
    gymr = GymRunner(_vector(lambda: clock_gym(5), n), model, cfg)
    fs, gs = fast.init(jax.random.key(0)), gymr.init(jax.random.key(0))
    rollout = jax.jit(fast.rollout)
    for _ in range(2):  # two rollouts: the statistics carry over from one to the next
        fs, ftraj, _ = rollout(fs)
        gs, gtraj, _ = gymr.rollout(gs)
        np.testing.assert_allclose(np.asarray(ftraj.obs), np.asarray(gtraj.obs), rtol=1e-5,
                                   atol=1e-6)
        for a, b in zip(fs.obs_rms, gs.obs_rms, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
    # the statistics hold every observation acted on: 2 rollouts × steps × envs (+ 1e-4)
    assert float(gs.obs_rms.count) == pytest.approx(2 * steps * n, abs=1e-3)
    np.testing.assert_array_equal(np.asarray(ftraj.truncated), np.asarray(gtraj.truncated))
    np.testing.assert_allclose(np.asarray(ftraj.final_value), np.asarray(gtraj.final_value),
                               rtol=1e-5, atol=1e-6)
    # one rollout through both learning steps
    key = jax.random.key(4)
    last = jnp.asarray(gs.obs)
    p1, _, _ = fast.learn(gs.params, gs.opt_state, gs.frozen, gs.obs_rms, gtraj, last, key)
    p2, _, _ = gymr.learn(gs.params, gs.opt_state, gs.frozen, gs.obs_rms, gtraj, last, key)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    assert not np.allclose(np.asarray(jax.tree.leaves(p1)[0]),
                           np.asarray(jax.tree.leaves(gs.params)[0]))


def test_runners_keep_the_same_state():
    """One state type for both runners; the checkpointed part is the learner for both (the
    fast runner also keeps its environments)."""
    from rl.runners import LEARNER_FIELDS, RunnerState

    cfg = PPOConfig(num_envs=2, num_steps=4, total_timesteps=64)
    model = MLPActorCritic(3, 2, (8,), rngs=nnx.Rngs(0))
    fast = FastRunner(Clock(5), model, cfg)
    gymr = GymRunner(_vector(lambda: clock_gym(5), 2), model, cfg)
    fs, gs = fast.init(jax.random.key(0)), gymr.init(jax.random.key(0))
    assert type(fs) is type(gs) is RunnerState
    assert set(LEARNER_FIELDS) <= set(fast.checkpoint(fs)) and \
        set(gymr.checkpoint(gs)) == set(LEARNER_FIELDS)
    gs2, m = gymr.run(gs, 2)
    assert int(gs2.update) == 2 and m["loss/total"].shape == (2,)
    restored = gymr.restore(gs, gymr.checkpoint(gs2))
    assert int(restored.update) == 2
    gs3, m = gymr.run(gs, 3, stop=lambda: True)  # a preemption stops between updates
    assert int(gs3.update) == 1 and m["loss/total"].shape == (1,)


def test_gym_runner_learns():
    envs = gym.vector.SyncVectorEnv(
        [lambda: PointMassGym() for _ in range(8)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    cfg = PPOConfig(num_envs=8, num_steps=64, total_timesteps=8 * 64 * 25, learning_rate=1e-3)
    model = MLPActorCritic(6, 2, (64, 64), rngs=nnx.Rngs(1))
    runner = GymRunner(envs, model, cfg, info_keys=("distance",))
    st = runner.init(jax.random.key(0))
    st, m = runner.update(st)
    first = m["episode/ep_return"]
    for _ in range(24):
        st, m = runner.update(st)
    assert m["episode/ep_return"] > first + 20, (first, m["episode/ep_return"])
    assert np.isfinite(m["episode/distance"])


class _WithEncoder(nnx.Module):
    def __init__(self, rngs):
        self.encoder = nnx.Linear(6, 8, rngs=rngs)
        self.head = MLPActorCritic(8, 2, (16,), rngs=rngs)

    def __call__(self, obs):
        return self.head(jnp.tanh(self.encoder(obs)))


def test_frozen_encoder_gets_no_update():
    env = PointMass()
    cfg = PPOConfig(num_envs=8, num_steps=16, total_timesteps=8 * 16 * 3)
    model = _WithEncoder(nnx.Rngs(0))
    before = np.asarray(model.encoder.kernel[...]).copy()
    trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("encoder")))
    runner = FastRunner(env, model, cfg, trainable=trainable)
    rs = runner.init(jax.random.key(0))
    head_before = np.asarray(jax.tree.leaves(rs.params)[0]).copy()
    rs, _ = runner.run(rs, 3)
    after = runner.model(rs)
    np.testing.assert_array_equal(np.asarray(after.encoder.kernel[...]), before)
    assert not np.array_equal(np.asarray(jax.tree.leaves(rs.params)[0]), head_before)
    # no optimizer state for the frozen encoder
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(rs.opt_state)]
    assert paths and not any("encoder" in p for p in paths)


def test_progress_line_says_dash_not_nan():
    """A chunk in which no episode ended (or no lap was completed) has NaN episode statistics:
    the log line writes "—" for them, never "nan"."""
    from rl.ppo import progress_line, summarize

    m = summarize({"episode/ep_return": np.full(3, np.nan), "episode/laps": np.full(3, np.nan),
                   "episode/lap_time": np.full(3, np.nan), "episodes": np.zeros(3)})
    m["sps"] = 1234.0
    line = progress_line(3, 10, 3072, m)
    assert "nan" not in line.lower() and "none" not in line.lower()
    assert "lap time —  sps 1234" in line and "laps —" in line and "collisions —" in line
    m.update({"episode/laps": 1.5, "episode/lap_time": 31.25, "episode/ep_return": 150.0})
    line = progress_line(3, 10, 3072, m)
    assert "laps 1.50" in line and "lap time 31.2 s" in line and "return 150.0" in line
