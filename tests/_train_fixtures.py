"""Test helpers for the training stack: tiny shards and a tiny stand-in for MultimodalMAE.

The stand-in follows train.mae's interface (``Model(cfg, pre, *, rngs)``,
``model(batch, key, mask_ratio) -> (loss, aux)``, ``model.encode(batch, modalities) ->
(tokens, valid)``) so that the training machinery can be tested fast and on its own.
It lives in tests only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from etl import codec, configlib
from etl.config import BEVGrid, ETLConfig, ImageConfig, PreprocessConfig, RadarConfig
from etl.schema import (
    BOX_CLASSES,
    IMAGE_MODALITIES,
    MODALITIES,
    SCHEMA_VERSION,
    empty_sample,
)

TINY_GRID = BEVGrid(x_min=-8.0, x_max=8.0, y_min=-8.0, y_max=8.0, resolution=0.5)  # 32×32
TINY_PRE = PreprocessConfig(
    lidar=TINY_GRID,
    radar=RadarConfig(grid=TINY_GRID),
    image=ImageConfig(rgb_size=(32, 32), ir_size=(32, 32)),
    max_boxes=4,
)


def random_sample(rng: np.random.Generator, pre: PreprocessConfig = TINY_PRE, index: int = 0):
    s = empty_sample(pre)
    present = rng.random(len(MODALITIES)) < 0.85
    present[0] = True  # lidar, the master clock, is always there
    for i, m in enumerate(MODALITIES):
        if not present[i]:
            continue
        shape = s[m].shape
        if m in IMAGE_MODALITIES:
            # smooth-ish images so that reconstruction has something to learn
            base = rng.random((shape[0] // 8, shape[1] // 8, shape[2])).astype(np.float32)
            s[m] = np.kron(base, np.ones((8, 8, 1), np.float32))
        else:
            s[m] = rng.normal(size=shape).astype(np.float32)
    s["present"] = present.astype(np.uint8)
    n = int(rng.integers(0, pre.max_boxes + 1))
    for k in range(n):
        s["boxes"][k] = [rng.uniform(-6, 6), rng.uniform(-6, 6), 0, 4.0, 2.0, 1.5,
                         rng.uniform(-3, 3)]
        s["box_class"][k] = BOX_CLASSES.index("Car")
    s["has_labels"] = np.uint8(1)
    s["time"] = np.float64(index * 0.1)
    return s


def write_shards(out: Path, n_train: int = 48, n_val: int = 16, shards: int = 2,
                 pre: PreprocessConfig = TINY_PRE, seed: int = 0) -> Path:
    """A miniature `etl.build` output: manifest.json + {split}-NNNNN.array_record."""
    from array_record.python.array_record_module import ArrayRecordWriter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    index, splits = 0, {}
    for split, n in (("train", n_train), ("val", n_val)):
        per = -(-n // shards)
        listed = []
        for k in range(shards):
            name = f"{split}-{k:05d}.array_record"
            w = ArrayRecordWriter(str(out / name), "group_size:1")
            count = min(per, n - k * per)
            for _ in range(count):
                s = random_sample(rng, pre, index)
                w.write(codec.encode(s, meta={"index": index, "split": split}))
                index += 1
            w.close()
            listed.append({"path": name, "count": count})
        splits[split] = {"shards": listed, "samples": n}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "codec_version": codec.CODEC_VERSION,
        "config": configlib.to_dict(ETLConfig(preprocess=pre)),
        "splits": splits,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


# --------------------------------------------------------------------------- stand-in model
def make_standin():
    """The stand-in class (built lazily so that importing this file does not import jax)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class StandInMAE(nnx.Module):
        """Per image modality: patchify → Linear → random mask → Linear back; MSE on masked."""

        def __init__(self, cfg, pre, *, rngs: nnx.Rngs):
            self.cfg, self.pre = cfg, pre
            p = cfg.patch_size
            chans = {"lidar": 2, "radar": 2, "rgb": 3, "ir": 1}
            self.mods = [m for m in cfg.modalities if m in chans]
            self.enc = nnx.Dict({m: nnx.Linear(p * p * chans[m], cfg.embed_dim, rngs=rngs)
                                 for m in self.mods})
            self.mix = nnx.Linear(cfg.embed_dim, cfg.embed_dim, rngs=rngs)
            self.dec = nnx.Dict({m: nnx.Linear(cfg.embed_dim, p * p * chans[m], rngs=rngs)
                                 for m in self.mods})

        def _patches(self, x):
            p = self.cfg.patch_size
            b, h, w, c = x.shape
            x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
            return x.reshape(b, (h // p) * (w // p), p * p * c)

        def __call__(self, batch, key, mask_ratio):
            losses, aux, total, weight = {}, {}, 0.0, 0.0
            for i, m in enumerate(self.mods):
                x = self._patches(batch[m].astype(jnp.float32))
                b, n, _ = x.shape
                k = jax.random.fold_in(key, i)
                masked = jax.random.uniform(k, (b, n)) < mask_ratio
                z = self.enc[m](jnp.where(masked[..., None], 0.0, x))
                pred = self.dec[m](jax.nn.gelu(self.mix(z)))
                present = batch["present"][:, MODALITIES.index(m)].astype(jnp.float32)
                w = masked.astype(jnp.float32) * present[:, None]
                err = ((pred - x) ** 2).mean(-1)
                lm = (err * w).sum() / jnp.maximum(w.sum(), 1.0)
                losses[f"loss/{m}"] = lm
                aux[f"mask/{m}"] = masked
                aux[f"pred/{m}"] = pred
                total = total + lm * (w.sum() > 0)
                weight = weight + (w.sum() > 0)
            loss = total / jnp.maximum(weight, 1.0)
            return loss, {**losses, **aux}

        def encode(self, batch, modalities=None):
            mods = [m for m in (modalities or self.mods) if m in self.mods]
            toks = [self.mix(self.enc[m](self._patches(batch[m].astype(jnp.float32))))
                    for m in mods]
            tokens = jnp.concatenate(toks, axis=1)
            return tokens, jnp.ones(tokens.shape[:2], bool)

    return StandInMAE


def standin_flops(cfg, pre, mask_ratio, training=True):
    return 1e6


def run_pretrain(argv, hooks=()):
    """Run train.pretrain with the stand-in model (in this process)."""
    from train import pretrain

    return pretrain.main(argv, model_cls=make_standin(), flops_fn=standin_flops, hooks=hooks)


TINY_TOML = """\
run_name = "{run_name}"
runs_dir = "{runs_dir}"
[model]
embed_dim = 16
num_heads = 2
patch_size = 8
modalities = ["lidar", "radar", "rgb", "ir"]
[training]
batch_size = 8
steps = 8
warmup_steps = 2
log_every = 1
ckpt_every = 4
image_metrics_every = 0
progress = false
[data]
path = "{data}"
read_threads = 1
prefetch = 8
"""


def tiny_config(tmp: Path, data: Path, run_name: str = "run") -> Path:
    """A stand-in-sized pretraining config file (8 steps, log every step, ckpt every 4)."""
    p = Path(tmp) / f"{run_name}.toml"
    p.write_text(TINY_TOML.format(run_name=run_name, runs_dir=Path(tmp) / "runs", data=data))
    return p


def read_losses(run_dir: Path) -> dict[int, float]:
    """step → loss from metrics.jsonl (the last line for a step wins)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


CORRUPTIONS = ("chunk", "metadata", "manifest")


def corrupt_step(step_dir: Path, how: str) -> None:
    """Damage one Orbax step folder: truncate its largest array chunk, truncate the state's
    metadata, or delete the state's manifest."""
    state = Path(step_dir) / "state"
    if how == "chunk":
        f = max((p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"
                 and "ocdbt.process" in str(p)), key=lambda p: p.stat().st_size)
    elif how == "metadata":
        f = state / "_METADATA"
    elif how == "manifest":
        (state / "manifest.ocdbt").unlink()
        return
    else:
        raise ValueError(how)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def untrained_checkpoint(runs: Path, data: Path, pre: PreprocessConfig = TINY_PRE,
                         run_name: str = "r", modalities=("lidar", "imu"), seed: int = 3) -> Path:
    """A run folder ``runs/run_name`` whose ckpt holds step 1 of a freshly initialised tiny
    MultimodalMAE (embed 16, one block each) over the dataset ``data``: what the probe and the
    domain gap read, without the compilation that training it would add."""
    import dataclasses

    from train import pretrain
    from train.checkpoint import Checkpointer, config_record
    from train.config import ModelConfig, PretrainConfig, TrainingConfig

    cfg = PretrainConfig(
        model=ModelConfig(embed_dim=16, depth=1, num_heads=2, patch_size=8, fusion_depth=1,
                          decoder_dim=16, decoder_depth=1, decoder_heads=2,
                          modalities=tuple(modalities)),
        training=TrainingConfig(seed=seed), run_name=run_name, runs_dir=str(runs))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data)))
    tx = pretrain.make_optimizer(cfg.training)
    _, state, _ = pretrain.init_state(cfg, pre, pretrain.default_model()[0], tx)
    run = Path(runs) / run_name
    ck = Checkpointer(run / "ckpt", async_save=False)
    try:
        ck.save(1, state, {}, config_record(cfg, pre))
    finally:
        ck.close()
    return run
