"""PPO throughput: environment steps/s of the whole training loop (rollout + update).

    python -m benchmarks.ppo                                  # lidar MLP, JAX backend
    python -m benchmarks.ppo --policy multimodal --pretrain-config configs/pretrain_tiny.toml
    python -m benchmarks.ppo --config configs/rl_study_cpu.toml \
        --pretrain-config configs/pretrain_tiny.toml --baseline --breakdown
    python -m benchmarks.ppo --config configs/rl_study_cpu.toml \
        --pretrain-config configs/pretrain_tiny.toml --pretrain-set model.embed_dim=32
    python -m benchmarks.ppo --num-envs 4096 --updates 5      # on a GPU

Times the runner ``rl.factory.make_runner`` builds for the JAX backend
(:class:`rl.runners.FastRunner`, what ``rl.ppo`` trains with) in chunks of ``--updates`` PPO
updates (each: a ``num_envs × num_steps`` rollout by ``lax.scan`` in the pure-JAX simulator,
then the epochs and minibatches), after one untimed chunk that compiles. Reports policy
steps/s and physics steps/s (= policy steps × action repeat: what racecar_gym calls an env
step), in total and per device; the best of ``--rounds`` timed chunks (a shared machine's
other load only ever slows a chunk down), and the process CPU time per chunk.

``--baseline`` (multimodal policy) also times, in the same run and alternating chunk by chunk
with the runner above, the path without frozen-feature reuse: the observation adapter inside
the environment (a BEV for the observation, the reset's and the final one of every env, every
step) and the whole agent, encoders included, recomputed by every minibatch of the update — the
path fine-tuned encoders take, and the one frozen encoders took before they were reused — and
reports the ratio. ``--versus KEY=VALUE`` does the same for the config with that override
(a before/after in one run). ``--breakdown`` times the parts of one update separately, in ms
per policy step of all envs: the simulator alone, the observation adapter (the BEV), the encoders'
forward, the heads, the whole rollout, and the update (epochs × minibatches).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def baseline_runner(cfg):
    """The multimodal runner without frozen-feature reuse (see the module docstring)."""
    from rl import factory
    from rl.runners import FastRunner

    model, featurize, trainable = factory.make_agent(cfg)
    env, params = factory.make_functional(cfg, featurize)
    return FastRunner(env, model, cfg.ppo, trainable, mesh=factory.device_mesh(cfg.ppo.num_envs),
                      env_params=params, reuse_features=False)


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0, time.process_time() - c0


def measure(cfg, updates: int, rounds: int = 2, baseline: bool = False,
            versus=None) -> dict:
    """Steps/s of ``updates`` PPO updates of the :class:`rl.config.RLConfig` ``cfg`` (and of
    :func:`baseline_runner` with ``baseline``, and of the runner of the config ``versus``,
    alternating chunk by chunk)."""
    from rl import factory

    runners = {"runner": factory.make_runner(cfg)}
    if baseline:
        runners["baseline"] = baseline_runner(cfg)
    if versus is not None:
        runners["versus"] = factory.make_runner(versus)
    states, out = {}, {}
    for name, r in runners.items():
        state = r.init(jax.random.PRNGKey(cfg.seed))
        (state, _), wall, _ = _timed(lambda r=r, s=state: r.run(s, updates))  # compile + run
        states[name] = state
        out[name] = {"first_chunk_s": round(wall, 2), "wall_s": [], "cpu_s": []}
    metrics = {}
    for _ in range(rounds):
        for name, r in runners.items():
            (states[name], metrics[name]), wall, cpu = _timed(
                lambda r=r, s=states[name]: r.run(s, updates))
            out[name]["wall_s"].append(wall)
            out[name]["cpu_s"].append(cpu)
    steps = updates * cfg.ppo.num_envs * cfg.ppo.num_steps
    n_dev = jax.device_count()
    result = {
        "policy": cfg.model.policy,
        "num_envs": cfg.ppo.num_envs,
        "num_steps": cfg.ppo.num_steps,
        "updates": updates,
        "devices": n_dev,
        "device_kind": jax.devices()[0].device_kind,
    }
    for name, o in out.items():
        dt = min(o["wall_s"])
        runner = runners[name]
        row = {
            "reuse_features": getattr(runner, "reuse_features", False),
            "first_chunk_s": o["first_chunk_s"],
            "chunk_wall_s": [round(x, 3) for x in o["wall_s"]],
            "chunk_cpu_s": [round(x, 3) for x in o["cpu_s"]],
            "policy_steps_per_s": steps / dt,
            "policy_steps_per_cpu_s": steps / min(o["cpu_s"]),
            "physics_steps_per_s": steps * cfg.env.action_repeat / dt,
            "physics_steps_per_s_per_device": steps * cfg.env.action_repeat / dt / n_dev,
            "loss_finite": bool(np.isfinite(metrics[name]["loss/total"]).all()),
        }
        if name == "runner":
            result.update(row)
        else:
            result[name] = row
    for name in ("baseline", "versus"):
        if name in result:
            b = result[name]
            result[f"speedup_vs_{name}"] = (result["policy_steps_per_s"]
                                            / b["policy_steps_per_s"])
            result[f"speedup_vs_{name}_cpu"] = (result["policy_steps_per_cpu_s"]
                                                / b["policy_steps_per_cpu_s"])
    return result


def _best_ms(fn, args, reps: int, per: int) -> tuple[float, float]:
    """Best wall and process CPU time of ``fn(*args)`` over ``reps`` calls (after a compiling
    one), in ms per ``per``."""
    jax.block_until_ready(fn(*args))
    wall = cpu = float("inf")
    for _ in range(reps):
        _, w, c = _timed(lambda: fn(*args))
        wall, cpu = min(wall, w), min(cpu, c)
    return 1e3 * wall / per, 1e3 * cpu / per


def breakdown(cfg, reps: int = 2) -> dict:
    """Wall and process CPU ms per policy step of all ``num_envs`` envs of each part of one
    update (see the module docstring). Each part is jitted alone over a rollout's
    ``num_steps`` (parts that are not a scan repeat over inputs perturbed per step, so nothing
    is hoisted)."""
    from rl import factory

    runner = factory.make_runner(cfg)
    n, t = cfg.ppo.num_envs, cfg.ppo.num_steps
    rs = runner.init(jax.random.PRNGKey(cfg.seed))
    env, params = runner.env, runner.env_params
    step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def sim(key, env_state):
        def body(st, i):
            a = jnp.stack([jnp.full((n,), 0.5), 0.3 * jnp.sin(0.2 * i + jnp.arange(n))], 1)
            obs, st, r, *_ = step(jax.random.split(jax.random.fold_in(key, i), n), st, a,
                                  params)
            return st, r.sum() + sum(x.reshape(-1)[0] for x in jax.tree.leaves(obs))
        return jax.lax.scan(body, env_state, jnp.arange(t))[1].sum()

    def repeat(f):
        """f on the rollout's observation, perturbed per step, num_steps times."""
        def g(obs):
            def body(c, i):
                o = jax.tree.map(lambda v: v + 1e-6 * i
                                 if jnp.issubdtype(v.dtype, jnp.floating) else v, obs)
                return c + sum(jnp.sum(x) for x in jax.tree.leaves(f(o))), None
            return jax.lax.scan(body, jnp.float32(0), jnp.arange(t, dtype=jnp.float32))[0]
        return jax.jit(g)

    feat = runner._featurize
    ag = runner.agent
    ms = {}
    ms["sim"] = _best_ms(jax.jit(sim), (jax.random.PRNGKey(1), rs.env_state), reps, t)
    if runner.featurize is not None:
        ms["adapter"] = _best_ms(repeat(feat), (rs.obs,), reps, t)
        ms["adapter+encoder"] = _best_ms(
            repeat(lambda o: ag.features(rs.params, rs.frozen, feat(o))), (rs.obs,), reps, t)
    ms["adapter+agent"] = _best_ms(
        repeat(lambda o: runner._outputs(rs, runner._inputs(rs, o))), (rs.obs,), reps, t)
    rollout = jax.jit(runner.rollout)
    ms["rollout"] = _best_ms(rollout, (rs,), reps, t)
    rs2, traj, _ = rollout(rs)
    last = jax.jit(runner._inputs)(rs2, rs2.obs)
    learn = jax.jit(runner.learn)
    ms["update"] = _best_ms(learn, (rs.params, rs.opt_state, rs.frozen, None, traj, last,
                                    jax.random.PRNGKey(2)), reps, t)
    total = [ms["rollout"][i] + ms["update"][i] for i in (0, 1)]
    return {
        "num_envs": n, "num_steps": t, "reuse_features": runner.reuse_features,
        "wall_ms_per_policy_step": {k: round(v[0], 3) for k, v in ms.items()},
        "cpu_ms_per_policy_step": {k: round(v[1], 3) for k, v in ms.items()},
        "policy_steps_per_s_from_parts": round(n * 1e3 / total[0], 1),
        "policy_steps_per_cpu_s_from_parts": round(n * 1e3 / total[1], 1),
    }  # fmt: skip


