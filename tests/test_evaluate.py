"""rl.evaluate: metric arithmetic by hand, the scripted gap follower through the CLI in the JAX
backend (metrics, JSON, PNG), a short PyBullet episode through the same code, the JAX scan
against the host loop, and the checkpoint path (a saved untrained runner; a real tiny PPO run
under the ``slow`` marker)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rl import evaluate as ev

TRACK = "procedural:0"  # ~61 m; the JAX gap follower laps it in ~18 s


# ----------------------------------------------------------------------------- arithmetic
def test_lap_times_from_crossing_times():
    t = np.arange(8) * 1.0
    # starts on lap 1 at t=0: lap 1 ends at the first crossing (t=3), lap 2 at t=6
    assert ev.lap_times([1, 1, 1, 2, 2, 2, 3, 3], t) == [3.0, 3.0]
    # spawned behind the line (lap 0): lap 1 starts at its first crossing
    assert ev.crossing_times([0, 0, 1, 1, 1, 2, 2, 2], t) == {1: 2.0, 2: 5.0}
    assert ev.lap_times([0, 0, 1, 1, 1, 2, 2, 2], t) == [3.0]
    # backing over the line and crossing again does not restart the lap
    assert ev.lap_times([1, 1, 2, 1, 2, 2, 3, 3], t) == [2.0, 4.0]
    assert ev.lap_times([1] * 8, t) == []
    assert ev.lap_times([0, 0, 1, 1, 1, 1, 1, 1], t) == []  # crossed, no lap completed


def test_collisions_per_km_from_a_synthetic_trace():
    assert ev.rising_edges([0, 1, 1, 0, 1, 0, 0, 1]) == 3
    assert ev.rising_edges([1, 1, 0]) == 1 and ev.rising_edges([]) == 0
    # debounced: runs separated by fewer than min_gap clear steps are one event
    assert ev.rising_edges([1, 0, 1, 0, 0, 0, 1, 1, 0, 1], min_gap=3) == 2
    assert ev.rising_edges([1, 0, 1, 0, 0, 0, 1, 1, 0, 1], min_gap=4) == 1
    assert ev.rising_edges([0, 1, 0, 0], min_gap=50) == 1
    n = 1001  # 10 s at 100 Hz along +x at 2 m/s: 20 m
    t = np.arange(n) * 0.01
    coll = np.zeros(n, bool)
    coll[100:120] = True  # one contact held for 20 steps
    coll[500] = coll[502] = True  # two more events
    lap = np.where(t < 4.0, 1, np.where(t < 9.0, 2, 3))
    trace = {"time": t, "x": 2.0 * t, "y": np.zeros(n), "speed": np.full(n, 2.0),
             "lap": lap, "total": lap + 0.5, "collision": coll}  # fmt: skip
    m = ev.episode_metrics(trace, "time_limit")
    assert m["contacts"] == 3 and m["collision_steps"] == 22
    assert m["contacts_debounced"] == 2  # 500 and 502 are 1 clear step apart (< 0.5 s)
    assert m["distance_m"] == pytest.approx(20.0)
    assert m["collisions_per_km"] == pytest.approx(3 / 0.020)
    assert m["mean_speed"] == pytest.approx(2.0)
    assert m["lap_times"] == pytest.approx([4.0, 5.0]) and m["laps"] == pytest.approx(2.5)
    assert not m["collision_free"]
    # aggregates pool contacts over distance; zero distance with a contact is undefined
    clean = dict(m, contacts=0, contacts_debounced=0, collision_free=True,
                 collisions_per_km=0.0, laps=1.5, lap_times=[])  # fmt: skip
    a = ev.aggregate([m, clean])
    assert a["collisions_per_km"] == pytest.approx(3 / 0.040)
    assert a["collisions_per_km_debounced"] == pytest.approx(2 / 0.040)
    assert a["collision_free_fraction"] == 0.5
    assert a["laps_mean"] == pytest.approx(2.0) and a["laps_std"] == pytest.approx(0.5)
    assert a["lap_times"] == pytest.approx([4.0, 5.0])
    assert math.isnan(ev.collisions_per_km(1, 0.0)) and ev.collisions_per_km(0, 0.0) == 0.0
    assert json.loads(json.dumps(ev._json_safe({"x": float("nan"), "y": np.float32(1)}))) == {
        "x": None, "y": 1.0}


# ----------------------------------------------------------------------------- scripted, JAX
@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_scripted")
    code = ev.main(["--scripted", "--backend", "jax", "--tracks", TRACK, "--episodes", "2",
                    "--time-limit", "24", "--collision", "continue",
                    "--out", str(out)])  # fmt: skip
    assert code == 0
    return out


def test_scripted_driver_metrics_json_and_png(scripted_run):
    rep = json.loads((scripted_run / "metrics.json").read_text())
    assert rep["backend"] == "jax" and rep["command"].startswith("python -m rl.evaluate")
    assert rep["protocol"]["seeds"] == [0, 1] and rep["protocol"]["time_limit_s"] == 24.0
    res = rep["results"]["continue"]["tracks"][TRACK]
    assert res["rollout"] == "scan"
    agg = res["aggregate"]
    assert agg["episodes"] == 2 and len(res["episodes"]) == 2
    assert agg["laps_mean"] > 1.0  # the gap follower laps the track within 24 s
    for e in res["episodes"]:
        assert e["completed_laps"] >= 1 and len(e["lap_times"]) == e["completed_laps"]
        assert 10.0 < e["lap_times"][0] < 24.0
        assert e["duration_s"] == pytest.approx(24.0) and e["end"] == "time_limit"
        assert math.isfinite(e["collisions_per_km"]) and e["distance_m"] > 60.0
        assert 1.0 < e["mean_speed"] < 4.0
    assert math.isfinite(agg["collisions_per_km"]) and agg["lap_time_mean"] > 10.0
    assert rep["results"]["continue"]["overall"]["episodes"] == 2
    pngs = [Path(p) for p in rep["plots"]]
    assert len(pngs) == 1 and pngs[0].exists() and pngs[0].stat().st_size > 10_000
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jax_scan_matches_host_loop():
    """The scanned rollout records the same physics steps as a Python loop over the same
    simulator (JaxRacecarEnv), seeded alike."""
    from rl.drivers import gap_follower

    pol = lambda obs: gap_follower(obs["lidar"])  # noqa: E731
    kw = dict(episodes=1, time_limit=1.2, seed=3, action_repeat=4)
    scan = ev.evaluate_policy(pol, TRACK, "jax", rollout="scan", **kw)
    host = ev.evaluate_policy(pol, TRACK, "jax", rollout="host", **kw)
    assert scan["rollout"] == "scan" and host["rollout"] == "host"
    a, b = scan["traces"][0], host["traces"][0]
    assert len(a["time"]) == len(b["time"]) == 121
    np.testing.assert_allclose(a["time"], b["time"], atol=1e-5)
    np.testing.assert_allclose(a["x"], b["x"], atol=2e-3)
    np.testing.assert_allclose(a["y"], b["y"], atol=2e-3)
    assert scan["episodes"][0]["laps"] == pytest.approx(host["episodes"][0]["laps"], abs=1e-3)


def test_start_pose_instead_of_the_grid(tmp_path, capsys):
    """--start: every episode starts at rest from the pose given (the trace's first point,
    the protocol record); a pose off the road, a malformed one, or another backend: exit 2
    with one line."""
    from rl.tracks import load_track

    trk = load_track(TRACK)
    x, y = (float(v) for v in trk.centreline[len(trk.centreline) // 3])
    nx, ny = (float(v) for v in trk.centreline[len(trk.centreline) // 3 + 1])
    yaw = math.degrees(math.atan2(ny - y, nx - x))
    out = tmp_path / "start"
    assert ev.main(["--scripted", "--tracks", TRACK, "--episodes", "1", "--time-limit", "1",
                    f"--start={x},{y},{yaw}", "--no-plots", "--out", str(out)]) == 0
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["protocol"]["start"] == {"x": x, "y": y, "yaw_deg": yaw}
    from rl.drivers import gap_follower

    res = ev.evaluate_policy(lambda obs: gap_follower(obs["lidar"]), TRACK, "jax",
                             episodes=1, time_limit=1.0, start=(x, y, yaw))
    tr = res["traces"][0]
    assert (tr["x"][0], tr["y"][0]) == pytest.approx((x, y), abs=1e-4)
    assert tr["speed"][0] == 0.0 and res["episodes"][0]["distance_m"] > 0.3  # it drove off
    grid = ev.evaluate_policy(lambda obs: gap_follower(obs["lidar"]), TRACK, "jax",
                              episodes=1, time_limit=0.1)["traces"][0]
    assert np.hypot(grid["x"][0] - x, grid["y"][0] - y) > 5.0  # not the grid's pose
    capsys.readouterr()
    far = trk.origin[0] - 50.0
    assert ev.main(["--scripted", "--tracks", TRACK, "--episodes", "1", "--time-limit", "1",
                    f"--start={far},0,0", "--no-plots", "--out", str(out)]) == 2
    assert "is not on the road" in capsys.readouterr().err
    assert ev.main(["--scripted", "--backend", "bullet", "--tracks", TRACK, f"--start={x},{y},0",
                    "--no-plots", "--out", str(out)]) == 2
    assert "JAX backend" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ev.main(["--scripted", "--tracks", TRACK, "--start", "1,2"])
    assert e.value.code == 2


def test_summary_line_says_dash_not_nan_or_none():
    """No lap completed (no lap time, best None) and a contact without distance (collisions
    per km undefined): the log line writes "—", not "nan" or "None"."""
    stuck = {"time": np.arange(4) * 0.01, "x": np.zeros(4), "y": np.zeros(4),
             "speed": np.zeros(4), "lap": np.ones(4), "total": np.full(4, 1.1),
             "collision": np.array([0, 1, 1, 0], bool)}  # fmt: skip
    a = ev.aggregate([ev.episode_metrics(stuck, "time_limit")])
    assert math.isnan(a["lap_time_mean"]) and a["best_lap_time"] is None
    assert math.isnan(a["collisions_per_km"])
    line = ev.summary_line({"aggregate": a, "wall_s": 1.0, "rollout": "host"})
    assert "nan" not in line.lower() and "none" not in line
    assert "lap time — (best —)" in line and "— collisions/km" in line
    assert "laps 0.10 ± 0.00" in line


# ----------------------------------------------------------------------------- host envs
class FakeHostEnv:
    """racecar_gym-like: the observation is the true state plus noise and an offset (as its
    noisy, one-step-stale sensors), ``info`` holds the true pose and velocity (drop them with
    ``info_state=False``); the car's motion draws from the global ``np.random``, as
    racecar_gym's sensor noise does (through the policy). Counts instances and closes."""

    made = closed = 0

    def __init__(self, info_state: bool = True, steps: int = 20):
        import gymnasium as gym

        self.action_space = gym.spaces.Dict({  # racecar_gym's: the motor and the steering
            "motor": gym.spaces.Box(-1.0, 1.0, (1,), np.float32),
            "steering": gym.spaces.Box(-1.0, 1.0, (1,), np.float32)})
        type(self).made += 1
        self.info_state, self.steps = info_state, steps

    def reset(self, seed=None, options=None):
        self.t, self.x = 0, 0.0
        return self._obs(), self._info()

    def step(self, action):
        self.t += 1
        self.x += 0.1 + np.random.uniform(0.0, 0.01)  # noqa: NPY002 - racecar_gym's way
        return self._obs(), 0.0, False, self.t >= self.steps, self._info()

    def _obs(self):
        return {"pose": np.array([self.x + 7.0, 3.0, 0, 0, 0, 0], np.float32),
                "velocity": np.array([3.0, 4.0, 0, 0, 0, 0], np.float32),
                "time": np.array([self.t * 0.01], np.float32)}  # fmt: skip

    def _info(self):
        info = {"time": self.t * 0.01, "lap": 1, "progress": 0.5, "wall_collision": False}
        if self.info_state:
            info["pose"] = np.array([self.x, 0.0, 0.05, 0, 0, 0])
            info["velocity"] = np.array([10.0, 0.0, 0, 0, 0, 0])
        return info

    def close(self):
        type(self).closed += 1


