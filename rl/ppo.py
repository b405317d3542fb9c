"""PPO in the racing simulators, from scratch or from the pretrained encoders.

    python -m rl.ppo --config configs/rl_racecar.toml [--set ppo.total_timesteps=2e6 ...]

Read top to bottom: build the environment and the agent from the config, restore the run if
it has a checkpoint, then loop — one jitted chunk of PPO updates (fast runner) or one
host-collected rollout and update (gymnasium runner) — logging and checkpointing between.

* ``env.backend = "jax"``: :class:`rl.runners.FastRunner` — rollouts by ``lax.scan`` in the
  pure-JAX simulator, the whole update in one jitted function, envs sharded over devices.
* ``env.backend = "bullet" | "racecar_gym"``: :class:`rl.runners.GymRunner` on a gymnasium
  vector env, the same PPO update.

Writes ``runs/{run_name}/``: ``metrics.jsonl`` and TensorBoard events (episode return,
progress in laps, collisions, SPS, losses), ``ckpt/`` (Orbax: the whole runner state, so a
resumed run continues exactly), ``config.json``. SIGTERM/SIGUSR1 (Slurm preemption) save and
exit with code 3 so the job can be requeued; a non-finite loss stops with code 2 and no
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from etl import configlib
from rl.config import RLConfig, cli_config
from train.preempt import Preemption

EXIT_OK, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 2, 3


def log(msg: str) -> None:
    print(f"[ppo] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- building blocks
def task_config(cfg: RLConfig):
    from rl.envs.spec import TaskConfig

    e = cfg.env
    return TaskConfig(
        laps=e.laps,
        time_limit=e.time_limit,
        terminate_on_collision=e.terminate_on_collision,
        progress_reward=e.progress_reward,
        collision_reward=-e.collision_penalty,
        frame_reward=e.frame_reward,
        proximity_reward=-e.proximity_penalty,
        wall_margin=e.wall_margin,
        stall_time=e.stall_time,
        stall_speed=e.stall_speed,
        reset_mode=e.reset_mode,
        observe_camera=e.camera,
    )


def make_agent(cfg: RLConfig, key_seed: int):
    """(model, featurize, trainable filter) for the configured policy."""
    from flax import nnx

    from rl.agent import MLPActorCritic, lidar_features

    rngs = nnx.Rngs(key_seed)
    if cfg.model.policy == "lidar_mlp":
        beams = cfg.model.lidar_beams
        model = MLPActorCritic(beams + 6, 2, cfg.model.hidden, cfg.ppo.init_log_std, rngs=rngs)
        return model, (lambda obs: lidar_features(obs, beams)), nnx.Param
    from rl.agent import build_multimodal_agent

    return build_multimodal_agent(cfg, rngs)


class Logger:
    def __init__(self, run_dir: Path):
        self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self.tb = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        rec = {"env_steps": step, **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if np.isfinite(v):
                    self.tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _summarize(metrics: dict[str, np.ndarray]) -> dict[str, float]:
    """Chunk metrics (stacked per update) → one number each (NaN-aware means)."""
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v, np.float64)
        if k == "episodes":
            out[k] = float(v.sum())
        elif np.isfinite(v).any():
            out[k] = float(np.nanmean(v))
        else:
            out[k] = float("nan")
    return out


# --------------------------------------------------------------------------- runners
def build_fast(cfg: RLConfig):
    """The JAX-backend runner and its initial state."""
    from rl.envs.functional import INFO_KEYS, RacecarFunctional
    from rl.envs.jax_env import Dynamics, JaxRacecar, SensorConfig, make_params
    from rl.runners import FastRunner

    params = make_params(cfg.env.track)  # one track, or a list tiled into one map
    sensors = SensorConfig(camera=cfg.env.camera, lidar_rays=cfg.env.lidar_rays,
                           yaw_rate_noise=cfg.env.yaw_rate_noise)
    env = JaxRacecar(task_config(cfg), Dynamics(), sensors)
    model, featurize, trainable = make_agent(cfg, cfg.seed)
    fenv = RacecarFunctional(env, featurize, cfg.env.action_repeat)
    mesh = None
    if jax.device_count() > 1 and cfg.ppo.num_envs % jax.device_count() == 0:
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    runner = FastRunner(fenv, model, cfg.ppo, trainable, mesh=mesh, info_keys=INFO_KEYS)
    state = runner.init(jax.random.PRNGKey(cfg.seed), params)
    return runner, state


def run(cfg: RLConfig, max_updates: int | None = None) -> int:
    """Train (or resume) the configured run; returns the process exit code."""
    from train.checkpoint import Checkpointer

    run_dir = Path(cfg.runs_dir) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(configlib.to_dict(cfg), indent=2))
    if cfg.env.backend != "jax":
        from rl.gym_train import run_gym

        return run_gym(cfg, run_dir, max_updates)

    runner, state = build_fast(cfg)
    ckpt = Checkpointer(run_dir / "ckpt", keep=cfg.keep)
    record = {"rl": configlib.to_dict(cfg), "kind": "ppo"}
    start = ckpt.latest_step()
    if start is not None:
        state, _, _ = ckpt.restore(state, step=start)
        log(f"resumed {run_dir} at update {start}")
    elif cfg.finetune.init_policy:
        params, frozen, obs_rms = warm_start_policy(cfg)
        state = runner.shard(state._replace(params=params, frozen=frozen, obs_rms=obs_rms))
        log(f"policy initialised from {cfg.finetune.init_policy}")
    update = int(state.update)
    total = runner.num_updates if max_updates is None else min(runner.num_updates, max_updates)
    steps_per_update = cfg.ppo.num_envs * cfg.ppo.num_steps
    logger = Logger(run_dir)
    preempt = Preemption()
    code = EXIT_OK
    log(
        f"{cfg.run_name}: {cfg.model.policy} on {cfg.env.track} (jax backend), "
        f"{cfg.ppo.num_envs} envs × {cfg.ppo.num_steps} steps, {total} updates, "
        f"{jax.device_count()} device(s)"
    )
    try:
        while update < total:
            n = min(cfg.updates_per_log, total - update)
            t0 = time.perf_counter()
            state, metrics = runner.run(state, n)
            jax.block_until_ready(state.params)
            dt = time.perf_counter() - t0
            update += n
            m = _summarize(metrics)
            m["sps"] = n * steps_per_update / dt
            m["physics_sps"] = m["sps"] * cfg.env.action_repeat
            env_steps = update * steps_per_update
            logger.write(env_steps, m)
            log(
                f"update {update}/{total}  steps {env_steps}  return {m['episode/ep_return']:.1f}  "
                f"laps {m.get('episode/progress', float('nan')):.2f}  "
                f"collisions {m.get('episode/collisions', float('nan')):.2f}  "
                f"lap time {m.get('episode/lap_time', float('nan')):.1f} s  "
                f"sps {m['sps']:.0f}"
            )
            if not np.isfinite(m["loss/total"]):
                log(f"non-finite loss at update {update}: stopping; no checkpoint written")
                code = EXIT_NONFINITE
                break
            if update % cfg.ckpt_every == 0 or update >= total or preempt.signal:
                ckpt.save(update, state, {}, record)
            if preempt.signal:
                log(f"signal {preempt.signal}: saved update {update}, exiting for requeue")
                code = EXIT_PREEMPTED
                break
    finally:
        preempt.restore()
        ckpt.close()
        logger.close()
    return code


def restore_policy(ckpt_dir: str | Path, step: int | None = None):
    """(config, model, obs_rms) of a PPO checkpoint: the policy for evaluation.

    Restores only the policy's parameters (and the observation statistics) — a partial Orbax
    restore — so no simulator is built and checkpoints stay loadable when the simulator's
    internal state changes between versions.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    from rl.ppo_core import RunningMeanStd
    from rl.runners import split_agent
    from train.checkpoint import Checkpointer, abstract

    ckpt = Checkpointer(ckpt_dir)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint")
    rec = ckpt.saved_config(step)
    if rec.get("kind") != "ppo":
        raise ValueError(f"{ckpt_dir}: not a PPO checkpoint")
    cfg = configlib.from_dict(RLConfig, rec["rl"])
    model, _, trainable = make_agent(cfg, cfg.seed)
    agent = split_agent(model, trainable)
    target = {"params": agent.params}
    if cfg.env.backend == "jax":
        target["frozen"] = agent.frozen  # the fast runner saves the frozen part too
    if cfg.model.policy == "lidar_mlp" and cfg.ppo.norm_obs:
        target["obs_rms"] = RunningMeanStd.create((cfg.model.lidar_beams + 6,))
    out = ckpt.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract(target), partial_restore=True)
        ),
    )["state"]
    ckpt.close()
    frozen = out.get("frozen", agent.frozen)
    return cfg, nnx.merge(agent.graphdef, out["params"], frozen), out.get("obs_rms")


