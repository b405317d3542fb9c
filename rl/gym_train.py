"""The gymnasium path of ``rl.ppo``: PPO on host-collected rollouts from the PyBullet backend
(or racecar_gym itself), with the same update as the fast runner.

Resume restores the learner (parameters, optimizer, normalization statistics, RNG) exactly;
the simulators' physics state cannot be checkpointed, so the environments start new episodes
(seeded from the update counter) after a resume.
"""

from __future__ import annotations

import time
from pathlib import Path

import gymnasium as gym
import jax
import numpy as np

from etl import configlib
from rl.config import RLConfig


def make_env_fn(cfg: RLConfig, track: str):
    """A picklable-free factory (names only) for one wrapped env of the configured backend."""
    from rl.envs.wrappers import ActionRepeat

    def make():
        from rl.ppo import task_config

        if cfg.env.backend == "bullet":
            from rl.envs.bullet import BulletRacecarEnv

            env = BulletRacecarEnv(track, task_config(cfg), camera=cfg.env.camera)
        else:
            from rl.envs.racecar_gym_env import make_racecar_gym_env

            env = make_racecar_gym_env(track, task_config(cfg), camera=cfg.env.camera)
        return ActionRepeat(env, cfg.env.action_repeat)

    return make


def make_vector_env(cfg: RLConfig, num_envs: int, track: str | None = None):
    """``num_envs`` envs; a track list ("a,b,procedural:1-4") gives env i track i mod n."""
    from rl.tracks import track_names

    names = track_names(track or cfg.env.track)
    fns = [make_env_fn(cfg, names[i % len(names)]) for i in range(num_envs)]
    mode = gym.vector.AutoresetMode.SAME_STEP
    if cfg.env.bullet_workers > 0:
        return gym.vector.AsyncVectorEnv(fns, context="forkserver", autoreset_mode=mode)
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)


def to_env_action(a: np.ndarray) -> dict:
    return {"motor": a[:, 0:1].astype(np.float32), "steering": a[:, 1:2].astype(np.float32)}


INFO_KEYS = ("laps_driven", "collisions", "distance")


def build_gym(cfg: RLConfig):
    from rl.ppo import make_agent
    from rl.runners import GymRunner

    envs = make_vector_env(cfg, cfg.ppo.num_envs)
    model, featurize, trainable = make_agent(cfg, cfg.seed)
    runner = GymRunner(
        envs, model, cfg.ppo, jax.vmap(featurize), to_env_action, trainable, INFO_KEYS
    )
    return runner


def _ckpt_state(st: dict) -> dict:
    keys = ("params", "opt_state", "obs_rms", "ret_rms", "key")
    return {k: st[k] for k in keys}


def run_gym(cfg: RLConfig, run_dir: Path, max_updates: int | None = None) -> int:
    from rl.ppo import EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, Logger, Preemption, log
    from train.checkpoint import Checkpointer

    runner = build_gym(cfg)
    st = runner.init(jax.random.PRNGKey(cfg.seed), seed=cfg.seed)
    ckpt = Checkpointer(run_dir / "ckpt", keep=cfg.keep)
    record = {"rl": configlib.to_dict(cfg), "kind": "ppo"}
    start = ckpt.latest_step()
    if start is not None:
        restored, data, _ = ckpt.restore(_ckpt_state(st), step=start)
        st.update(restored)
        st["update"] = int(data["update"])
        st["obs"], _ = runner.envs.reset(seed=cfg.seed + 1000 * st["update"])
        log(f"resumed {run_dir} at update {st['update']} (environments restart their episodes)")
    elif cfg.finetune.init_policy:
        from rl.ppo import warm_start_policy

        st["params"], st["frozen"], st["obs_rms"] = warm_start_policy(cfg)
        log(f"policy initialised from {cfg.finetune.init_policy}")
    total = runner.num_updates if max_updates is None else min(runner.num_updates, max_updates)
    logger = Logger(run_dir)
    preempt = Preemption()
    code = EXIT_OK
    steps_per_update = cfg.ppo.num_envs * cfg.ppo.num_steps
    log(f"{cfg.run_name}: {cfg.model.policy} on {cfg.env.track} ({cfg.env.backend} backend), "
        f"{cfg.ppo.num_envs} envs × {cfg.ppo.num_steps} steps, {total} updates")  # fmt: skip
    try:
        while st["update"] < total:
            t0 = time.perf_counter()
            st, m = runner.update(st)
            dt = time.perf_counter() - t0
            m = {k: float(np.asarray(v)) for k, v in m.items()}
            m["sps"] = steps_per_update / dt
            m["physics_sps"] = m["sps"] * cfg.env.action_repeat
            logger.write(st["update"] * steps_per_update, m)
            if st["update"] % cfg.updates_per_log == 0 or st["update"] == total:
                log(f"update {st['update']}/{total}  return {m['episode/ep_return']:.1f}  "
                    f"laps {m['episode/laps_driven']:.2f}  sps {m['sps']:.0f}")  # fmt: skip
            if not np.isfinite(m["loss/total"]):
                log(f"non-finite loss at update {st['update']}: stopping; no checkpoint written")
                code = EXIT_NONFINITE
                break
            u = st["update"]
            if u % cfg.ckpt_every == 0 or u >= total or preempt.signal:
                ckpt.save(u, _ckpt_state(st), {"update": u}, record)
            if preempt.signal:
                log(f"signal {preempt.signal}: saved update {u}, exiting for requeue")
                code = EXIT_PREEMPTED
                break
    finally:
        preempt.restore()
        ckpt.close()
        logger.close()
        runner.envs.close()
    return code
