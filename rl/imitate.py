"""Behaviour cloning (DAgger) of a scripted teacher into the lidar MLP: an initialisation for
PPO (``finetune.init_policy``), written as a PPO checkpoint.

The teacher is :class:`rl.drivers.LineFollower` — privileged: it knows the pose and a planned
clean line; the student sees only what the PPO policy sees (108 lidar sectors and the body
velocity). DAgger: round 0 drives the teacher; each later round drives the student (its
Gaussian mean plus ``noise``), and every visited state is labelled with the teacher's action
and added to the data set, so the student learns to recover from its own mistakes. Rollouts
run in the JAX backend with random starts, ``envs`` cars × ``steps`` policy steps a round.

``bullet_rounds`` more rounds then let the student drive the PyBullet backend (a vector env,
random starts, ``bullet_envs`` cars in worker processes), labelled the same way: the states
PyBullet's car gets into (its chassis wobbles at speed, its braked wheels slide) are not the
JAX car's, and a student that has never seen them weaves on the straights. Each PyBullet state
counts ``bullet_weight`` times in the fit.

    python -m rl.imitate --config configs/rl_austria_clean.toml --set run_name=austria_bc
    python -m rl.ppo --config configs/rl_austria_clean.toml  # PPO from it (init_policy)
    python -m rl.imitate --config configs/rl_austria_bullet.toml  # with PyBullet rounds

The config gives the track (one track), the task, the model and the ``[imitate]`` section
(:class:`rl.config.ImitateConfig`: rounds, cars, noise, the teacher's settings, the fit's
lr/batch/max_samples, the PyBullet rounds); the result is ``runs/<run_name>/ckpt`` (a
checkpoint ``rl.evaluate`` and ``finetune.init_policy`` read).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from etl import configlib
from rl import factory
from rl.agent import lidar_feature_dim, lidar_features, split_agent
from rl.config import RLConfig, cli_config
from rl.drivers import line_driver
from rl.envs import spec
from rl.ppo_core import RunningMeanStd
from rl.tracks import load_track, track_names
from train.checkpoint import Checkpointer


def log(msg: str) -> None:
    print(f"[imitate] {msg}", flush=True)


def _setup(cfg: RLConfig):
    """(JAX env params, functional env, teacher, fresh student, track name) for ``cfg``; the
    teacher follows a line planned with ``cfg.imitate.clearance`` (and ``turn_radius``), set up
    by ``cfg.imitate.teacher``."""
    if cfg.model.policy != "lidar_mlp":
        raise ValueError(f"model.policy: rl.imitate trains the lidar MLP, not {cfg.model.policy!r}")
    names = track_names(cfg.env.track)
    if len(names) != 1:
        raise ValueError(f"env.track: rl.imitate plans one track, got {len(names)} ({names})")
    track = load_track(names[0])
    ic = cfg.imitate
    teacher = line_driver(track, clearance=ic.clearance, **configlib.to_dict(ic.teacher),
                          **({"turn_radius": ic.turn_radius} if ic.turn_radius > 0 else {}))
    beams, vel = cfg.model.lidar_beams, cfg.model.velocity

    def featurize(obs):
        return {"x": lidar_features(obs, beams, velocity=vel), "pose": obs["pose"],
                "velocity": obs["velocity"]}

    fenv, params = factory.make_functional(cfg, featurize)
    model, _, _ = factory.make_agent(cfg)
    return params, fenv, teacher, model, names[0]


def _teacher_action(teacher, obs) -> jax.Array:
    return spec.action_array(teacher(obs), jnp)


def make_rollout(fenv, teacher, graphdef, n_envs: int, n_steps: int, noise: float):
    """jit(params, rest, rms, key, env_params, use_teacher) -> (features, teacher actions,
    stats)."""
    def rollout(params, rest, rms, key, env_params, use_teacher):
        model = nnx.merge(graphdef, params, rest)
        k_reset, k_run = jax.random.split(key)
        obs, carry = jax.vmap(fenv.reset, in_axes=(0, None))(
            jax.random.split(k_reset, n_envs), env_params)

        def step(c, k):
            obs, carry = c
            label = jax.vmap(lambda o: _teacher_action(teacher, o))(obs)
            mean, _, _ = model(rms.normalize(obs["x"]))
            k_noise, k_env = jax.random.split(k)
            own = mean + noise * jax.random.normal(k_noise, mean.shape)
            act = jnp.clip(jnp.where(use_teacher, label, own), -1.0, 1.0)
            obs2, carry2, _, term, _, _, info = jax.vmap(
                fenv.step, in_axes=(0, 0, 0, None))(
                jax.random.split(k_env, n_envs), carry, act, env_params)
            return (obs2, carry2), (obs["x"], label, info["wall_collision"], term,
                                    info["speed"])

        _, (x, y, hit, term, speed) = jax.lax.scan(step, (obs, carry),
                                                   jax.random.split(k_run, n_steps))
        stats = {"contact_rate": hit.mean(), "episode_ends": term.sum(),
                 "mean_speed": speed.mean()}
        return x.reshape(-1, x.shape[-1]), y.reshape(-1, 2), stats

    return jax.jit(rollout)


def bullet_rollout(cfg: RLConfig, track: str, teacher, graphdef, params, rest, rms, seed: int,
                   n_envs: int, n_steps: int, noise: float, workers: bool = True,
                   use_teacher: bool = False):
    """The student (Gaussian mean + ``noise``; the teacher if ``use_teacher``) drives
    ``n_envs`` PyBullet cars for ``n_steps`` policy steps from random starts; returns
    (features, teacher actions, stats) of every visited state. ``workers``: one process per
    car (else all in this process)."""
    env_cfg = dataclasses.replace(cfg.env, backend="bullet", reset_mode="random",
                                  bullet_workers=int(workers))  # fmt: skip
    envs = factory.make_vector_env(dataclasses.replace(cfg, env=env_cfg), n_envs, track)
    beams, vel = cfg.model.lidar_beams, cfg.model.velocity
    feats = jax.jit(lambda o: lidar_features(o, beams, velocity=vel))
    label = jax.jit(jax.vmap(lambda o: _teacher_action(teacher, o)))

    @jax.jit
    def act(x, k):
        mean, _, _ = nnx.merge(graphdef, params, rest)(rms.normalize(x))
        return jnp.clip(mean + noise * jax.random.normal(k, mean.shape), -1.0, 1.0)

    xs, ys, hits, ends, speeds = [], [], 0, 0, []
    key = jax.random.PRNGKey(seed)
    try:
        obs, _ = envs.reset(seed=seed)
        for _ in range(n_steps):
            x = feats({"lidar": obs["lidar"], "velocity": obs["velocity"]})
            y = label({"pose": obs["pose"], "velocity": obs["velocity"]})
            key, k = jax.random.split(key)
            a = np.asarray(y) if use_teacher else np.asarray(act(x, k))
            xs.append(np.asarray(x))
            ys.append(np.asarray(y))
            speeds.append(np.hypot(obs["velocity"][:, 0], obs["velocity"][:, 1]).mean())
            obs, _, term, trunc, info = envs.step(spec.action_dict(a))
            hits += int(np.sum(info.get("wall_collision", 0)))
            ends += int(np.sum(term | trunc))
    finally:
        envs.close()
    stats = {"contact_rate": hits / (n_envs * n_steps), "episode_ends": ends,
             "mean_speed": float(np.mean(speeds))}
    return np.concatenate(xs), np.concatenate(ys), stats


def make_fit(graphdef, lr: float, batch: int):
    tx = optax.adam(lr)

    def loss_fn(params, rest, rms, x, y):
        mean, _, _ = nnx.merge(graphdef, params, rest)(rms.normalize(x))
        return jnp.mean((mean - y) ** 2)

    def fit(params, rest, opt_state, rms, x, y, key, epochs: int):
        n = x.shape[0] // batch * batch

        def epoch(c, k):
            params, opt_state = c
            idx = jax.random.permutation(k, x.shape[0])[:n].reshape(-1, batch)

            def mb(c, i):
                params, opt_state = c
                loss, g = jax.value_and_grad(loss_fn)(params, rest, rms, x[i], y[i])
                upd, opt_state = tx.update(g, opt_state, params)
                return (optax.apply_updates(params, upd), opt_state), loss

            (params, opt_state), losses = jax.lax.scan(mb, (params, opt_state), idx)
            return (params, opt_state), losses.mean()

        (params, opt_state), losses = jax.lax.scan(epoch, (params, opt_state),
                                                   jax.random.split(key, epochs))
        return params, opt_state, losses

    return tx, jax.jit(fit, static_argnames="epochs")


def run(cfg: RLConfig) -> Path:
    """DAgger rounds (``rounds`` in the JAX backend, then ``bullet_rounds`` in PyBullet) as
    ``cfg.imitate`` says; returns the checkpoint folder. The fit: Adam at ``lr``, minibatches
    of ``batch``. The JAX data set keeps the newest ``max_samples`` labelled states; every
    PyBullet state is kept and counts ``bullet_weight`` times. The teacher's line keeps
    ``clearance`` (m) from the walls (more than the planner's default: room for the student's
    errors); ``teacher`` (:class:`rl.config.TeacherConfig`) goes to
    :class:`rl.drivers.LineFollower` (its speed profile: ``a_lat``, ``a_brake``, ``v_max``,
    ``speed_scale``; ``lookahead``, ...)."""
    if cfg.model.history:  # the data set holds single states, not the teacher's past actions
        raise configlib.ConfigError("model.history: rl.imitate fits single states (the "
                                    "student's previous action is not the teacher's); PPO only")
    ic = cfg.imitate

    t0 = time.perf_counter()
    env_params, fenv, teacher, model, track = _setup(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rollout = make_rollout(fenv, teacher, graphdef, ic.envs, ic.steps, ic.noise)
    tx, fit = make_fit(graphdef, ic.lr, ic.batch)
    opt_state = tx.init(params)
    dim = lidar_feature_dim(cfg.model.lidar_beams, cfg.model.velocity)
    rms = RunningMeanStd.create((dim,))
    key = jax.random.PRNGKey(cfg.seed)
    xs, ys = [], []
    X = np.zeros((0, dim), np.float32)
    Y = np.zeros((0, 2), np.float32)
    for r in range(ic.rounds):
        key, k_roll, k_fit = jax.random.split(key, 3)
        x, y, stats = rollout(params, rest, rms, k_roll, env_params, jnp.bool_(r == 0))
        driver = "teacher" if r == 0 else "student"
        log(f"round {r} ({driver} drives): {x.shape[0]} states, contacts "
            f"{float(stats['contact_rate']):.3f}/step, {int(stats['episode_ends'])} episode "
            f"ends, {float(stats['mean_speed']):.2f} m/s")
        xs.append(np.asarray(x))
        ys.append(np.asarray(y))
        X, Y = np.concatenate(xs)[-ic.max_samples:], np.concatenate(ys)[-ic.max_samples:]
        if r == 0:
            rms = rms.update(jnp.asarray(X))
        params, opt_state, losses = fit(params, rest, opt_state, rms, jnp.asarray(X),
                                        jnp.asarray(Y), k_fit, ic.epochs)
        log(f"  fit on {X.shape[0]} states: MSE {float(losses[0]):.4f} -> {float(losses[-1]):.4f}")
    X_jax, Y_jax = X, Y  # the JAX rounds' data set (empty without JAX rounds)
    bx, by = [], []
    for r in range(ic.bullet_rounds):
        key, k_fit = jax.random.split(key)
        teacher_drives = not xs and r == 0  # no JAX rounds: the teacher starts, as there
        x, y, stats = bullet_rollout(
            cfg, track, teacher, graphdef, params, rest, rms, cfg.seed + 7919 * (r + 1),
            ic.bullet_envs, ic.bullet_steps,
            ic.noise if ic.bullet_noise is None else ic.bullet_noise,
            workers=ic.bullet_envs > 1, use_teacher=teacher_drives)
        driver = "teacher" if teacher_drives else "student"
        log(f"PyBullet round {r} ({driver} drives): {x.shape[0]} states, contacts "
            f"{stats['contact_rate']:.3f}/step, {stats['episode_ends']} episode ends, "
            f"{stats['mean_speed']:.2f} m/s")
        bx.append(x)
        by.append(y)
        X = np.concatenate([X_jax, *[np.concatenate(bx)] * ic.bullet_weight])
        Y = np.concatenate([Y_jax, *[np.concatenate(by)] * ic.bullet_weight])
        if X_jax.shape[0] == 0 and r == 0:
            rms = rms.update(jnp.asarray(X))
        params, opt_state, losses = fit(params, rest, opt_state, rms, jnp.asarray(X),
                                        jnp.asarray(Y), k_fit, ic.epochs)
        log(f"  fit on {X.shape[0]} states ({sum(len(b) for b in bx)} from PyBullet): MSE "
            f"{float(losses[0]):.4f} -> {float(losses[-1]):.4f}")
    model = nnx.merge(graphdef, params, rest)
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    agent = split_agent(model, nnx.Param)
    ckpt = Checkpointer(run_dir / "ckpt", keep=1)
    ckpt.save(0, {"params": agent.params, "frozen": agent.frozen, "obs_rms": rms},
              {"update": 0, "imitation_rounds": ic.rounds, "bullet_rounds": ic.bullet_rounds},
              {"rl": configlib.to_dict(cfg), "kind": "ppo"})
    ckpt.close()
    log(f"wrote {run_dir / 'ckpt'} in {time.perf_counter() - t0:.0f} s")
    return run_dir / "ckpt"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="TOML config: track, task, model and its [imitate] section")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override, e.g. imitate.rounds=4 or imitate.teacher.a_lat=1.8")
    args = ap.parse_args(argv)
    cfg = cli_config("rl.imitate", args.config, args.set)
    if cfg is None:
        return 2
    if cfg.env.actuator != "motor":
        return configlib.cli_error("rl.imitate", configlib.ConfigError(
            f"env.actuator = {cfg.env.actuator!r}: the teacher drives the motor; imitate "
            "needs env.actuator = 'motor'"))
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
