"""rl.ppo as a program: config errors, checkpoints, exact resume, the gymnasium path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from _train_fixtures import CORRUPTIONS, corrupt_step

from etl import configlib
from rl.config import load_config
from rl.ppo import EXIT_OK, EXIT_PREEMPTED, main, run

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "ppo.num_envs=8", "ppo.num_steps=16", "ppo.num_minibatches=2", "ppo.update_epochs=2",
    "ppo.total_timesteps=512", "model.hidden=[32]", "env.time_limit=5.0",
    "updates_per_log=1", "ckpt_every=2",
]  # fmt: skip


def _cfg(tmp_path, name, extra=()):
    return load_config(
        ROOT / "configs/rl_tiny.toml",
        [*TINY, f"runs_dir='{tmp_path}'", f"run_name='{name}'", *extra],
    )


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_config_errors_name_the_key(tmp_path, capsys):
    with pytest.raises(configlib.ConfigError, match=r"ppo\.lerning_rate: unknown key"):
        load_config(None, ["ppo.lerning_rate=1e-3"])
    with pytest.raises(configlib.ConfigError, match=r"env\.backend: expected one of"):
        load_config(None, ["env.backend='carla'"])
    with pytest.raises(configlib.ConfigError, match=r"ppo\.num_envs: expected int"):
        load_config(None, ["ppo.num_envs='many'"])
    with pytest.raises(configlib.ConfigError, match=r"finetune\.pretrained_ckpt: required"):
        load_config(None, ["finetune.init='pretrained'"])
    assert main(["--set", "ppo.clip=0.1"]) == 2
    assert "ppo.clip: unknown key" in capsys.readouterr().err


def test_resume_is_exact(tmp_path):
    """4 updates in one go == 2 updates, stop, resume, 2 more (same losses, same returns)."""
    straight = _cfg(tmp_path, "straight")
    assert run(straight, max_updates=4) == EXIT_OK
    split = _cfg(tmp_path, "split")
    assert run(split, max_updates=2) == EXIT_OK
    assert run(split, max_updates=4) == EXIT_OK
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    assert [m["env_steps"] for m in a] == [m["env_steps"] for m in b] == [128, 256, 384, 512]
    for x, y in zip(a, b, strict=True):
        for k in ("loss/total", "loss/policy", "loss/value", "reward_mean"):
            assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-7), k
    assert sorted(p.name for p in (tmp_path / "split/ckpt").iterdir() if p.name.isdigit()) == [
        "2",
        "4",
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-update tiny run with checkpoints at updates 2 and 4: its runs dir."""
    tmp = tmp_path_factory.mktemp("finished")
    assert run(_cfg(tmp, "done"), max_updates=4) == EXIT_OK
    return tmp


def _ckpt_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "ckpt").iterdir())


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_damaged_latest_checkpoint_resumes_from_the_one_before(finished, tmp_path, how):
    from train.checkpoint import CheckpointWarning

    shutil.copytree(finished / "done", tmp_path / "done")
    corrupt_step(tmp_path / "done" / "ckpt" / "4", how)
    with pytest.warns(CheckpointWarning) as w:
        assert run(_cfg(tmp_path, "done"), max_updates=4) == EXIT_OK
    msgs = [str(x.message) for x in w if issubclass(x.category, CheckpointWarning)]
    assert len(msgs) == 1 and "step 4:" in msgs[0] and "resuming from step 2" in msgs[0]
    assert _ckpt_names(tmp_path / "done") == ["2", "4", "4.corrupt"]  # update 4 trained again
    steps = [m["env_steps"] for m in _metrics(tmp_path / "done")]
    assert steps == [128, 256, 384, 512]  # updates 3 and 4 logged once: the rerun's


