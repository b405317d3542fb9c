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

``--analyze`` times nothing: it compiles the same train step for this machine's backend (a CPU
here) and reads, per sample, XLA's FLOPs (against the analytic count MFU uses), the bytes it
moves, the arithmetic intensity against the H100's ridge point (989 TFLOP/s / 3.35 TB/s ≈ 295
FLOP/byte), the kernels (fusions) per step, the activation memory and the largest buffers —
the roofline estimate a GPU run then confirms (issue 15). ``--lever`` picks the speed levers
(LEVERS below; several → side by side in one run):

    python -m benchmarks.pretrain --analyze                   # seed + ViT-B widths, ~3 min here
    python -m benchmarks.pretrain --analyze --preset seed --lever baseline --lever scores_bf16 \
        --lever stacked --lever remat --lever xla_all
    python -m benchmarks.pretrain --preset seed --batch-size 256 --lever baseline --lever all
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import roofline
from etl import configlib
from etl.config import PreprocessConfig
from etl.schema import MODALITIES, sample_spec
from train import metrics as metricslib
from train import pretrain
from train import sharding as shardlib
from train.config import ModelConfig, PretrainConfig
from train.encoders import attention_backend, compute_dtype
from train.fusion import padded_length
from train.mae import modality_layout, num_visible

PRESETS = {
    # configs/pretrain_cmht.toml's model
    "seed": {},
    # ViT-B widths: 768 wide, 12 heads, 12 blocks on every token's path (4 per-modality + 8 fused)
    "vitb": dict(embed_dim=768, num_heads=12, depth=4, fusion_depth=8, decoder_dim=512,
                 decoder_depth=4, decoder_heads=16),
}


# Speed levers of issue 15 as ModelConfig changes ("baseline" is the model before them: XLA
# attention with float32 scores, one encoder call per modality, no rematerialisation).
LEVERS = {
    "baseline": dict(attention_impl="xla"),
    "cudnn": dict(attention_impl="cudnn"),  # flash attention: NVIDIA GPUs only
    "scores_bf16": dict(attention_impl="xla", score_dtype="compute"),
    "stacked": dict(attention_impl="xla", stack_encoders=True),
    "remat": dict(attention_impl="xla", remat=True),
    "xla_all": dict(attention_impl="xla", score_dtype="compute", stack_encoders=True),
    # the defaults to adopt: cuDNN where it runs ("auto"), bf16 scores where XLA attends
    "all": dict(attention_impl="auto", score_dtype="compute", stack_encoders=True),
}


def random_batch(pre: PreprocessConfig, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    spec = sample_spec(pre)
    out = {m: rng.normal(size=(batch, *spec[m].shape)).astype(np.float32) for m in MODALITIES}
    out["present"] = np.ones((batch, len(MODALITIES)), np.uint8)
    out["offset"] = np.zeros((batch, len(MODALITIES)), np.float32)
    return out


def lower(cfg, pre) -> dict:
    """The train step of ``cfg`` lowered for this machine's devices (nothing allocated)."""
    model_cls, _ = pretrain.default_model()
    mesh = shardlib.make_mesh(cfg.mesh)
    tx = pretrain.make_optimizer(cfg.training)
    t0 = time.perf_counter()
    graphdef, shapes, state_sh = pretrain.abstract_state(cfg, pre, model_cls, tx, mesh)
    batch_sh = shardlib.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((cfg.training.batch_size, *v.shape[1:]), v.dtype,
                                     sharding=batch_sh) for k, v in random_batch(pre, 1).items()}
    step_fn = jax.jit(pretrain.make_train_step(graphdef, tx, cfg), donate_argnums=(0,),
                      in_shardings=(state_sh, batch_sh, None, batch_sh),
                      out_shardings=(state_sh, None))
    n_dev = mesh.devices.size  # the step's preemption flags: one per device, none raised
    stop = jax.ShapeDtypeStruct((n_dev,), jnp.float32, sharding=batch_sh)
    lowered = step_fn.lower(shapes, batch, jax.ShapeDtypeStruct((), jnp.int32), stop)
    return {"cfg": cfg, "mesh": mesh, "tx": tx, "batch_sh": batch_sh, "lowered": lowered,
            "lower_s": time.perf_counter() - t0}