def warm_start_policy(cfg: RLConfig) -> tuple[Any, Any, Any]:
    """(params, frozen, obs_rms) of the PPO checkpoint ``cfg.finetune.init_policy``, checked
    against this run's agent: the [model] sections must match, and so must the observation
    normalization. Raises ValueError naming the mismatch."""
    from rl.runners import split_agent

    src = cfg.finetune.init_policy
    src_cfg, model, obs_rms = restore_policy(Path(src))
    mine, theirs = configlib.to_dict(cfg.model), configlib.to_dict(src_cfg.model)
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        raise ValueError(f"finetune.init_policy {src}: [model] differs from this config in "
                         + ", ".join(f"{k} ({theirs.get(k)!r} there, {mine.get(k)!r} here)"
                                     for k in diff))
    if (obs_rms is not None) != (cfg.model.policy == "lidar_mlp" and cfg.ppo.norm_obs):
        raise ValueError(f"finetune.init_policy {src}: ppo.norm_obs differs "
                         f"({src_cfg.ppo.norm_obs} there, {cfg.ppo.norm_obs} here)")
    _, _, trainable = make_agent(cfg, cfg.seed)
    agent = split_agent(model, trainable)
    own = lambda t: jax.tree.map(lambda x: jax.numpy.array(x, copy=True), t)  # noqa: E731
    return own(agent.params), own(agent.frozen), own(obs_rms)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="TOML config (defaults when omitted)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one key, e.g. --set ppo.num_envs=256")  # fmt: skip
    ap.add_argument("--max-updates", type=int, help="stop after this many updates (in total)")
    args = ap.parse_args(argv)
    cfg = cli_config("rl.ppo", args.config, args.set)
    if cfg is None:
        return 2
    return run(cfg, args.max_updates)


if __name__ == "__main__":
    sys.exit(main())