def test_resume_with_another_model_or_no_intact_checkpoint_is_one_line(finished, tmp_path,
                                                                      capsys):
    shutil.copytree(finished / "done", tmp_path / "done")
    args = ["--config", str(ROOT / "configs/rl_tiny.toml"), *[f"--set={s}" for s in TINY],
            f"--set=runs_dir='{tmp_path}'", "--set=run_name='done'"]
    assert main([*args, "--set=model.hidden=[16, 16]", "--set=model.velocity='all'"]) == 2
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "error" in x)
    assert "model.hidden: checkpoint [32] ≠ config [16, 16]" in line
    assert "model.velocity: checkpoint 'planar' ≠ config 'all'" in line
    assert "lidar_beams" not in line and "Traceback" not in err
    assert _ckpt_names(tmp_path / "done") == ["2", "4"]
    ckpt = tmp_path / "done" / "ckpt"
    # two damages that do not depend on how Orbax laid out the array chunks (truncating chunks
    # found by a glob left the policy intact on some runs: flaky)
    corrupt_step(ckpt / "4", "manifest")
    corrupt_step(ckpt / "2", "metadata")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"rl.ppo: error: {ckpt}: no intact checkpoint (steps 4, 2 all fail" in err
    assert "Traceback" not in err and _ckpt_names(tmp_path / "done") == ["2", "4"]


def _leaves(model):
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_restore_policy_falls_back_to_the_newest_intact_step(finished, tmp_path, how):
    """Evaluation and warm starts read the newest intact step, as a resume does, with one
    warning naming the damaged step — and rename nothing in a run they do not own."""
    from rl.factory import restore_policy, restore_policy_step
    from train.checkpoint import CheckpointError, CheckpointWarning

    shutil.copytree(finished / "done", tmp_path / "done")
    ckpt = tmp_path / "done" / "ckpt"
    _, want, want_rms, _ = restore_policy_step(ckpt, 2)
    _, newest, _, _ = restore_policy_step(finished / "done" / "ckpt", 4)  # (not this copy's:
    if how == "chunk":  # TensorStore would serve it from its cache) — and the policy's
        for f in [p for p in (ckpt / "4" / "state").rglob("*")  # chunk, whichever holds
                  if p.is_file() and p.parent.name == "d"]:  # it, wherever Orbax put it
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        corrupt_step(ckpt / "4", how)
    with pytest.warns(CheckpointWarning) as w:
        _, model, rms = restore_policy(ckpt)
    msgs = [str(x.message) for x in w if issubclass(x.category, CheckpointWarning)]
    assert len(msgs) == 1 and "step 4:" in msgs[0] and "using step 2" in msgs[0], msgs
    assert "\n" not in msgs[0]
    for a, b in zip(_leaves(model), _leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b)  # step 4's policy really is another one
               for a, b in zip(_leaves(newest), _leaves(want), strict=True))
    np.testing.assert_array_equal(np.asarray(rms.mean), np.asarray(want_rms.mean))
    with pytest.warns(CheckpointWarning):
        assert restore_policy_step(ckpt)[3] == 2
    assert _ckpt_names(tmp_path / "done") == ["2", "4"]  # nothing set aside
    with pytest.raises(CheckpointError) as e:  # an explicit step is that step or an error
        restore_policy_step(ckpt, 4)
    assert str(e.value).startswith(f"{ckpt / '4'}: cannot restore this checkpoint (")
    assert "\n" not in str(e.value)


def test_restore_policy_without_an_intact_step_is_one_line(finished, tmp_path, capsys):
    from rl.evaluate import main as evaluate
    from rl.factory import restore_policy
    from train.checkpoint import CheckpointError

    shutil.copytree(finished / "done", tmp_path / "done")
    ckpt = tmp_path / "done" / "ckpt"
    # two damages that do not depend on how Orbax laid out the array chunks (truncating chunks
    # found by a glob left the policy intact on some runs: flaky)
    corrupt_step(ckpt / "4", "manifest")
    corrupt_step(ckpt / "2", "metadata")
    with pytest.raises(CheckpointError) as e:
        restore_policy(ckpt)
    assert str(e.value).startswith(f"{ckpt}: no intact checkpoint (steps 4, 2 all fail; "
                                   "newest, step 4: ")
    assert "\n" not in str(e.value)
    assert evaluate(["--ckpt", str(ckpt), "--episodes", "1", "--no-plots",
                     "--out", str(tmp_path / "eval")]) == 1
    err = capsys.readouterr().err
    assert f"rl.evaluate: error: {ckpt}: no intact checkpoint" in err and "Traceback" not in err
    assert _ckpt_names(tmp_path / "done") == ["2", "4"]