def _still(obs):
    return np.zeros(2, np.float32)


def test_host_record_reads_the_true_state_from_info():
    (tr, end), = ev.rollout_gym(FakeHostEnv(), _still, [0])
    assert end == "time_limit" and len(tr["x"]) == 21
    np.testing.assert_array_equal(tr["y"], 0.0)  # info's, not the observation's 3.0
    assert tr["x"][0] == 0.0 and 2.0 < tr["x"][-1] < 2.2  # info's, not x + 7
    np.testing.assert_array_equal(tr["speed"], 10.0)  # info's |v|, not hypot(3, 4) = 5
    m = ev.episode_metrics(tr)
    assert m["distance_m"] == pytest.approx(tr["x"][-1])
    # where info lacks them, the observation's pose and velocity are used
    (tr, _), = ev.rollout_gym(FakeHostEnv(info_state=False), _still, [0])
    np.testing.assert_array_equal(tr["y"], 3.0)
    np.testing.assert_allclose(tr["speed"], 5.0)
    assert tr["x"][0] == 7.0


def test_racecar_gym_backend_gets_a_fresh_seeded_env_per_episode(monkeypatch):
    made = []

    def fake_make(backend, track, *a, **kw):
        made.append(backend)
        return FakeHostEnv()

    monkeypatch.setattr(ev, "make_gym_env", fake_make)
    FakeHostEnv.made = FakeHostEnv.closed = 0
    r1 = ev.evaluate_policy(_still, TRACK, "racecar_gym", episodes=3, time_limit=0.2, seed=5)
    assert FakeHostEnv.made == 3 and FakeHostEnv.closed == 3  # one env per episode, closed
    r2 = ev.evaluate_policy(_still, TRACK, "racecar_gym", episodes=3, time_limit=0.2, seed=5)
    for a, b in zip(r1["traces"], r2["traces"], strict=True):  # np.random seeded per episode
        np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(r1["traces"][0]["x"], r1["traces"][1]["x"])  # seeds 5 and 6
    np.random.seed(6)  # noqa: NPY002 - episode 1 alone, seeded 6, is the same episode
    (tr, _), = ev.rollout_gym(FakeHostEnv(), _still, [6])
    np.testing.assert_array_equal(tr["x"], r1["traces"][1]["x"])
    # our own backends: one env for all episodes (their reset is complete)
    FakeHostEnv.made = FakeHostEnv.closed = 0
    ev.evaluate_policy(_still, TRACK, "bullet", episodes=3, time_limit=0.2, seed=5)
    assert FakeHostEnv.made == 1 and FakeHostEnv.closed == 1


