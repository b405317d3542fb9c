"""Masked multimodal pretraining, top to bottom in one file.

    python -m train.pretrain --config configs/pretrain_tiny.toml            # ~1 min on a CPU
    python -m train.pretrain --config configs/pretrain_cmht.toml --set training.steps=1000
    sbatch slurm/pretrain.sh                                                # 4×A100, Amarel

Reads ETL shards with Grain (train.data), trains train.mae.MultimodalMAE with AdamW (warmup +
cosine, global-norm clipping) on a ("data", "fsdp") device mesh (train.sharding), and writes
under ``runs/{run_name}/``: ``metrics.jsonl`` and TensorBoard events (loss per modality,
PSNR/SSIM of rgb/ir reconstructions, samples/s per device, MFU), ``config.json`` and Orbax
checkpoints in ``ckpt/`` (train.checkpoint). A rerun with the same run_name resumes from the
latest checkpoint exactly: the step-t masking key is fold_in(PRNGKey(seed), t) and the data
iterator state is restored, so its losses are those of a run never stopped.

Exit codes: 0 done · 2 non-finite loss or parameters (nothing written after it) · 3 preempted by
SIGTERM/SIGUSR1 after saving a checkpoint (slurm/pretrain.sh requeues the job).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from etl import configlib
from etl.config import PreprocessConfig
from train import checkpoint as ckptlib
from train import data as datalib
from train import metrics as metricslib
from train import sharding as shardlib
from train.config import PretrainConfig, check_against_data
from train.preempt import Preemption

EXIT_OK, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 2, 3


class NonFiniteLoss(RuntimeError):
    pass


# --------------------------------------------------------------------------- the model
def default_model():
    """(MultimodalMAE, model_flops_per_sample) from train.mae."""
    from train.mae import MultimodalMAE, model_flops_per_sample

    return MultimodalMAE, model_flops_per_sample


# --------------------------------------------------------------------------- optimizer
def learning_rate_schedule(tc) -> optax.Schedule:
    warmup = max(0, min(tc.warmup_steps, tc.steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(tc.steps, warmup + 1),
        end_value=tc.learning_rate * tc.min_lr_ratio,
    )


def make_optimizer(tc) -> optax.GradientTransformation:
    """AdamW (no decay on biases, norms and other vectors) behind global-norm clipping."""
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    adamw = optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2,
                        weight_decay=tc.weight_decay, mask=decay_mask)
    if tc.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw)
    return adamw


# --------------------------------------------------------------------------- train state
def _creator(cfg: PretrainConfig, pre: PreprocessConfig, model_cls, tx):
    def create():
        model = model_cls(cfg.model, pre, rngs=nnx.Rngs(cfg.training.seed))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return {"params": params, "rest": rest, "opt": tx.init(params)}

    return create


def abstract_state(cfg: PretrainConfig, pre: PreprocessConfig, model_cls, tx, mesh=None):
    """(graphdef, state as ShapeDtypeStructs — with their shardings on a mesh —, shardings):
    the train state's shapes, nothing allocated (to lower and compile a step ahead of time)."""
    abstract_model = nnx.eval_shape(
        lambda: model_cls(cfg.model, pre, rngs=nnx.Rngs(cfg.training.seed)))
    graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]
    shapes = jax.eval_shape(_creator(cfg, pre, model_cls, tx))
    shardings = None
    if mesh is not None:
        shardings = shardlib.state_shardings(mesh, shapes)
        shapes = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              shapes, shardings)
    return graphdef, shapes, shardings


def init_state(cfg: PretrainConfig, pre: PreprocessConfig, model_cls, tx, mesh=None):
    """(graphdef, state, shardings): state = {"params", "rest", "opt"}, a plain pytree, created
    by one jitted function straight into its shardings (FSDP never holds a full copy)."""
    graphdef, _, shardings = abstract_state(cfg, pre, model_cls, tx, mesh)
    return graphdef, jax.jit(_creator(cfg, pre, model_cls, tx), out_shardings=shardings)(), \
        shardings


PARAMS_FINITE = "params_finite"  # a train-step metric for the NaN guard, never logged
STOP = "stop"  # a train-step metric: some process had a preemption signal (never logged)


def params_finite(params) -> jax.Array:
    """1.0 when every parameter is finite, else 0.0 (a scalar, computed on the devices)."""
    leaves = jax.tree.leaves(params)
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])).astype(jnp.float32)