def test_sigterm_saves_and_exits_for_requeue(tmp_path):
    """A preempted run (SIGTERM) checkpoints and exits 3; a kill -9 afterwards loses nothing
    that was saved, and the rerun resumes from that checkpoint."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sets = [f"--set={s}" for s in TINY + ["ppo.total_timesteps=1000000", "ckpt_every=1000"]]
    cmd = [sys.executable, "-m", "rl.ppo", "--config", str(ROOT / "configs/rl_tiny.toml"),
           f"--set=runs_dir='{tmp_path}'", "--set=run_name='pre'", *sets]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    # wait for the first logged update, then preempt
    deadline = time.time() + 240
    metrics = tmp_path / "pre/metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.5)
    assert metrics.exists(), proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=240)
    err = proc.stderr.read()
    assert code == EXIT_PREEMPTED, err
    saved = [int(p.name) for p in (tmp_path / "pre/ckpt").iterdir() if p.name.isdigit()]
    assert saved and "exiting for requeue" in err
    cfg = load_config(
        ROOT / "configs/rl_tiny.toml",
        [*TINY, f"runs_dir='{tmp_path}'", "run_name='pre'", "ppo.total_timesteps=1000000",
         "ckpt_every=1000"],
    )  # fmt: skip
    assert run(cfg, max_updates=max(saved) + 1) == EXIT_OK
    steps = [m["env_steps"] for m in _metrics(tmp_path / "pre")]
    assert steps[-1] == (max(saved) + 1) * 128
    assert np.all(np.diff(steps[: len(saved)]) > 0)


def test_bullet_backend_runs_checkpoints_and_restores(tmp_path):
    """The gymnasium path: PPO on PyBullet envs, a checkpoint, and the policy restored from it."""
    from rl.factory import restore_policy

    cfg = load_config(
        ROOT / "configs/rl_tiny.toml",
        [f"runs_dir='{tmp_path}'", "run_name='pb'", "env.backend='bullet'", "ppo.num_envs=2",
         "ppo.num_steps=8", "ppo.num_minibatches=2", "ppo.update_epochs=1",
         "ppo.total_timesteps=32", "model.hidden=[16]", "updates_per_log=1", "ckpt_every=1"],
    )  # fmt: skip
    assert run(cfg, max_updates=2) == EXIT_OK
    m = _metrics(tmp_path / "pb")
    assert [r["env_steps"] for r in m] == [16, 32] and all(np.isfinite(r["loss/total"]) for r in m)
    rcfg, model, obs_rms = restore_policy(tmp_path / "pb/ckpt")
    assert rcfg.env.backend == "bullet" and float(obs_rms.count) > 1  # the trained statistics
    mean, log_std, value = model(np.zeros((1, 108 + 3), np.float32))  # lidar, vx, vy, yaw rate
    assert mean.shape == (1, 2) and np.isfinite(np.asarray(value)).all()


def test_gymnasium_runner_gives_each_env_a_track_of_the_list(tmp_path):
    from rl.factory import make_vector_env

    cfg = load_config(ROOT / "configs/rl_tiny.toml",
                      [f"runs_dir='{tmp_path}'", "env.backend='bullet'",
                       "env.track='procedural:0,procedural:1'"])
    envs = make_vector_env(cfg, 3)
    try:
        names = [e.unwrapped.track.name for e in envs.envs]
    finally:
        envs.close()
    assert names == ["procedural_0", "procedural_1", "procedural_0"], names


def test_warm_start_takes_the_policy_of_another_run(tmp_path):
    """finetune.init_policy: the new run starts from the other run's policy and observation
    statistics (with a zero learning rate its parameters stay exactly those), fresh
    otherwise; a [model] mismatch is an error naming the key."""
    from rl.factory import restore_policy

    assert run(_cfg(tmp_path, "src"), max_updates=2) == EXIT_OK
    src = str(tmp_path / "src" / "ckpt")
    frozen_lr = ["ppo.learning_rate=0.0", "env.terminate_on_collision=false"]
    assert run(_cfg(tmp_path, "warm", [f"finetune.init_policy='{src}'", *frozen_lr]),
               max_updates=1) == EXIT_OK
    assert run(_cfg(tmp_path, "cold", frozen_lr), max_updates=1) == EXIT_OK
    _, m_src, rms_src = restore_policy(tmp_path / "src" / "ckpt")
    _, m_warm, rms_warm = restore_policy(tmp_path / "warm" / "ckpt")
    _, m_cold, _ = restore_policy(tmp_path / "cold" / "ckpt")
    from flax import nnx

    leaves = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))  # noqa: E731
    for a, b in zip(leaves(m_src), leaves(m_warm), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(leaves(m_src), leaves(m_cold), strict=True))
    # the statistics continued from the source run's, not from scratch
    assert float(rms_warm.count) > float(rms_src.count)
    bad = _cfg(tmp_path, "bad", [f"finetune.init_policy='{src}'", "model.hidden=[16]"])
    with pytest.raises(ValueError, match=r"init_policy .*hidden"):
        run(bad, max_updates=1)


def test_stages_train_in_order_then_the_run_starts_from_the_last(tmp_path, capsys):
    """[[stages]]: each stage is a run of its own (its env keys replaced) in
    runs/<run>/stages/<i>-<name>, warm-started from the one before; the run itself starts from
    the last stage's policy; a complete stage is skipped when the command is run again."""
    from rl.config import StageConfig, after_stages, stage_config
    from rl.factory import restore_policy

    stages = ("stages=[{name='contact', total_timesteps=256, "
              "env={terminate_on_collision=false, collision_penalty=0.5}}, "
              "{name='still', total_timesteps=128, env={}}]")
    cfg = _cfg(tmp_path, "staged", [stages, "ppo.learning_rate=0.0"])
    assert cfg.stages[0] == StageConfig("contact", 256, {"terminate_on_collision": False,
                                                         "collision_penalty": 0.5})
    s0, s1 = stage_config(cfg, 0), stage_config(cfg, 1)
    assert s0.run_name == "staged/stages/0-contact" and s0.finetune.init_policy == ""
    assert not s0.env.terminate_on_collision and s0.env.collision_penalty == 0.5
    assert s0.ppo.total_timesteps == 256 and s0.stages == ()
    assert s1.env == cfg.env and s1.finetune.init_policy.endswith("staged/stages/0-contact/ckpt")
    assert after_stages(cfg).finetune.init_policy.endswith("staged/stages/1-still/ckpt")

    assert run(cfg) == EXIT_OK
    err = capsys.readouterr().err
    assert "stage 1/2 'contact'" in err and "stage 2/2 'still'" in err
    assert len(_metrics(tmp_path / "staged/stages/0-contact")) == 2  # 256 steps, 128 a update
    assert len(_metrics(tmp_path / "staged/stages/1-still")) == 1
    assert len(_metrics(tmp_path / "staged")) == 4
    # learning rate 0: the policy passes unchanged from stage to stage to the run
    from flax import nnx

    leaves = lambda m: [np.asarray(x) for x in jax.tree.leaves(nnx.state(m, nnx.Param))]  # noqa: E731
    first = leaves(restore_policy(tmp_path / "staged/stages/0-contact/ckpt")[1])
    for a, b in zip(first, leaves(restore_policy(tmp_path / "staged/ckpt")[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert run(cfg) == EXIT_OK  # everything complete: nothing retrained
    assert "stage 1/2" not in capsys.readouterr().err
    assert len(_metrics(tmp_path / "staged/stages/0-contact")) == 2

    with pytest.raises(configlib.ConfigError, match=r"stages\.x\.env: unknown keys \['trak'\]"):
        _cfg(tmp_path, "bad", ["stages=[{name='x', total_timesteps=1, env={trak='a'}}]"])
    with pytest.raises(configlib.ConfigError, match=r"env\.min_speed"):
        _cfg(tmp_path, "bad", ["stages=[{name='x', total_timesteps=1, env={min_speed=9.0}}]"])


def test_track_pool_draws_new_tracks_without_recompiling(tmp_path, capsys):
    """env.track_pool: every pool_every updates pool_size tracks are drawn anew (seeded by
    the run's seed and the draw), tiled with env.track's on fixed slots — the same array
    shapes, so the jitted chunk compiles once — and every car restarts on the new map."""
    from rl import factory
    from rl.config import pool_draw
    from rl.ppo import train
    from rl.tracks import TrackError, load_track, slot_tracks

    pool = ["env.track_pool='procedural:1-4'", "env.pool_size=2", "env.pool_every=1",
            "updates_per_log=1"]
    cfg = _cfg(tmp_path, "pool", pool)
    d0, d1 = pool_draw(cfg, 0), pool_draw(cfg, 1)
    assert d0[0] == "procedural:0" and len(d0) == 3 and len(set(d0)) == 3
    assert d0 == pool_draw(cfg, 0) and d0 != d1  # seeded per draw
    p0, p1 = factory.pool_params(cfg, 0), factory.pool_params(cfg, 1)
    assert jax.tree.map(np.shape, p0) == jax.tree.map(np.shape, p1)
    assert not np.array_equal(np.asarray(p0.obstacle_m), np.asarray(p1.obstacle_m))

    runner = factory.make_runner(cfg)
    run_dir = tmp_path / "pool"
    run_dir.mkdir()
    assert train(cfg, runner, run_dir, max_updates=3) == EXIT_OK
    err = capsys.readouterr().err
    assert "track pool draw 1: 2 tracks" in err and "track pool draw 2: 2 tracks" in err
    assert runner._chunk._cache_size() == 1  # one compile for three track sets
    with pytest.raises(configlib.ConfigError, match=r"env\.pool_size: 9 tracks from a pool of 4"):
        pool_draw(_cfg(tmp_path, "big", [*pool[:1], "env.pool_size=9"]), 0)
    with pytest.raises(TrackError, match=r"procedural_1 needs .* more than a slot of 5\.0 m"):
        slot_tracks([load_track("procedural:1")], 5.0, 1)
    with pytest.raises(configlib.ConfigError, match=r"env\.track_pool: the JAX backend's"):
        _cfg(tmp_path, "pb", [*pool[:1], "env.backend='bullet'"])


def test_resume_after_a_lost_checkpoint_logs_each_update_once(tmp_path):
    """A run that logged updates past its last checkpoint and died: the resumed run logs
    those updates again, and metrics.jsonl keeps one record per update, not two."""
    import shutil

    cfg = _cfg(tmp_path, "dup")
    assert run(cfg, max_updates=3) == EXIT_OK  # checkpoints at 2 and 3
    shutil.rmtree(tmp_path / "dup/ckpt/3")  # as if it died after logging update 3
    assert [m["env_steps"] for m in _metrics(tmp_path / "dup")] == [128, 256, 384]
    assert run(cfg, max_updates=4) == EXIT_OK
    assert [m["env_steps"] for m in _metrics(tmp_path / "dup")] == [128, 256, 384, 512]


def test_a_run_killed_before_its_first_checkpoint_starts_its_log_afresh(tmp_path):
    """No checkpoint to resume from: the run starts at update 0, and what the killed run
    had logged goes, so metrics.jsonl holds each update once."""
    import shutil

    cfg = _cfg(tmp_path, "early")
    assert run(cfg, max_updates=1) == EXIT_OK  # logged update 1, saved its checkpoint
    shutil.rmtree(tmp_path / "early/ckpt")  # as if it died before saving any
    assert [m["env_steps"] for m in _metrics(tmp_path / "early")] == [128]
    assert run(cfg, max_updates=3) == EXIT_OK
    assert [m["env_steps"] for m in _metrics(tmp_path / "early")] == [128, 256, 384]