def compile_lowered(prep: dict) -> dict:
    t0 = time.perf_counter()
    prep["compiled"] = prep["lowered"].compile()
    prep["compile_s"] = prep["lower_s"] + time.perf_counter() - t0
    return prep


def bench(cfg, pre, steps: int, warmup: int, prep: dict | None = None) -> dict:
    """Time the train step of ``cfg`` (``prep``: from :func:`lower` + :func:`compile_lowered`,
    else done here)."""
    prep = prep or compile_lowered(lower(cfg, pre))
    model_cls, flops_fn = pretrain.default_model()
    mesh, tx, compiled = prep["mesh"], prep["tx"], prep["compiled"]
    t_compile = prep["compile_s"]
    _, state, _ = pretrain.init_state(cfg, pre, model_cls, tx, mesh)
    batch = shardlib.to_global(random_batch(pre, cfg.training.batch_size), prep["batch_sh"])
    stop = jax.device_put(jnp.zeros(mesh.devices.size, jnp.float32), prep["batch_sh"])
    xla_flops = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla_flops = float(cost.get("flops", float("nan")))
    except Exception:  # cost analysis is best effort
        pass
    mem = compiled.memory_analysis()  # XLA's plan for this device: activations (temp) and state
    loss_first = None
    for i in range(warmup):
        state, m = compiled(state, batch, jnp.int32(i), stop)
        if loss_first is None:
            loss_first = float(m["loss"])  # before any update: the same for every lever
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
        "temp_gb": None if mem is None else mem.temp_size_in_bytes / 1e9,
        "loss_first": loss_first,
        "loss": float(m["loss"]),
    }