def _pretrain_variant(path: str, overrides: list[str]) -> str:
    """``path``, or with ``overrides`` a temporary pretraining TOML holding just its [model]
    with them applied (the architecture is all the policy takes from it)."""
    if not overrides:
        return path
    import tempfile

    from etl import configlib
    from train.config import load_pretrain_config

    model = configlib.to_dict(load_pretrain_config(path, overrides).model)
    lines = ["[model]", *(f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}"
                          for k, v in model.items())]
    f = tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="pretrain_", delete=False)
    f.write("\n".join(lines) + "\n")
    f.close()
    return f.name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="an RL config (default: the built-in one "
                    "with the flags below); flags given override its keys")
    ap.add_argument("--policy", default=None, choices=["lidar_mlp", "multimodal"])
    ap.add_argument("--track", default=None)
    ap.add_argument("--num-envs", type=int, default=None)
    ap.add_argument("--num-steps", type=int, default=None)
    ap.add_argument("--updates", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="timed chunks (the best is reported)")
    ap.add_argument("--pretrain-config", default=None,
                    help="architecture of the multimodal policy (random weights; default "
                         "configs/pretrain_tiny.toml without --config)")  # fmt: skip
    ap.add_argument("--pretrain-set", action="append", default=[],
                    help="override a key of the pretraining config's [model] (e.g. "
                         "model.embed_dim=32): the encoders' architecture to time")
    ap.add_argument("--baseline", action="store_true",
                    help="also time the path without frozen-feature reuse, and the ratio")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the parts of an update: sim, adapter, encoders, update")
    ap.add_argument("--set", action="append", default=[], help="extra RL config overrides")
    ap.add_argument("--versus", action="append", default=[],
                    help="also time the same config with this override (repeatable; e.g. "
                         "model.lidar_tokens=0 for the full BEV), alternating chunks, and "
                         "report the ratio: a before/after in one run")  # fmt: skip
    args = ap.parse_args(argv)
    if args.config is None:  # the built-in defaults
        args.policy = args.policy or "lidar_mlp"
        args.track = args.track or "procedural:0"
        args.num_envs = args.num_envs or 256
        args.num_steps = args.num_steps or 64
        if args.policy == "multimodal":
            args.pretrain_config = args.pretrain_config or "configs/pretrain_tiny.toml"
    sets = [f"model.policy='{args.policy}'"] if args.policy else []
    sets += [f"env.track='{args.track}'"] if args.track else []
    sets += [f"ppo.num_envs={args.num_envs}"] if args.num_envs else []
    sets += [f"ppo.num_steps={args.num_steps}"] if args.num_steps else []
    if args.pretrain_set and not args.pretrain_config:
        ap.error("--pretrain-set needs --pretrain-config")
    if args.pretrain_config:
        path = _pretrain_variant(args.pretrain_config, args.pretrain_set)
        sets += ["finetune.init='scratch'", "finetune.pretrained_ckpt=''",
                 f"finetune.pretrain_config='{path}'"]
    from etl import configlib
    from rl.config import RLConfig

    cfg = configlib.cli_load("benchmarks.ppo", RLConfig, args.config, [*sets, *args.set])
    if cfg is None:
        return configlib.EXIT_CONFIG
    n_steps = cfg.ppo.num_envs * cfg.ppo.num_steps * args.updates * (args.rounds + 2)
    cfg = configlib.load(RLConfig, args.config,
                         [*sets, *args.set, f"ppo.total_timesteps={n_steps}"])
    if args.baseline and cfg.model.policy != "multimodal":
        configlib.cli_error("benchmarks.ppo",
                            configlib.ConfigError("--baseline: the multimodal policy's"))
        return configlib.EXIT_CONFIG
    versus = None
    if args.versus:
        versus = configlib.load(RLConfig, args.config, [*sets, *args.set, *args.versus,
                                                        f"ppo.total_timesteps={n_steps}"])
        if (versus.ppo.num_envs, versus.ppo.num_steps) != (cfg.ppo.num_envs, cfg.ppo.num_steps):
            configlib.cli_error("benchmarks.ppo", configlib.ConfigError(
                "--versus: keep ppo.num_envs and ppo.num_steps (the chunks must be the same "
                "number of steps)"))
            return configlib.EXIT_CONFIG
    print(json.dumps(measure(cfg, args.updates, args.rounds, args.baseline, versus), indent=2),
          flush=True)
    if args.breakdown:  # printed apart: a time limit that stops it keeps the figure above
        print(json.dumps({"breakdown": breakdown(cfg)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
