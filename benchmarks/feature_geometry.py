"""How much of the walls' geometry the multimodal policy's features keep: a linear probe.

    python -m benchmarks.feature_geometry                       # Austria, the §2 policy config
    python -m benchmarks.feature_geometry --track procedural:0 --states 4096

The lidar MLP that laps Austria reads the scan's ranges directly; the multimodal policy reads
them through the lidar BEV, the (frozen) encoders and fusion, and a pooling
(``model.pooling``). This asks whether that input still holds the ranges. It draws
``--states`` random starts on ``--track`` (the task's random reset: every pose along the lap),
takes the scan's every 5th ray clipped to the BEV's reach (its half-width over
``env.world_scale``: 3.2 m in the simulator at scale 10), and fits a ridge regression from
the features to those ranges on the first 5/6 of the states. It reports R² on the rest, the
best over a fixed set of ridge strengths (the same set for every feature), for the
encoders pretrained (``finetune.pretrained_ckpt``) and at a random init, under "mean" and
"grid" pooling. R² near 1: the ranges are a linear read-out of the features; the heads are an
MLP, so this bounds what they need to learn, not what they can.

Measured (2026-12-07, this 2-core CPU, the study's CPU pretraining, Austria, 3,072 states):
mean 0.62 pretrained / 0.66 random init; grid 0.94 / 0.91.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import numpy as np

from etl import configlib
from rl.config import RLConfig
from rl.envs.jax_env import JaxRacecar, SensorConfig, car, make_params
from rl.factory import make_agent, task_config

PROG = "benchmarks.feature_geometry"
LAMBDAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


def ridge_r2(x: np.ndarray, y: np.ndarray, n_train: int) -> float:
    """Held-out R² (pooled over the outputs) of a ridge fit on the first ``n_train`` rows, the
    best over :data:`LAMBDAS`; inputs standardized on the training rows."""
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = np.concatenate([(x - mu) / sd, np.ones((len(x), 1))], axis=1)
    xt, yt = x[:n_train], y[:n_train]
    total = ((y[n_train:] - yt.mean(0)) ** 2).sum()
    best = -np.inf
    gram, xty = xt.T @ xt, xt.T @ yt
    for lam in LAMBDAS:
        w = np.linalg.solve(gram + lam * np.eye(len(gram)), xty)
        best = max(best, 1.0 - float(((x[n_train:] @ w - y[n_train:]) ** 2).sum() / total))
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/rl_austria_multimodal.toml")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--track", default=None, help="default: the config's env.track")
    ap.add_argument("--states", type=int, default=3072)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args(argv)
    base = configlib.cli_load(PROG, RLConfig, args.config, args.set)
    if base is None:
        return configlib.EXIT_CONFIG
    if base.model.policy != "multimodal":
        configlib.cli_error(PROG, configlib.ConfigError(
            f"model.policy: {base.model.policy!r}; the probe reads the multimodal policy's "
            "features"))
        return configlib.EXIT_CONFIG
    track = args.track or base.env.track
    task = task_config(base)
    sim = JaxRacecar(task, car(task.car, actuator=task.actuator), SensorConfig())
    keys = jax.random.split(jax.random.PRNGKey(0), args.states)
    obs, _ = jax.jit(jax.vmap(sim.reset, in_axes=(0, None)))(keys, make_params(track))
    scan = np.asarray(obs["lidar"], np.float64)
    n_train = args.states * 5 // 6
    out = {"track": track, "states": args.states, "r2": {}}
    target = None
    for init in ("pretrained", "scratch"):
        for pooling in ("mean", "grid"):
            cfg = dataclasses.replace(
                base, finetune=dataclasses.replace(base.finetune, init=init),
                model=dataclasses.replace(base.model, pooling=pooling, feature_norm=False))
            model, featurize, _ = make_agent(cfg, 0)
            if target is None:  # the BEV's forward reach, in simulator metres
                reach = model.mae.pre.lidar.x_max / base.env.world_scale
                target = np.minimum(scan[:, ::5], reach) / reach
                out["reach_m"] = reach
            pooled = jax.jit(lambda o, m=model, f=featurize: m.pooled(jax.vmap(f)(o)))
            z = np.concatenate([
                np.asarray(pooled(jax.tree.map(lambda a, i=i: a[i:i + args.batch], obs)))
                for i in range(0, args.states, args.batch)]).astype(np.float64)
            r2 = ridge_r2(z, target, n_train)
            out["r2"][f"{init}/{pooling}"] = r2
            print(f"{track}  encoders {init:10s}  pooling {pooling:4s}  dim {z.shape[1]:5d}  "
                  f"R² of the ranges within {reach:.1f} m: {r2:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