# ----------------------------------------------------------------------------- bullet
def test_short_bullet_episode_through_the_same_code():
    from rl.drivers import scripted_policy

    res = ev.evaluate_policy(scripted_policy("bullet"), TRACK, "bullet", episodes=1,
                             time_limit=2.0, seed=0, action_repeat=4)  # fmt: skip
    assert res["rollout"] == "host"
    e = res["episodes"][0]
    assert e["end"] == "time_limit" and e["duration_s"] == pytest.approx(2.0)
    assert e["distance_m"] > 1.0 and e["laps"] > 0.0 and e["contacts"] == 0
    assert math.isfinite(e["collisions_per_km"]) and e["seed"] == 0
    assert len(res["traces"][0]["time"]) == 201  # reset + 200 physics steps recorded


# ----------------------------------------------------------------------------- checkpoints
def _check_ckpt_report(out: Path, step: int):
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["checkpoint_step"] == step and rep["backend"] == "jax"
    assert rep["protocol"]["action_repeat"] == 4
    (mode,) = rep["results"]
    agg = rep["results"][mode]["tracks"][TRACK]["aggregate"]
    assert agg["episodes"] == 2 and math.isfinite(agg["laps_mean"])
    assert all(Path(p).stat().st_size > 0 for p in rep["plots"])
    return rep


