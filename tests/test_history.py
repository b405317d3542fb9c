"""model.history (issue 12's lever "two frames stacked plus the previous action"): the JAX
backend's observations carry the previous policy step's scan and action, the host backends'
through rl.envs.wrappers (the same numbers), the lidar MLP reads them, PPO trains with them
and rl.evaluate drives such a policy in both kinds of rollout."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etl import configlib
from rl import evaluate as ev
from rl.agent import lidar_feature_dim, lidar_features
from rl.config import load_config
from rl.envs import spec
from rl.envs.functional import RacecarFunctional
from rl.envs.jax_env import JaxRacecar, JaxRacecarEnv, SensorConfig, make_params
from rl.envs.spec import TaskConfig
from rl.envs.wrappers import ActionRepeat, History

ROOT = Path(__file__).resolve().parents[1]
TRACK = "procedural:0"
RAYS = 108


@pytest.fixture(scope="module")
def params():
    return make_params(TRACK)


def _actions(n: int) -> np.ndarray:
    """Varied commands, some outside [-1, 1] (the history holds them clipped)."""
    t = np.arange(n, dtype=np.float32)
    return np.stack([0.4 + 0.9 * np.sin(0.7 * t), 1.6 * np.cos(0.5 * t)], 1).astype(np.float32)


def _functional_run(params, history: bool, n: int = 12):
    sim = JaxRacecar(TaskConfig(reset_mode="random", time_limit=30.0),
                     sensors=SensorConfig(lidar_rays=RAYS, history=history))
    fenv = RacecarFunctional(sim, lambda o: o, action_repeat=spec.LIDAR_PERIOD)
    obs, carry = jax.jit(fenv.reset)(jax.random.PRNGKey(3), params)
    step = jax.jit(fenv.step)
    out = [(obs, carry[0])]
    for t, a in enumerate(_actions(n)):
        obs, carry, *_ = step(jax.random.PRNGKey(100 + t), carry, jnp.asarray(a), params)
        out.append((obs, carry[0]))
    return out


def test_jax_history_is_the_previous_policy_steps_scan_and_action(params):
    run = _functional_run(params, history=True)
    acts = np.clip(_actions(len(run) - 1), -1.0, 1.0)
    obs0 = run[0][0]
    np.testing.assert_array_equal(obs0["lidar_prev"], obs0["lidar"])  # the reset's own scan
    np.testing.assert_array_equal(obs0["action_prev"], np.zeros(2))
    for t in range(1, len(run)):
        obs, prev = run[t][0], run[t - 1][0]
        np.testing.assert_array_equal(obs["lidar_prev"], prev["lidar"])
        assert not np.array_equal(obs["lidar"], prev["lidar"])  # a new scan every policy step
        np.testing.assert_allclose(obs["action_prev"], acts[t - 1], atol=1e-6)
    assert (np.abs(_actions(len(run) - 1)) > 1).any()  # the clipping was exercised


def test_observation_lag_delays_the_scans_not_the_command(params):
    """With racecar_gym's one-step observation lag (randomize.obs_lag = 1) the policy sees
    the scans a step late, lidar_prev too, but the command it gave last is its own: fresh."""
    from rl.config import RandomizeConfig

    sim = JaxRacecar(TaskConfig(reset_mode="random", time_limit=30.0),
                     sensors=SensorConfig(lidar_rays=RAYS, history=True),
                     randomize=RandomizeConfig(obs_lag=1.0))
    fenv = RacecarFunctional(sim, lambda o: o, action_repeat=spec.LIDAR_PERIOD)
    obs, carry = jax.jit(fenv.reset)(jax.random.PRNGKey(3), params)
    step = jax.jit(fenv.step)
    seen, true = [obs], [carry[0].obs_prev]  # what the policy saw; what was sensed
    for t, a in enumerate(_actions(6)):
        obs, carry, *_ = step(jax.random.PRNGKey(100 + t), carry, jnp.asarray(a), params)
        seen.append(obs)
        true.append(carry[0].obs_prev)
    acts = np.clip(_actions(6), -1.0, 1.0)
    for t in range(2, len(seen)):
        np.testing.assert_array_equal(seen[t]["lidar"], true[t - 1]["lidar"])  # a step late
        np.testing.assert_array_equal(seen[t]["lidar_prev"], true[t - 2]["lidar"])
        np.testing.assert_allclose(seen[t]["action_prev"], acts[t - 1], atol=1e-6)  # fresh


def test_jax_history_is_observation_only_and_off_by_default(params):
    """The same episode with and without history: the same car, scans and rewards; without
    it the observation and the state hold nothing new (today's environment exactly)."""
    on, off = _functional_run(params, True), _functional_run(params, False)
    for (o1, s1), (o0, s0) in zip(on, off, strict=True):
        assert set(o1) - set(o0) == {"lidar_prev", "action_prev"}
        for k in o0:
            np.testing.assert_array_equal(o1[k], o0[k])
        np.testing.assert_array_equal(s1.pos, s0.pos)
        assert s0.lidar_prev is None and s0.action_prev is None
    env = JaxRacecarEnv(TRACK, TaskConfig(), sensors=SensorConfig(lidar_rays=RAYS, history=True))
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)


