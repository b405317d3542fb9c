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

Exit codes: 0 done · 2 non-finite loss (nothing written after it) · 3 preempted by
SIGTERM/SIGUSR1 after saving a checkpoint (slurm/pretrain.sh requeues the job).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from etl import configlib
from etl.config import PreprocessConfig
from train import checkpoint as ckptlib
from train import data as datalib
from train import sharding as shardlib
from train.config import PretrainConfig, load_pretrain_config

EXIT_OK, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 2, 3
IMAGE_METRIC_MODALITIES = ("rgb", "ir")


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
def init_state(cfg: PretrainConfig, pre: PreprocessConfig, model_cls, tx):
    """(graphdef, state) where state = {"params", "rest", "opt"} is a plain pytree."""
    model = model_cls(cfg.model, pre, rngs=nnx.Rngs(cfg.training.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, {"params": params, "rest": rest, "opt": tx.init(params)}


def shard_state(state, mesh):
    shardings = shardlib.state_shardings(mesh, state)
    return jax.device_put(state, shardings), shardings


def make_train_step(graphdef, tx, cfg: PretrainConfig):
    base_key = jax.random.PRNGKey(cfg.training.seed)
    mask_ratio = cfg.training.mask_ratio

    def train_step(state, batch, step):
        key = jax.random.fold_in(base_key, step)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state["rest"])
            loss, aux = model(batch, key, mask_ratio)
            losses = {k: v for k, v in aux.items() if k.startswith("loss/")}
            return loss, (losses, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (losses, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, **losses, "grad_norm": optax.global_norm(grads)}
        return {"params": params, "rest": rest, "opt": opt}, metrics

    return train_step


def make_eval_step(graphdef, cfg: PretrainConfig):
    """Forward pass only: (loss, aux) for the image metrics and the pictures."""
    base_key = jax.random.PRNGKey(cfg.training.seed)

    def eval_step(state, batch, step):
        model = nnx.merge(graphdef, state["params"], state["rest"])
        return model(batch, jax.random.fold_in(base_key, step), cfg.training.mask_ratio)

    return eval_step


# --------------------------------------------------------------------------- reconstructions
def _find(aux: dict, modality: str, words: Sequence[str]):
    for w in words:
        for k in (f"{w}/{modality}", f"{modality}/{w}", f"{w}_{modality}"):
            if k in aux:
                return aux[k]
        if isinstance(aux.get(w), dict) and modality in aux[w]:
            return aux[w][modality]
    return None


def reconstruction(aux: dict, batch: dict, modality: str, patch: int,
                   norm_pix: bool = False):
    """(prediction image, mask image) of ``modality`` as (B, H, W, C) / (B, H, W, 1) numpy
    arrays from the model's aux (``pred/<m>`` as (B, N, p·p·C) patches, row-major patches,
    pixels (row, col, ch) — train.encoders.patchify's layout); None if it has none.
    ``norm_pix``: predictions are per-patch normalized; the input patch's statistics undo it."""
    target = np.asarray(batch[modality], np.float32)
    pred = _find(aux, modality, ("pred", "prediction", "predictions", "recon"))
    if pred is None:
        return None
    pred = np.asarray(pred, np.float32)
    b, h, w, c = target.shape
    gh, gw = h // patch, w // patch
    if pred.shape != target.shape:
        if norm_pix:
            t = target.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
            t = t.reshape(b, gh * gw, -1)
            pred = pred * np.sqrt(t.var(-1, keepdims=True) + 1e-6) + t.mean(-1, keepdims=True)
        pred = pred.reshape(b, gh, gw, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
        pred = pred.reshape(b, h, w, c)
    mask = _find(aux, modality, ("mask", "masks"))
    if mask is not None:
        mask = np.asarray(mask)
        if mask.ndim == 2:  # (B, N) per patch → per pixel
            mask = mask.reshape(b, gh, gw).repeat(patch, 1).repeat(patch, 2)[..., None]
        mask = np.broadcast_to(mask.astype(bool), target.shape[:3] + (1,))
    return pred, mask


def to_unit_range(modality: str, x: np.ndarray) -> np.ndarray:
    """Undo the contract's normalization for display / PSNR (rgb: ImageNet mean/std)."""
    if modality == "rgb":
        from etl.schema import IMAGENET_MEAN, IMAGENET_STD

        x = x * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(x, 0.0, 1.0)


def image_metrics(aux: dict, batch: dict, patch: int, norm_pix: bool = False
                  ) -> dict[str, float]:
    """metrax PSNR and SSIM of rgb/ir reconstructions over the samples where present."""
    import metrax

    from etl.schema import MODALITY_INDEX

    out = {}
    present = np.asarray(batch["present"])
    for m in IMAGE_METRIC_MODALITIES:
        if m not in batch:
            continue
        rec = reconstruction(aux, batch, m, patch, norm_pix)
        keep = present[:, MODALITY_INDEX[m]] > 0
        if rec is None or not keep.any():
            continue
        pred = jnp.asarray(to_unit_range(m, rec[0][keep]))
        target = jnp.asarray(to_unit_range(m, np.asarray(batch[m])[keep]))
        out[f"psnr/{m}"] = float(metrax.PSNR.from_model_output(pred, target, 1.0).compute())
        if min(pred.shape[1:3]) >= 11:
            out[f"ssim/{m}"] = float(metrax.SSIM.from_model_output(pred, target, 1.0).compute())
    return out


# --------------------------------------------------------------------------- MFU
# Dense peak FLOP/s per device by device kind: (bfloat16, float32 matmuls as JAX runs them).
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "A40": (150e12, 75e12),
    "V100": (125e12, 15.7e12),
    "TPU v6": (918e12, 918e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v5": (197e12, 197e12),
    "TPU v4": (275e12, 275e12),
}
_cpu_peak: float | None = None


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a jitted float32 n×n matmul on the first device (best of ``repeats``)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops_per_device(device=None, dtype: str = "bfloat16") -> tuple[float, str]:
    """(peak FLOP/s, where it came from). CPUs: the measured matmul throughput, shared by
    the host's CPU devices."""
    global _cpu_peak
    device = device or jax.devices()[0]
    kind = device.device_kind
    for name, (bf16, fp32) in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return (bf16 if dtype == "bfloat16" else fp32), f"{kind} {dtype} table"
    if device.platform == "cpu":
        if _cpu_peak is None:
            _cpu_peak = measure_matmul_flops()
        return _cpu_peak / max(1, jax.local_device_count()), "measured CPU matmul"
    return float("nan"), f"{kind}: unknown peak"


# --------------------------------------------------------------------------- logging
class Logger:
    """metrics.jsonl + TensorBoard events (process 0 only) + log lines or a progress bar."""

    def __init__(self, run_dir: Path, total: int, start: int, progress: bool):
        self.active = jax.process_index() == 0
        self.bar = None
        if not self.active:
            return
        from tensorboardX import SummaryWriter

        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(run_dir / "tb"))
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, float]):
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()
        line = " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                        if k in ("loss", "lr", "samples_per_s_per_device", "mfu")
                        or k.startswith(("psnr", "ssim")))
        if self.bar is not None:
            self.bar.set_postfix_str(line, refresh=False)
        else:
            print(f"step {step}: {line}", flush=True)

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.active:
            if self.bar is not None:
                self.bar.close()
            self.jsonl.close()
            self.tb.close()