def test_checkpoint_policy_path(tmp_path):
    """A gymnasium-runner (PyBullet-trained) checkpoint with non-trivial observation statistics
    → restore_policy → the deterministic policy (training featurization + obs normalization,
    clipped mean) → evaluation in the JAX backend (transfer between simulators). The state is
    laid out as the gymnasium runner saves it (rl.runners.GymRunner.checkpoint); the real
    format is covered by the slow test below."""
    import jax
    import jax.numpy as jnp

    from etl import configlib
    from rl.agent import lidar_feature_dim, lidar_features, split_agent
    from rl.config import load_config
    from rl.factory import make_agent, restore_policy
    from rl.ppo_core import RunningMeanStd, make_optimizer
    from train.checkpoint import Checkpointer

    cfg = load_config(None, [f"runs_dir={tmp_path}", "run_name=tiny", f"env.track={TRACK}",
                             "env.backend=bullet", "ppo.num_envs=2", "ppo.num_steps=8",
                             "ppo.num_minibatches=2"])  # fmt: skip
    model, _, trainable = make_agent(cfg, 1)
    agent = split_agent(model, trainable)
    rng = np.random.default_rng(0)
    dim = lidar_feature_dim(cfg.model.lidar_beams, cfg.model.velocity)
    rms = RunningMeanStd(jnp.asarray(rng.normal(size=dim), jnp.float32),
                         jnp.asarray(rng.uniform(0.5, 2.0, dim), jnp.float32), jnp.asarray(50.0))
    state = {"params": agent.params, "opt_state": make_optimizer(cfg.ppo, 1).init(agent.params),
             "obs_rms": rms, "ret_rms": RunningMeanStd.create(()),
             "key": jax.random.PRNGKey(0), "update": jnp.int32(7)}  # fmt: skip
    ckpt_dir = tmp_path / "tiny" / "ckpt"
    ck = Checkpointer(ckpt_dir)
    ck.save(7, state, {"update": 7}, {"rl": configlib.to_dict(cfg), "kind": "ppo"})
    ck.close()

    _, restored, rrms = restore_policy(ckpt_dir)
    np.testing.assert_allclose(np.asarray(rrms.mean), np.asarray(rms.mean))
    policy = ev.checkpoint_policy(restored, lambda o: lidar_features(o, 108), rrms)
    obs = {"lidar": rng.uniform(0.3, 15.0, 1080).astype(np.float32),
           "velocity": rng.normal(size=6).astype(np.float32)}  # fmt: skip
    x = rms.normalize(lidar_features({k: v[None] for k, v in obs.items()}, 108))
    mean = np.asarray(model(x)[0][0])
    np.testing.assert_allclose(np.asarray(policy(obs)), np.clip(mean, -1, 1), atol=1e-5)

    out = tmp_path / "eval"
    assert ev.main(["--ckpt", str(ckpt_dir), "--tracks", TRACK, "--backend", "jax",
                    "--episodes", "2", "--time-limit", "2", "--collision", "config",
                    "--out", str(out)]) == 0  # fmt: skip
    rep = _check_ckpt_report(out, 7)
    assert rep["trained_backend"] == "bullet"


