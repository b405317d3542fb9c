"""Pretraining throughput: samples/s per device and MFU of the jitted train step.

    python -m benchmarks.pretrain                          # the seed config + a ViT-B-sized one
    python -m benchmarks.pretrain --preset seed --batch-size 64 --steps 20     # on a GPU
    python -m benchmarks.pretrain --config configs/pretrain_tiny.toml --set model.dtype=float32

Times the very step train.pretrain runs (same init, shardings, donation) on random batches of
the contract's shapes (the preprocess config of --data, or the ETL defaults: 224² images, 128²
BEV grids), after --warmup untimed steps. MFU = model_flops_per_sample (the architecture's
analytic matmul FLOPs, training = 3× forward) × samples/s ÷ (peak FLOP/s × devices); the peak
comes from a table by device kind (H100 989 TFLOP/s bf16 dense, A100 312, …) and, on a CPU,
from a measured float32 matmul (the machine's own attainable throughput).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from etl import configlib
from etl.config import PreprocessConfig
from etl.schema import MODALITIES, sample_spec
from train import metrics as metricslib
from train import pretrain
from train import sharding as shardlib
from train.config import ModelConfig, PretrainConfig

PRESETS = {
    # configs/pretrain_cmht.toml's model
    "seed": {},
    # ViT-B widths: 768 wide, 12 heads, 12 blocks on every token's path (4 per-modality + 8 fused)
    "vitb": dict(embed_dim=768, num_heads=12, depth=4, fusion_depth=8, decoder_dim=512,
                 decoder_depth=4, decoder_heads=16),
}


def random_batch(pre: PreprocessConfig, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    spec = sample_spec(pre)
    out = {m: rng.normal(size=(batch, *spec[m].shape)).astype(np.float32) for m in MODALITIES}
    out["present"] = np.ones((batch, len(MODALITIES)), np.uint8)
    out["offset"] = np.zeros((batch, len(MODALITIES)), np.float32)
    return out


def bench(cfg, pre, steps: int, warmup: int) -> dict:
    model_cls, flops_fn = pretrain.default_model()
    mesh = shardlib.make_mesh(cfg.mesh)
    tx = pretrain.make_optimizer(cfg.training)
    t0 = time.perf_counter()
    graphdef, state, state_sh = pretrain.init_state(cfg, pre, model_cls, tx, mesh)
    batch_sh = shardlib.batch_sharding(mesh)
    batch = shardlib.to_global(random_batch(pre, cfg.training.batch_size), batch_sh)
    step_fn = jax.jit(pretrain.make_train_step(graphdef, tx, cfg), donate_argnums=(0,),
                      in_shardings=(state_sh, batch_sh, None, batch_sh),
                      out_shardings=(state_sh, None))
    stop = jax.device_put(jnp.zeros(mesh.devices.size, jnp.float32), batch_sh)  # no preemption
    compiled = step_fn.lower(state, batch, jnp.int32(0), stop).compile()
    t_compile = time.perf_counter() - t0
    xla_flops = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla_flops = float(cost.get("flops", float("nan")))
    except Exception:  # cost analysis is best effort
        pass
    for i in range(warmup):
        state, m = compiled(state, batch, jnp.int32(i), stop)
    jax.block_until_ready(state)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, batch, jnp.int32(warmup + i), stop)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
    n_dev = mesh.devices.size
    dt = float(np.median(times))
    bs = cfg.training.batch_size
    flops = flops_fn(cfg.model, pre, cfg.training.mask_ratio, training=True)
    peak, src = metricslib.peak_flops_per_device(dtype=cfg.model.dtype)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    return {
        "device": f"{n_dev}× {jax.devices()[0].device_kind}",
        "dtype": cfg.model.dtype,
        "params_M": n_params / 1e6,
        "batch": bs,
        "mask_ratio": cfg.training.mask_ratio,
        "gflop_per_sample_step": flops / 1e9,
        "xla_gflop_per_step": None if xla_flops is None else xla_flops / 1e9,
        "compile_s": t_compile,
        "step_s_median": dt,
        "step_s_min": float(np.min(times)),
        "samples_per_s_per_device": bs / dt / n_dev,
        "achieved_tflops_per_device": flops * bs / dt / n_dev / 1e12,
        "peak_tflops_per_device": peak / 1e12,
        "peak_source": src,
        "mfu": flops * bs / dt / (peak * n_dev),
        "loss": float(m["loss"]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/pretrain_cmht.toml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS),
                    help="model size(s) to time (default: seed and vitb)")
    ap.add_argument("--batch-size", type=int, default=None, help="global batch (default: "
                    "the config's on an accelerator, 2 per device on a CPU)")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the config's; "
                    "float32 on a CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20; CPU 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--data", default=None, help="dataset folder whose preprocess config sets "
                    "the input shapes (default: ETL defaults)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    cpu = jax.devices()[0].platform == "cpu"
    base = configlib.cli_load("benchmarks.pretrain", PretrainConfig, args.config, args.set)
    if base is None:
        return configlib.EXIT_CONFIG
    pre = PreprocessConfig()
    if args.data:
        from train.data import preprocess_config

        pre = preprocess_config(args.data)
    results = []
    for preset in args.preset or ["seed", "vitb"]:
        model = dataclasses.replace(base.model, **PRESETS[preset])
        if args.dtype or cpu:
            model = dataclasses.replace(model, dtype=args.dtype or "float32")
        bs = args.batch_size or (2 * jax.device_count() if cpu else base.training.batch_size)
        cfg = dataclasses.replace(
            base, model=model, training=dataclasses.replace(base.training, batch_size=bs))
        ModelConfig(**dataclasses.asdict(model))  # fail early on a bad preset
        r = {"preset": preset, **bench(cfg, pre, args.steps or (3 if cpu else 20), args.warmup)}
        results.append(r)
        print(f"{preset:5s} {r['device']} {r['dtype']}: {r['params_M']:.1f} M params, batch "
              f"{r['batch']}, {r['gflop_per_sample_step']:.2f} GFLOP/sample/step "
              f"(XLA counts {r['xla_gflop_per_step'] or float('nan'):.1f} GFLOP/step) · "
              f"{r['step_s_median'] * 1e3:.1f} ms/step · "
              f"{r['samples_per_s_per_device']:.2f} samples/s/device · "
              f"{r['achieved_tflops_per_device']:.3f} TFLOP/s/device · MFU {r['mfu']:.1%} "
              f"of {r['peak_tflops_per_device']:.3g} TFLOP/s ({r['peak_source']}) · "
              f"compile {r['compile_s']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