def log(msg: str):
    if jax.process_index() == 0:
        print(f"[pretrain] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the run
class _Preemption:
    """SIGTERM / SIGUSR1 → finish the current step, save, exit EXIT_PREEMPTED."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal: int | None = None
        self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def _handler(self, signum, frame):
        self.signal = signum

    def restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)


def train(cfg: PretrainConfig, model_cls=None, flops_fn=None,
          hooks: Sequence[Callable[[int, dict], None]] = ()) -> int:
    """Run (or resume) the configured pretraining; returns the process exit code."""
    if model_cls is None or flops_fn is None:
        default_cls, default_flops = default_model()
        model_cls, flops_fn = model_cls or default_cls, flops_fn or default_flops
    tc = cfg.training
    preempt = _Preemption()
    shardlib.maybe_initialize_distributed(cfg.mesh)
    mesh = shardlib.make_mesh(cfg.mesh)
    local_bs = shardlib.local_batch_size(tc.batch_size, mesh)
    pre = datalib.preprocess_config(cfg.data.path)
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"run {run_dir} · mesh {dict(mesh.shape)} on {mesh.devices.size}× "
        f"{jax.devices()[0].device_kind} · {jax.process_count()} process(es) · "
        f"model {configlib.config_hash(cfg.model)}")

    # Model, optimizer, state on the mesh; resume from the latest checkpoint when there is one.
    tx = make_optimizer(tc)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        graphdef, state = init_state(cfg, pre, model_cls, tx)
    state, state_sh = shard_state(state, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    ckpt = ckptlib.Checkpointer(run_dir / "ckpt", keep=tc.keep, async_save=tc.async_checkpoint)
    start, data_state = 0, None
    if ckpt.latest_step() is not None:
        start = ckpt.latest_step()
        try:
            state, data_state, _ = ckpt.restore(state, model_cfg=cfg.model)
        except BaseException:
            ckpt.close()
            raise
        log(f"resumed from step {start} ({ckpt.directory})")
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
                         in_shardings=(state_sh, batch_sh, None), out_shardings=(state_sh, None))
    eval_step = jax.jit(make_eval_step(graphdef, cfg))
    schedule = learning_rate_schedule(tc)
    flops = flops_fn(cfg.model, pre, tc.mask_ratio, training=True)
    peak, peak_src = peak_flops_per_device(dtype=cfg.model.dtype)
    n_dev = mesh.devices.size
    log(f"{n_params / 1e6:.2f} M parameters · {flops / 1e9:.3f} GFLOP per sample per step · "
        f"peak {peak / 1e12:.3g} TFLOP/s per device ({peak_src})")

    logger = Logger(run_dir, tc.steps, start, tc.progress)
    history: dict[str, list[float]] = {}
    window = {"t": time.perf_counter(), "steps": 0}

    def finish_step(done: int, metrics) -> None:
        """Host side of a finished step: NaN guard, hooks, accumulation, logging."""
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(host["loss"]):
            raise NonFiniteLoss(
                f"non-finite loss {host['loss']} at step {done} ("
                + ", ".join(f"{k}={v:.4g}" for k, v in host.items()) + "); stopping. "
                f"No checkpoint was written after step {ckpt.latest_step()}.")
        for h in hooks:
            h(done, host)
        for k, v in host.items():
            history.setdefault(k, []).append(v)
        window["steps"] += 1
        logger.advance()
        if done % tc.log_every == 0 or done == tc.steps:
            import metrax

            out = {k: float(metrax.Average.from_model_output(jnp.asarray(v)).compute())
                   for k, v in history.items()}
            history.clear()
            dt = time.perf_counter() - window["t"]
            sps = window["steps"] * tc.batch_size / dt
            out.update(lr=float(schedule(done - 1)), samples_per_s=sps,
                       samples_per_s_per_device=sps / n_dev,
                       mfu=flops * sps / (peak * n_dev), step_time_s=dt / window["steps"])
            window.update(t=time.perf_counter(), steps=0)
            logger.write(done, out)

    code = EXIT_OK
    pending = None  # (step, metrics) of the step dispatched last, checked one step late
    step = start
    try:
        while step < tc.steps:
            batch = next(batches)
            data_state = batches.state
            want_images = tc.image_metrics_every and (step + 1) % tc.image_metrics_every == 0
            if want_images:  # forward pass on the batch before this step's update
                t_img = time.perf_counter()
                _, aux = eval_step(state, batch, step)
                img = image_metrics(jax.device_get(aux), jax.device_get(batch),
                                    cfg.model.patch_size, cfg.model.norm_pix_loss)
                logger.write(step + 1, img)
                window["t"] += time.perf_counter() - t_img  # not part of the step time
            state, metrics = train_step(state, batch, jnp.int32(step))
            if step == start:
                jax.block_until_ready(metrics)
                log(f"first step (compile + run) {time.perf_counter() - window['t']:.1f} s")
                window["t"] = time.perf_counter()
            step += 1
            if pending is not None:
                finish_step(*pending)
            pending = (step, metrics)
            save_now = step % tc.ckpt_every == 0 or step == tc.steps or preempt.signal
            if save_now:
                finish_step(*pending)  # never save a state whose loss was not finite
                pending = None
                ckpt.save(step, state, datalib.state_to_json(data_state), config_rec)
            if preempt.signal:
                log(f"signal {preempt.signal}: saved step {step}, exiting for requeue")
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
    graphdef, state = init_state(cfg, pre, model_cls, tx)
    state, _, _ = ckpt.restore(state, model_cfg=cfg.model, step=step)
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


def main(argv=None, *, model_cls=None, flops_fn=None, hooks=()) -> int:
    args = parse_args(argv)
    try:
        cfg = load_pretrain_config(args.config, args.set)
    except configlib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 1
    try:
        return train(cfg, model_cls=model_cls, flops_fn=flops_fn, hooks=hooks)
    except ckptlib.ArchitectureMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
