"""PPO throughput: environment steps/s of the whole training loop (rollout + update).

    python -m benchmarks.ppo                                  # lidar MLP, JAX backend
    python -m benchmarks.ppo --policy multimodal --pretrain-config configs/pretrain_tiny.toml
    python -m benchmarks.ppo --num-envs 4096 --updates 5      # on a GPU

Times the runner ``rl.factory.make_runner`` builds for the JAX backend
(:class:`rl.runners.FastRunner`, what ``rl.ppo`` trains with) in chunks of ``--updates`` PPO
updates (each: a ``num_envs × num_steps`` rollout by ``lax.scan`` in the pure-JAX simulator,
then the epochs and minibatches), after one untimed chunk that compiles. Reports policy
steps/s and physics steps/s (= policy steps × action repeat: what racecar_gym calls an env
step), in total and per device.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np


def measure(cfg, updates: int) -> dict:
    """Steps/s of ``updates`` PPO updates of the :class:`rl.config.RLConfig` ``cfg``."""
    from rl import factory

    runner = factory.make_runner(cfg)
    state = runner.init(jax.random.PRNGKey(cfg.seed))
    t0 = time.perf_counter()
    state, _ = runner.run(state, updates)  # compile + first chunk
    jax.block_until_ready(state.params)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, m = runner.run(state, updates)
    jax.block_until_ready(state.params)
    dt = time.perf_counter() - t0
    steps = updates * cfg.ppo.num_envs * cfg.ppo.num_steps
    return {
        "policy": cfg.model.policy,
        "num_envs": cfg.ppo.num_envs,
        "num_steps": cfg.ppo.num_steps,
        "updates": updates,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "first_chunk_s": round(compile_s, 2),
        "policy_steps_per_s": steps / dt,
        "physics_steps_per_s": steps * cfg.env.action_repeat / dt,
        "physics_steps_per_s_per_device": steps * cfg.env.action_repeat / dt / jax.device_count(),
        "loss_finite": bool(np.isfinite(m["loss/total"]).all()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="lidar_mlp", choices=["lidar_mlp", "multimodal"])
    ap.add_argument("--track", default="procedural:0")
    ap.add_argument("--num-envs", type=int, default=256)
    ap.add_argument("--num-steps", type=int, default=64)
    ap.add_argument("--updates", type=int, default=2)
    ap.add_argument("--pretrain-config", default="configs/pretrain_tiny.toml",
                    help="architecture of the multimodal policy (random weights)")  # fmt: skip
    ap.add_argument("--set", action="append", default=[], help="extra RL config overrides")
    args = ap.parse_args(argv)
    sets = [
        f"model.policy='{args.policy}'", f"env.track='{args.track}'",
        f"ppo.num_envs={args.num_envs}", f"ppo.num_steps={args.num_steps}",
        f"ppo.total_timesteps={args.num_envs * args.num_steps * args.updates * 4}",
        *args.set,
    ]  # fmt: skip
    if args.policy == "multimodal":
        sets.append(f"finetune.pretrain_config='{args.pretrain_config}'")
    from etl import configlib
    from rl.config import RLConfig

    cfg = configlib.cli_load("benchmarks.ppo", RLConfig, None, sets)
    if cfg is None:
        return configlib.EXIT_CONFIG
    r = measure(cfg, args.updates)
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