def make_train_step(graphdef, tx, cfg: PretrainConfig):
    base_key = jax.random.PRNGKey(cfg.training.seed)
    mask_ratio = cfg.training.mask_ratio
    # only passed when set, so that a model without the knob (a stand-in) still trains
    loss_kw = ({"visible_weight": cfg.training.visible_loss_weight}
               if cfg.training.visible_loss_weight else {})

    def train_step(state, batch, step, stop):
        """``stop``: one flag per device, 1 where that process has been signalled; its max
        comes back as the metric STOP, the same on every process (see train())."""
        key = jax.random.fold_in(base_key, step)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state["rest"])
            loss, aux = model(batch, key, mask_ratio, **loss_kw)
            losses = {k: v for k, v in aux.items() if k.startswith("loss/")}
            return loss, (losses, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (losses, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, **losses, "grad_norm": optax.tree.norm(grads),
                   PARAMS_FINITE: params_finite(params), STOP: jnp.max(stop)}
        return {"params": params, "rest": rest, "opt": opt}, metrics

    return train_step


def make_eval_step(graphdef, cfg: PretrainConfig):
    """Forward pass only: (loss, aux) for the image metrics and the pictures."""
    base_key = jax.random.PRNGKey(cfg.training.seed)

    def eval_step(state, batch, step):
        model = nnx.merge(graphdef, state["params"], state["rest"])
        return model(batch, jax.random.fold_in(base_key, step), cfg.training.mask_ratio)

    return eval_step


def log(msg: str):
    if jax.process_index() == 0:
        print(f"[pretrain] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the run
def train(cfg: PretrainConfig, model_cls=None, flops_fn=None,
          hooks: Sequence[Callable[[int, dict], None]] = (),
          clock: Callable[[], float] = time.perf_counter) -> int:
    """Run (or resume) the configured pretraining; returns the process exit code."""
    if model_cls is None or flops_fn is None:
        default_cls, default_flops = default_model()
        model_cls, flops_fn = model_cls or default_cls, flops_fn or default_flops
    tc = cfg.training
    preempt = Preemption()
    shardlib.maybe_initialize_distributed(cfg.mesh)
    mesh = shardlib.make_mesh(cfg.mesh)
    local_bs = shardlib.local_batch_size(tc.batch_size, mesh)
    pre = datalib.preprocess_config(cfg.data.path)
    check_against_data(cfg.model, pre, cfg.data.path)  # ConfigError: exit 2 (main)
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"run {run_dir} · mesh {dict(mesh.shape)} on {mesh.devices.size}× "
        f"{jax.devices()[0].device_kind} · {jax.process_count()} process(es) · "
        f"model {configlib.config_hash(cfg.model)}")

    # Model, optimizer, state on the mesh; resume from the latest checkpoint when there is one.
    tx = make_optimizer(tc)
    graphdef, state, state_sh = init_state(cfg, pre, model_cls, tx, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    ckpt = ckptlib.Checkpointer(run_dir / "ckpt", keep=tc.keep, async_save=tc.async_checkpoint)
    start, data_state = 0, None
    if ckpt.latest_step() is not None:
        try:  # the newest intact step (a damaged newer one is skipped with a warning)
            state, data_state, _ = ckpt.restore(state, model_cfg=cfg.model)
        except BaseException:
            ckpt.close()
            raise
        start = ckpt.latest_step()
        log(f"resumed from step {start} ({ckpt.directory})")
        if jax.process_index() == 0:
            metricslib.truncate_jsonl(run_dir / "metrics.jsonl", start)
    config_rec = ckptlib.config_record(cfg, pre)
    if jax.process_index() == 0:
        (run_dir / "config.json").write_text(json.dumps(config_rec, indent=2))
    if start >= tc.steps:
        log(f"already at step {start} ≥ training.steps={tc.steps}: nothing to do")
        ckpt.close()
        return EXIT_OK

    # Data: this process's slice, on the devices with the batch's sharding.
    batch_sh = shardlib.batch_sharding(mesh)
    grain_it = iter(datalib.make_dataset(
        cfg.data, local_bs, pre=pre,
        process_index=jax.process_index(), process_count=jax.process_count()))
    if data_state is not None:
        grain_it.set_state(data_state)
    batches = datalib.DeviceIterator(
        grain_it, lambda b: shardlib.to_global(b, batch_sh), depth=cfg.data.device_prefetch)

    train_step = jax.jit(make_train_step(graphdef, tx, cfg), donate_argnums=(0,),
                         in_shardings=(state_sh, batch_sh, None, batch_sh),
                         out_shardings=(state_sh, None))
    n_local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

    def stop_flags() -> jax.Array:
        """This process's preemption flag on each of its devices (the step's STOP input)."""
        local = np.full((n_local,), preempt.signal is not None, np.float32)
        return jax.make_array_from_process_local_data(batch_sh, local)
    eval_step = jax.jit(make_eval_step(graphdef, cfg))
    schedule = learning_rate_schedule(tc)
    flops = flops_fn(cfg.model, pre, tc.mask_ratio, training=True)
    peak, peak_src = metricslib.peak_flops_per_device(dtype=cfg.model.dtype)
    n_dev = mesh.devices.size
    log(f"{n_params / 1e6:.2f} M parameters · {flops / 1e9:.3f} GFLOP per sample per step · "
        f"peak {peak / 1e12:.3g} TFLOP/s per device ({peak_src})")

    logger = metricslib.Logger(run_dir, tc.steps, start, tc.progress)
    history: dict[str, list[float]] = {}
    # The speed window (samples/s, MFU, step time): it opens at the top of an iteration with no
    # step in flight and closes when the logged step has finished (its metrics fetched), so it
    # holds the whole device time of exactly the steps it counts. The first step of a start
    # (compile + run) is timed on its own; image metrics are taken out; checkpoint saves stay
    # in (a conservative figure).
    window: dict[str, Any] = {"t": None, "steps": 0}

    def finish_step(done: int, metrics) -> bool:
        """Host side of a finished step: NaN guard, hooks, accumulation, logging (fetching the
        metrics waits for the step). Returns whether some process had been signalled when the
        step was dispatched."""
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        params_ok = host.pop(PARAMS_FINITE) == 1.0
        stop = host.pop(STOP) > 0
        last = ckpt.latest_step()
        unsaved = ("No checkpoint was written." if last is None
                   else f"No checkpoint was written after step {last}.")
        if not (math.isfinite(host["loss"]) and math.isfinite(host["grad_norm"])):
            raise NonFiniteLoss(
                f"non-finite loss {host['loss']} (gradient norm {host['grad_norm']}) at step "
                f"{done} ("
                + ", ".join(f"{k}={v:.4g}" for k, v in host.items()) + f"); stopping. {unsaved}")
        if not params_ok:  # the loss was finite, the update was not: never save this state
            raise NonFiniteLoss(
                f"non-finite parameters after the update of step {done} (loss "
                f"{host['loss']:.4g}, gradient norm {host['grad_norm']:.4g}, learning rate "
                f"{float(schedule(done - 1)):.4g}); stopping. {unsaved}")
        for h in hooks:
            h(done, host)
        for k, v in host.items():
            history.setdefault(k, []).append(v)
        if window["t"] is not None:
            window["steps"] += 1
        logger.advance()
        if done % tc.log_every == 0 or done == tc.steps:
            import metrax

            out = {k: float(metrax.Average.from_model_output(jnp.asarray(v)).compute())
                   for k, v in history.items()}
            history.clear()
            out["lr"] = float(schedule(done - 1))
            if window["steps"]:  # (none after a start's first step alone)
                dt = clock() - window["t"]
                sps = window["steps"] * tc.batch_size / dt
                out.update(samples_per_s=sps, samples_per_s_per_device=sps / n_dev,
                           mfu=flops * sps / (peak * n_dev), step_time_s=dt / window["steps"])
                window.update(t=None, steps=0)
            logger.write(done, out)
        return stop

    code = EXIT_OK
    pending = None  # (step, metrics) of the step dispatched last, checked one step late
    step = start
    # A preemption signal reaches each process at its own moment; a process that stopped alone
    # would wait in the checkpoint's collective save while the others wait in the next step's.
    # So the stop is decided from a finished step's STOP metric (any process signalled when it
    # was dispatched), which every process reads the same: all save the same step and exit.
    stop = False
    t_first = clock()
    try:
        while step < tc.steps:
            if window["t"] is None and step > start:
                window.update(t=clock(), steps=0)  # the step before has finished (see below)
            batch = next(batches)
            data_state = batches.state
            want_images = tc.image_metrics_every and (step + 1) % tc.image_metrics_every == 0
            if want_images:  # forward pass on the batch before this step's update
                jax.block_until_ready(state)  # the step before, inside the window; then
                t_img = clock()  # the image metrics alone, taken out of it
                _, aux = eval_step(state, batch, step)
                img = metricslib.image_metrics(jax.device_get(aux), jax.device_get(batch),
                                               cfg.model.patch_size, cfg.model.norm_pix_loss)
                logger.write(step + 1, img)
                if window["t"] is not None:
                    window["t"] += clock() - t_img
            state, metrics = train_step(state, batch, jnp.int32(step), stop_flags())
            step += 1
            if pending is not None:
                stop |= finish_step(*pending)
            pending = (step, metrics)
            log_now = step % tc.log_every == 0 or step == tc.steps
            save_now = step % tc.ckpt_every == 0 or step == tc.steps or stop
            if step == start + 1 or log_now or save_now:
                # waited for now, not one step late: the first step is timed alone, a logged
                # one closes the speed window, a saved one must have finite parameters
                stop |= finish_step(*pending)
                pending = None
                if step == start + 1:
                    log(f"first step (compile + run) {clock() - t_first:.1f} s")
            if save_now or stop:  # (a stop read from this very step saves it too)
                ckpt.save(step, state, datalib.state_to_json(data_state), config_rec)
            if stop:
                what = f"signal {preempt.signal}" if preempt.signal else "another process's signal"
                log(f"{what}: saved step {step}, exiting for requeue")
                code = EXIT_PREEMPTED
                break
        if pending is not None:
            finish_step(*pending)
    except NonFiniteLoss as e:
        log(str(e))
        code = EXIT_NONFINITE
    finally:
        preempt.restore()
        ckpt.close()  # waits for the last asynchronous save
        batches.close()
        logger.close()
    if code == EXIT_OK:
        log(f"done: step {step}, checkpoints {ckpt.all_steps()} in {ckpt.directory}")
    if jax.process_count() > 1:
        # Leave together: srun (--kill-on-bad-exit) kills the other tasks as soon as one exits
        # with 3, and none may be killed before every checkpoint write has finished.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"train.pretrain exit {code}")
    return code


# --------------------------------------------------------------------------- loading a run
def resolve_ckpt(path: str | Path) -> tuple[Path, int | None]:
    """runs/NAME, runs/NAME/ckpt or runs/NAME/ckpt/STEP → (ckpt dir, step or None=latest)."""
    p = Path(path)
    if p.name.isdigit() and p.parent.is_dir():
        return p.parent, int(p.name)
    if (p / "ckpt").is_dir():
        return p / "ckpt", None
    return p, None


def load_trained(path: str | Path, model_cls=None, step: int | None = None,
                 overrides: Sequence[str] = ()):
    """(model, cfg, pre, step) of a checkpoint, the model's parameters restored (on the first
    device). ``overrides`` change the non-model keys of its config (e.g. data.path)."""
    model_cls = model_cls or default_model()[0]
    ckpt_dir, s = resolve_ckpt(path)
    ckpt = ckptlib.Checkpointer(ckpt_dir, async_save=False)
    step = step if step is not None else (s if s is not None else ckpt.latest_step())
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {path}")
    rec = ckpt.saved_config(step)
    data = {k: v for k, v in rec.items()
            if k in ("model", "training", "data", "mesh", "run_name", "runs_dir")}
    cfg = configlib.from_dict(PretrainConfig, configlib.apply_overrides(data, list(overrides)))
    pre = configlib.from_dict(PreprocessConfig, rec["preprocess"], prefix="preprocess")
    tx = make_optimizer(cfg.training)
    # restore into the state's shapes: nothing is initialised (or compiled) only to be overwritten
    graphdef, shapes, _ = abstract_state(cfg, pre, model_cls, tx)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          shapes)
    try:
        state, _, _ = ckpt.restore(target, model_cfg=cfg.model, step=step)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, state["params"], state["rest"]), cfg, pre, step


# --------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m train.pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="TOML file (configs/pretrain_*.toml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one key, e.g. --set training.steps=100 (repeatable)")
    return ap.parse_args(argv)


def main(argv=None, *, model_cls=None, flops_fn=None, hooks=(), clock=time.perf_counter) -> int:
    args = parse_args(argv)
    cfg = configlib.cli_load("train.pretrain", PretrainConfig, args.config, args.set)
    if cfg is None:
        return configlib.EXIT_CONFIG
    try:
        return train(cfg, model_cls=model_cls, flops_fn=flops_fn, hooks=hooks, clock=clock)
    except configlib.ConfigError as e:  # the config against the data (model.patch_size, …)
        return configlib.cli_error("train.pretrain", e)
    except (ckptlib.ArchitectureMismatch, ckptlib.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