def test_host_wrapper_keeps_the_policy_steps_history():
    env = History(ActionRepeat(JaxRacecarEnv(TRACK, TaskConfig(reset_mode="grid")),
                               spec.LIDAR_PERIOD))
    obs, _ = env.reset(seed=1)
    assert env.observation_space.contains(obs)
    np.testing.assert_array_equal(obs["lidar_prev"], obs["lidar"])
    np.testing.assert_array_equal(obs["action_prev"], np.zeros(2))
    for a in _actions(5):
        last = obs["lidar"].copy()
        obs, *_ = env.step(spec.action_dict(a))
        np.testing.assert_array_equal(obs["lidar_prev"], last)
        np.testing.assert_allclose(obs["action_prev"], np.clip(a, -1, 1))
        assert env.observation_space.contains(obs)
    obs, _ = env.reset(seed=2)  # a reset forgets the past episode
    np.testing.assert_array_equal(obs["lidar_prev"], obs["lidar"])
    np.testing.assert_array_equal(obs["action_prev"], np.zeros(2))


def test_scan_and_host_rollouts_give_a_history_policy_the_same_drive():
    """A policy that steers on its previous scan and action drives the same in the JAX
    backend's scan (history in the simulator) and in the host loop (history kept at the
    policy's rate): the two agree on what "previous" is."""
    from rl.drivers import gap_follower

    def pol(obs):
        a = spec.action_array(gap_follower(obs["lidar_prev"]), jnp)
        return a.at[1].add(0.3 * obs["action_prev"][1])

    kw = dict(episodes=1, time_limit=1.2, seed=3, action_repeat=spec.LIDAR_PERIOD,
              history=True)
    scan = ev.evaluate_policy(pol, TRACK, "jax", rollout="scan", **kw)
    host = ev.evaluate_policy(pol, TRACK, "jax", rollout="host", **kw)
    assert scan["rollout"] == "scan" and host["rollout"] == "host"
    a, b = scan["traces"][0], host["traces"][0]
    assert len(a["time"]) == len(b["time"]) == 121
    np.testing.assert_allclose(a["x"], b["x"], atol=2e-3)
    np.testing.assert_allclose(a["y"], b["y"], atol=2e-3)
    without = ev.evaluate_policy(lambda o: gap_follower(o["lidar"]), TRACK, "jax",
                                 rollout="scan", **{**kw, "history": False})
    assert np.abs(without["traces"][0]["y"] - a["y"]).max() > 1e-3  # the history mattered
    with pytest.raises(ValueError, match="lidar's period"):
        ev.evaluate_policy(pol, TRACK, "jax", **{**kw, "action_repeat": 2})


def test_lidar_features_stack_the_previous_scan_and_action():
    rng = np.random.default_rng(0)
    obs = {"lidar": rng.uniform(0.3, 15, 1080).astype(np.float32),
           "lidar_prev": rng.uniform(0.3, 15, 1080).astype(np.float32),
           "velocity": rng.normal(size=6).astype(np.float32),
           "action_prev": np.array([0.5, -0.25], np.float32)}
    x = np.asarray(lidar_features(obs, 108, history=True))
    assert x.shape == (lidar_feature_dim(108, "planar", True),) == (108 + 3 + 108 + 2,)
    np.testing.assert_allclose(x[:111], np.asarray(lidar_features(obs, 108)))  # today's first
    np.testing.assert_allclose(x[111:219], obs["lidar_prev"][::10] / 15.25, rtol=1e-6)
    np.testing.assert_array_equal(x[219:], obs["action_prev"])
    del obs["action_prev"]
    with pytest.raises(KeyError, match="action_prev"):
        lidar_features(obs, 108, history=True)


def test_history_config_is_checked():
    tiny = ROOT / "configs/rl_tiny.toml"
    with pytest.raises(configlib.ConfigError, match="model.history: the lidar MLP"):
        load_config(tiny, ["model.history=true", "model.policy='multimodal'"])
    with pytest.raises(configlib.ConfigError, match="env.action_repeat = 4"):
        load_config(tiny, ["model.history=true", "env.action_repeat=2"])
    from rl.imitate import run as imitate

    with pytest.raises(configlib.ConfigError, match="PPO only"):
        imitate(load_config(tiny, ["model.history=true"]))


def test_ppo_trains_and_evaluates_a_history_policy(tmp_path):
    """PPO with model.history in the JAX backend, its checkpoint restored with the wider input,
    and rl.evaluate driving it (the JAX scan and the host loop of another backend's path)."""
    from rl.factory import restore_policy
    from rl.ppo import EXIT_OK, run

    cfg = load_config(ROOT / "configs/rl_tiny.toml", [
        f"runs_dir='{tmp_path}'", "run_name='h'", "model.history=true", "ppo.num_envs=8",
        "ppo.num_steps=16", "ppo.num_minibatches=2", "ppo.update_epochs=1",
        "ppo.total_timesteps=256", "model.hidden=[16]", "env.time_limit=5.0",
        "updates_per_log=1", "ckpt_every=2"])  # fmt: skip
    assert run(cfg) == EXIT_OK
    rcfg, model, obs_rms = restore_policy(tmp_path / "h/ckpt")
    assert rcfg.model.history and obs_rms.mean.shape == (108 + 3 + 108 + 2,)
    rep = ev.evaluate_checkpoint(tmp_path / "h/ckpt", [TRACK], tmp_path / "eval",
                                 episodes=1, time_limit=2.0, collision="terminate", plots=False)
    res = rep["results"]["terminate"]["tracks"][TRACK]
    assert res["rollout"] == "scan" and res["episodes"][0]["duration_s"] > 0