@pytest.mark.slow
def test_trained_tiny_run_end_to_end(tmp_path):
    """`python -m rl.ppo` trains a tiny run in a subprocess; `python -m rl.evaluate` on it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    train = [sys.executable, "-m", "rl.ppo", "--set", "run_name=tiny", "--set",
             f"runs_dir={tmp_path}", "--set", f"env.track={TRACK}", "--set", "ppo.num_envs=8",
             "--set", "ppo.num_steps=16", "--set", "ppo.total_timesteps=256", "--set",
             "ppo.num_minibatches=2"]  # fmt: skip
    r = subprocess.run(train, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "rl.evaluate", "--ckpt", str(tmp_path / "tiny" / "ckpt"),
           "--tracks", TRACK, "--episodes", "2", "--time-limit", "3", "--collision", "config",
           "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = _check_ckpt_report(out, 2)
    assert any(p.endswith("learning_curves.png") for p in rep["plots"])


def test_lidar_policy_sees_planar_velocity_and_old_checkpoints_read_as_all(tmp_path):
    """model.velocity = "planar" feeds vx, vy and the yaw rate only (the roll and pitch rates
    and vz, which the JAX car never moves, stay out); a checkpoint saved before the key
    existed restores as "all", the six components it was trained on."""
    from etl import configlib
    from rl.agent import lidar_feature_dim, lidar_features
    from rl.config import load_config
    from rl.factory import _upgrade_record

    obs = {"lidar": np.full(1080, 7.625, np.float32),
           "velocity": np.arange(1, 7, dtype=np.float32)}
    np.testing.assert_array_equal(np.asarray(lidar_features(obs, 108))[108:], [1, 2, 6])
    np.testing.assert_array_equal(np.asarray(lidar_features(obs, 108, velocity="all"))[108:],
                                  [1, 2, 3, 4, 5, 6])
    assert lidar_feature_dim(108) == 111 and lidar_feature_dim(54, "all") == 60
    rec = configlib.to_dict(load_config(None))
    assert rec["model"]["velocity"] == "planar"
    del rec["model"]["velocity"]
    assert _upgrade_record(rec)["model"]["velocity"] == "all"


# ----------------------------------------------------------------------------- robustness
def _scan(perturbation, seed=3):
    """The first lidar scan of a grid-start episode under ``perturbation`` (JAX backend)."""
    env = ev.make_gym_env("jax", TRACK, 5.0, False, sensors=perturbation.sensors())
    obs, _ = env.reset(seed=seed, options={"mode": "grid"})
    env.close()
    return np.asarray(obs["lidar"], np.float64)


@pytest.mark.parametrize("k", [2.0, 4.0])
def test_lidar_noise_perturbation_reaches_the_scan(k):
    """×k noise: every ray reads the exact scan × U(1 ± k·3 %) — the largest relative error over
    1080 rays is just under k·3 %, far above the nominal 3 %."""
    exact = _scan(ev.Perturbation(lidar_noise=0.0))
    noisy = _scan(ev.Perturbation(lidar_noise=k))
    nominal = _scan(ev.Perturbation())
    hit = exact < 15.0  # not clipped at the range's top
    assert hit.sum() > 500
    err = np.abs(noisy[hit] / exact[hit] - 1.0)
    assert 0.9 * 0.03 * k < err.max() <= 0.03 * k + 1e-5
    assert np.abs(nominal[hit] / exact[hit] - 1.0).max() <= 0.03 + 1e-5


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_lidar_drop_perturbation_reaches_the_scan(p):
    """Dropped rays read max range (no return): about p of the rays that hit a wall."""
    from rl.envs.spec import LIDAR_MAX

    exact = _scan(ev.Perturbation(lidar_noise=0.0))
    dropped = _scan(ev.Perturbation(lidar_noise=0.0, lidar_drop=p))
    hit = exact < LIDAR_MAX
    gone = (dropped == np.float32(LIDAR_MAX)) & hit
    assert abs(gone.sum() / hit.sum() - p) < 0.05
    np.testing.assert_array_equal(dropped[hit & ~gone], exact[hit & ~gone])  # the rest intact


def test_lidar_perturbation_needs_the_jax_backend():
    with pytest.raises(ValueError, match="JAX backend"):
        ev.evaluate_policy(lambda o: np.zeros(2), TRACK, "bullet", episodes=1,
                           time_limit=0.1, sensors=ev.Perturbation(lidar_drop=0.1).sensors())
    assert ev.Perturbation(2.0, 0.1, True).name == "lidar_noise_x2+lidar_drop_10+imu_absent"
    assert ev.Perturbation().name == "nominal" and ev.Perturbation().sensors() == {}


def test_imu_absent_reaches_the_policy_input():
    """IMU absent: the multimodal policy's sample has the imu modality absent (present 0, zero
    placeholder) — the adapter sees no velocity/acceleration; the lidar MLP's velocity inputs
    are 0 after normalisation (their training mean), its lidar inputs untouched."""
    import jax.numpy as jnp
    from _train_fixtures import TINY_PRE
    from flax import nnx

    from etl.schema import MODALITY_INDEX
    from rl.agent import lidar_features
    from rl.envs.adapter import ObservationAdapter
    from rl.ppo_core import RunningMeanStd

    class Echo(nnx.Module):  # mean = what the policy's input says about the IMU
        def __init__(self, flat: bool):
            self.flat = flat

        def __call__(self, x):
            if self.flat:
                mean = jnp.stack([x[:, :108].sum(-1), x[:, -3:].sum(-1)], -1)
            else:
                imu = MODALITY_INDEX["imu"]
                mean = jnp.stack([x["present"][:, imu].astype(jnp.float32),
                                  jnp.abs(x["imu"]).sum(-1)], -1)
            return mean * 1e-3, jnp.zeros_like(mean), mean[:, 0]

    rng = np.random.default_rng(0)
    obs = {"lidar": rng.uniform(0.5, 10.0, 1080).astype(np.float32),
           "pose": np.zeros(6, np.float32), "velocity": np.array([2.0, 0.1, 0, 0, 0, 0.5]),
           "acceleration": np.array([1.0, 0.5, 0, 0, 0, 0]), "time": np.zeros(1)}
    adapter = ObservationAdapter(TINY_PRE)
    g, st = nnx.split(Echo(False))
    with_imu = ev.make_act(g, adapter.jax)(obs, st, None)
    without = ev.make_act(g, adapter.jax, imu_absent=True)(obs, st, None)
    assert float(with_imu[0]) == pytest.approx(1e-3) and float(with_imu[1]) > 0
    np.testing.assert_array_equal(np.asarray(without), 0.0)  # present 0, zero placeholder

    g, st = nnx.split(Echo(True))
    rms = RunningMeanStd(jnp.full(111, 0.3), jnp.full(111, 4.0), jnp.asarray(10.0))
    feat = lambda o: lidar_features(o, 108)  # noqa: E731
    with_imu = ev.make_act(g, feat, velocity_dims=3)(obs, st, rms)
    without = ev.make_act(g, feat, imu_absent=True, velocity_dims=3)(obs, st, rms)
    assert float(without[0]) == pytest.approx(float(with_imu[0]))  # lidar inputs intact
    assert float(without[1]) == 0.0 and float(with_imu[1]) != 0.0