# --------------------------------------------------------------------------- --analyze
def abstract_batch(pre: PreprocessConfig, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    spec = sample_spec(pre)
    out = {m: jax.ShapeDtypeStruct((batch, *spec[m].shape), np.float32) for m in MODALITIES}
    out["present"] = jax.ShapeDtypeStruct((batch, len(MODALITIES)), np.uint8)
    return out


def score_shapes(model: ModelConfig, pre: PreprocessConfig, mask_ratio: float
                 ) -> set[tuple[int, int, int]]:
    """(heads, T, T) of every attention score tensor of the model's train step: each image
    encoder on its visible patches, the fusion on all visible tokens, the decoder on every
    patch (both padded to a multiple of 8). A length equal to the head width is left out (a
    query tensor (…, heads, T, head width) would look the same)."""
    lay = modality_layout(model, pre)
    vis = {m: num_visible(lay[m].n_patches, mask_ratio) for m in lay}
    e_heads, d_heads = model.num_heads, model.decoder_heads
    out = {(e_heads, vis[m], vis[m]) for m in lay if lay[m].grid is not None}
    out.add((e_heads, padded_length(sum(vis.values())), padded_length(sum(vis.values()))))
    n_all = padded_length(sum(x.n_patches for x in lay.values()))
    out.add((d_heads, n_all, n_all))
    head_w = {e_heads: model.embed_dim // e_heads, d_heads: model.decoder_dim // d_heads}
    return {s for s in out if s[1] != head_w.get(s[0])}


def analyze(cfg: PretrainConfig, pre: PreprocessConfig, compiler_options=None) -> dict:
    """Compile (never run) the train step for this backend; its roofline figures per sample.
    (``compiler_options`` of XLA's backend do not change the HLO this reads: tests pass
    ``xla_backend_optimization_level=0`` to compile faster.)"""
    model_cls, flops_fn = pretrain.default_model()
    tx = pretrain.make_optimizer(cfg.training)
    bs = cfg.training.batch_size
    t0 = time.perf_counter()
    model = nnx.eval_shape(lambda: model_cls(cfg.model, pre, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = {"params": params, "rest": rest, "opt": jax.eval_shape(tx.init, params)}
    step = jax.jit(pretrain.make_train_step(graphdef, tx, cfg), donate_argnums=(0,))
    compiled = step.lower(state, abstract_batch(pre, bs), jax.ShapeDtypeStruct((), jnp.int32),
                          jax.ShapeDtypeStruct((1,), jnp.float32)  # one device's stop flag
                          ).compile(compiler_options)
    t_compile = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    st = roofline.hlo_stats(compiled.as_text(),
                            score_shapes(cfg.model, pre, cfg.training.mask_ratio))
    flops = float(cost["flops"])
    nbytes = float(cost["bytes accessed"])
    analytic = flops_fn(cfg.model, pre, cfg.training.mask_ratio, training=True)
    rl = roofline.roofline(flops / bs, nbytes / bs)
    out = {
        "backend": f"XLA:{jax.default_backend().upper()} ({jax.devices()[0].device_kind})",
        "dtype": cfg.model.dtype, "batch": bs, "compile_s": t_compile,
        "params_M": sum(x.size for x in jax.tree.leaves(params)) / 1e6,
        "xla_gflop_per_sample": flops / bs / 1e9,
        "analytic_gflop_per_sample": analytic / 1e9,
        "mb_per_sample": nbytes / bs / 1e6,
        "intensity": rl["intensity"], "ridge": rl["ridge"], "bound": rl["bound"],
        "score_mb_per_sample": st.score_bytes / bs / 1e6,
        "movement_mb_per_sample": st.movement_bytes / bs / 1e6,
        "mb_per_sample_by_phase": {k: v / bs / 1e6 for k, v in st.bytes_by_phase.items()},
        "kernels": st.kernels, "fusions": st.fusions, "matmul_kernels": st.matmul_kernels,
        "movement_kernels": st.movement_kernels, "kernels_by_phase": st.kernels_by_phase,
        "hlo_mb_check": st.bytes_total / 1e6,  # Σ over kernels, against XLA's bytes accessed
        "temp_mb_per_sample": mem.temp_size_in_bytes / bs / 1e6 if mem else None,
        "argument_mb": mem.argument_size_in_bytes / 1e6 if mem else None,
        "written_gb_by_dtype": {k: v / 1e9 for k, v in st.written_by_dtype.items()},
        "largest": [{"buffer": b, "count": n, "gb": by / 1e9,
                     "op": roofline.short_op_name(op)} for b, n, by, op in st.largest],
    }
    out.update(h100_bound(out))
    return out


def h100_bound(r: dict) -> dict:
    """The H100 roofline of the per-sample (FLOPs, bytes): samples/s at best, and the MFU that
    allows (analytic FLOPs over the peak, as train.pretrain computes MFU); "_gpu_like": the
    same without the convert/copy-only kernels' traffic (a GPU runs bf16 matmuls natively and
    fuses such conversions into its kernels; the truth lies between the two)."""
    out = {}
    for suffix, drop in (("", 0.0), ("_gpu_like", r["movement_mb_per_sample"])):
        rl = roofline.roofline(r["xla_gflop_per_sample"] * 1e9,
                               (r["mb_per_sample"] - drop) * 1e6)
        sps = 1.0 / rl["time_s"]
        out[f"h100_samples_per_s{suffix}"] = sps
        out[f"h100_mfu_bound{suffix}"] = (r["analytic_gflop_per_sample"] * 1e9 * sps
                                          / roofline.H100_PEAK_FLOPS)
    return out


def print_analysis(name: str, r: dict) -> None:
    ph = r["mb_per_sample_by_phase"]
    kp = r["kernels_by_phase"]
    print(f"\n{name} · {r['dtype']} · batch {r['batch']} · {r['params_M']:.1f} M params · "
          f"compiled for {r['backend']} in {r['compile_s']:.0f} s")
    print(f"  FLOPs/sample    XLA {r['xla_gflop_per_sample']:.2f} G · analytic (MFU's count) "
          f"{r['analytic_gflop_per_sample']:.2f} G · XLA/analytic "
          f"{r['xla_gflop_per_sample'] / r['analytic_gflop_per_sample']:.3f}")
    print(f"  bytes/sample    {r['mb_per_sample']:.0f} MB: "
          + ", ".join(f"{k} {ph.get(k, 0):.0f}" for k in roofline.PHASES)
          + f" · T×T attention scores {r['score_mb_per_sample']:.0f} MB "
          f"({r['score_mb_per_sample'] / r['mb_per_sample']:.0%}) · convert/copy-only kernels "
          f"{r['movement_mb_per_sample']:.0f} MB")
    print(f"  intensity       {r['intensity']:.1f} FLOP/byte vs the H100 ridge {r['ridge']:.0f} → "
          f"{r['bound']}-bound; H100 roofline ≤ {r['h100_samples_per_s']:,.0f} samples/s, "
          f"MFU ≤ {r['h100_mfu_bound']:.1%} (without convert/copy-only kernels "
          f"≤ {r['h100_samples_per_s_gpu_like']:,.0f}, MFU ≤ {r['h100_mfu_bound_gpu_like']:.1%})")
    print(f"  kernels/step    {r['kernels']:,} ({r['fusions']:,} fusions, {r['matmul_kernels']} "
          f"with a matmul, {r['movement_kernels']:,} convert/copy only; "
          + ", ".join(f"{k} {kp.get(k, 0):,}" for k in roofline.PHASES) + ")")
    if r["temp_mb_per_sample"] is not None:
        print(f"  memory          activations (XLA temp) {r['temp_mb_per_sample']:.1f} MB/sample, "
              f"state {r['argument_mb']:.0f} MB")
    w = r["written_gb_by_dtype"]
    print("  written/step    " + ", ".join(f"{k} {v:.2f} GB" for k, v in
                                           sorted(w.items(), key=lambda x: -x[1]) if v > 0.01))
    print("  largest buffers " + "\n                  ".join(
        f"{b['buffer']} ×{b['count']} ({b['gb']:.2f} GB) {b['op']}" for b in r["largest"]))


def summary_table(rows: list[dict]) -> str:
    """A Markdown table of the analysed (preset, lever) rows, as the README tracks them."""
    cols = ["preset", "lever", "XLA GFLOP/sample", "analytic", "MB/sample", "FLOP/byte",
            "T×T scores MB", "convert/copy MB", "kernels", "matmul kernels",
            "activations MB/sample", "H100 roofline samples/s", "MFU bound"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        est = bool(r.get("estimate"))
        temp = r.get("temp_mb_per_sample")
        cells = [r["preset"], r["lever"] + (" (est.)" if est else ""),
                 f"{r['xla_gflop_per_sample']:.2f}", f"{r['analytic_gflop_per_sample']:.2f}",
                 f"{r['mb_per_sample']:.0f}", f"{r['intensity']:.1f}",
                 f"{r['score_mb_per_sample']:.0f}", f"{r['movement_mb_per_sample']:.0f}",
                 "—" if est else f"{r['kernels']:,}", "—" if est else str(r["matmul_kernels"]),
                 "—" if est or temp is None else f"{temp:.1f}",
                 f"{r['h100_samples_per_s']:,.0f} – {r['h100_samples_per_s_gpu_like']:,.0f}",
                 f"{r['h100_mfu_bound']:.1%} – {r['h100_mfu_bound_gpu_like']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lever_config(base: PretrainConfig, preset: str, lever: str, batch: int, dtype: str | None
                 ) -> PretrainConfig:
    model = dataclasses.replace(base.model, **PRESETS[preset], **LEVERS[lever])
    if dtype:
        model = dataclasses.replace(model, dtype=dtype)
    ModelConfig(**dataclasses.asdict(model))  # fail early on a bad preset or lever
    return dataclasses.replace(
        base, model=model, training=dataclasses.replace(base.training, batch_size=batch))


H100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")


def cudnn_on_gpu(model: ModelConfig) -> bool:
    """Whether this model's attention would run as cuDNN flash attention on an H100."""
    dt = compute_dtype(model)
    return all(attention_backend(model.attention_impl, dt, w // h, device=H100) == "cudnn"
               for w, h in ((model.embed_dim, model.num_heads),
                            (model.decoder_dim, model.decoder_heads)))


def run_analyze(args, base: PretrainConfig, pre: PreprocessConfig, compiler_options=None
                ) -> list[dict]:
    dev = jax.devices()[0]
    nvidia = dev.platform == "gpu" and "nvidia" in dev.device_kind.lower()
    print(f"--analyze: the train step compiled (not run) for XLA:{jax.default_backend().upper()}"
          f" ({dev.device_kind}). FLOPs are the program's; bytes, kernels and buffers follow "
          "this backend's fusion and estimate a GPU's (a CPU adds bf16↔f32 converts around its "
          "f32 matmuls: the 'convert/copy-only' figure). H100 roofline: 989 TFLOP/s dense bf16, "
          f"3.35 TB/s, ridge {roofline.H100_RIDGE:.0f} FLOP/byte.", flush=True)
    rows, done = [], {}  # done: analyses by config (a cuDNN estimate reuses its XLA program's)
    for preset, bs, lever in itertools.product(args.preset or ["seed", "vitb"],
                                               args.batch_size or [64],
                                               args.lever or ["baseline"]):
        cfg = lever_config(base, preset, lever, bs, args.dtype)
        estimate = cudnn_on_gpu(cfg.model) and not nvidia
        if estimate:  # cuDNN cannot be compiled here: the XLA program without its scores
            cfg = dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, attention_impl="xla"))
        if cfg not in done:
            done[cfg] = analyze(cfg, pre, compiler_options)
        r = {"preset": preset, "lever": lever, **done[cfg]}
        if estimate:
            r.update(estimate="cuDNN flash attention keeps the T×T scores on chip: the XLA "
                     "program's bytes less its score traffic",
                     mb_per_sample=r["mb_per_sample"] - r["score_mb_per_sample"],
                     score_mb_per_sample=0.0)
            r["intensity"] = r["xla_gflop_per_sample"] * 1e3 / r["mb_per_sample"]
            r.update(h100_bound(r))
        rows.append(r)
        print_analysis(f"{preset} · {lever}" + (" (ESTIMATE, see below)" if estimate else ""),
                       r)
        if estimate:
            print(f"  estimate        {r['estimate']}: {r['mb_per_sample']:.0f} MB/sample")
    print("\n" + summary_table(rows), flush=True)
    return rows


def run_timing(args, base: PretrainConfig, pre: PreprocessConfig) -> list[dict]:
    """Every (preset, batch, lever): lowered one after another, compiled by
    ``--compile-workers`` threads at once (XLA compiles outside the GIL), then timed one at a
    time. A configuration that fails (out of memory at a large batch) is reported and skipped."""
    cpu = jax.devices()[0].platform == "cpu"
    dtype = args.dtype or ("float32" if cpu else None)
    steps = args.steps or (3 if cpu else 20)
    jobs = []
    for preset in args.preset or ["seed", "vitb"]:
        for bs in args.batch_size or [2 * jax.device_count() if cpu
                                      else base.training.batch_size]:
            for lever in args.lever or [None]:
                cfg = lever_config(base, preset, lever or "baseline", bs, dtype)
                if lever is None:  # the config as it is
                    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                        cfg.model, attention_impl=base.model.attention_impl))
                jobs.append({"preset": preset, "lever": lever or "config", "cfg": cfg})
    t0 = time.perf_counter()
    for j in jobs:
        j["prep"] = _attempt(j, lambda j=j: lower(j["cfg"], pre))
    with concurrent.futures.ThreadPoolExecutor(max(1, args.compile_workers)) as pool:
        todo = [j for j in jobs if j["prep"] is not None]
        for j, prep in zip(todo, pool.map(lambda j: _attempt(j, lambda: compile_lowered(
                j["prep"])), todo), strict=True):
            j["prep"] = prep
    print(f"lowered and compiled {len(jobs)} configuration(s) in "
          f"{time.perf_counter() - t0:.0f} s ({args.compile_workers} compile thread(s))",
          flush=True)
    results, first = [], {}
    for j in jobs:
        if j["prep"] is None:
            continue
        r = _attempt(j, lambda j=j: bench(j["cfg"], pre, steps, args.warmup, j["prep"]))
        j["prep"] = None  # free the executable
        if r is None:
            continue
        r = {"preset": j["preset"], "lever": j["lever"], **r}
        results.append(r)
        ref = first.setdefault((j["preset"], r["batch"]), r)
        same = ("" if r is ref else
                f" · first-step loss {r['loss_first']:.5f} vs {ref['loss_first']:.5f} "
                f"({ref['lever']}): Δ {abs(r['loss_first'] - ref['loss_first']):.2e}, after "
                f"{args.warmup + steps} steps {r['loss']:.5f} vs {ref['loss']:.5f}")
        print(f"{r['preset']:5s} {r['lever']:11s} {r['device']} {r['dtype']}: "
              f"{r['params_M']:.1f} M params, batch {r['batch']}, "
              f"{r['gflop_per_sample_step']:.2f} GFLOP/sample/step (XLA counts "
              f"{r['xla_gflop_per_step'] or float('nan'):.1f} GFLOP/step) · "
              f"{r['step_s_median'] * 1e3:.1f} ms/step · "
              f"{r['samples_per_s_per_device']:.2f} samples/s/device · "
              f"{r['achieved_tflops_per_device']:.3f} TFLOP/s/device · MFU {r['mfu']:.1%} "
              f"of {r['peak_tflops_per_device']:.3g} TFLOP/s ({r['peak_source']}) · "
              f"temp {r['temp_gb'] or float('nan'):.1f} GB · compile {r['compile_s']:.0f} s{same}",
              flush=True)
    failed = [j for j in jobs if j.get("error")]
    for j in failed:
        results.append({"preset": j["preset"], "lever": j["lever"],
                        "batch": j["cfg"].training.batch_size, "error": j["error"]})
    return results


def _attempt(job: dict, fn):
    """fn(), or None after printing one line naming the configuration and the error."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 — one configuration's failure must not stop the rest
        first = (str(e).strip().splitlines() or [""])[0][:300]
        job["error"] = f"{type(e).__name__}: {first}"
        print(f"{job['preset']:5s} {job['lever']:11s} batch {job['cfg'].training.batch_size}: "
              f"FAILED {job['error']}", flush=True)
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/pretrain_cmht.toml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS),
                    help="model size(s) to time (default: seed and vitb)")
    ap.add_argument("--lever", action="append", choices=list(LEVERS),
                    help="speed lever(s) of issue 15, side by side (default: the config as it "
                         "is; with --analyze: baseline)")
    ap.add_argument("--analyze", action="store_true",
                    help="compile only: FLOPs, bytes, intensity, kernels, buffers per sample")
    ap.add_argument("--batch-size", type=int, action="append", default=None,
                    help="global batch, repeatable (default: the config's on an accelerator, "
                         "2 per device on a CPU; --analyze: 64, compiled only, never allocated)")
    ap.add_argument("--compile-workers", type=int, default=1,
                    help="configurations compiled at once (threads) before the timing")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the config's; "
                    "float32 when timing on a CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20; CPU 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--data", default=None, help="dataset folder whose preprocess config sets "
                    "the input shapes (default: ETL defaults)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    base = configlib.cli_load("benchmarks.pretrain", PretrainConfig, args.config, args.set)
    if base is None:
        return configlib.EXIT_CONFIG
    pre = PreprocessConfig()
    if args.data:
        from train.data import preprocess_config

        pre = preprocess_config(args.data)
    results = (run_analyze if args.analyze else run_timing)(args, base, pre)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
