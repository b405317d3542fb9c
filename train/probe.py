"""Linear probe: did pretraining learn where the vehicles are?

    python -m train.probe --ckpt runs/cmht_base [--data data_cache] [--steps 500]

Frozen fused tokens (``model.encode``, every modality, no masking) → the tokens of the LiDAR
BEV patches → one logistic-regression unit per token predicting whether that patch of the BEV
grid holds a labelled vehicle (``etl.preprocess.boxes_to_bev`` of the sample's boxes at the
LiDAR grid, max-pooled to the patch grid). Trained with optax on the train split (labelled
sweeps only), scored as IoU of the occupied patches on the val split, next to the very same
probe on a randomly initialised model of the same architecture and the all-occupied baseline.
Pretraining learned something beyond reconstruction when its IoU beats the random model's.
Writes ``probe.json`` next to the checkpoint folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from etl.preprocess import boxes_to_bev
from train import data as datalib


def occupancy_targets(boxes: np.ndarray, box_class: np.ndarray, grid, patch: int) -> np.ndarray:
    """(B, K, 7) boxes → (B, gh·gw) 1 where a vehicle covers any cell of the patch."""
    out = []
    for b, c in zip(boxes, box_class, strict=True):
        occ = boxes_to_bev(b, c, grid)
        h, w = occ.shape
        pooled = occ.reshape(h // patch, patch, w // patch, patch).max(axis=(1, 3))
        out.append(pooled.reshape(-1))
    return np.stack(out).astype(np.float32)


def lidar_features(model, dcfg, pre, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(features (N·P, D), targets (N·P,)) over the labelled samples of one split."""
    graphdef, state = nnx.split(model)
    patch = model.cfg.patch_size

    @jax.jit
    def encode(state, batch):
        m = nnx.merge(graphdef, state)
        tokens, _ = m.encode(batch)
        sl = m.token_layout()["lidar"]
        return tokens[:, sl].astype(jnp.float32)

    keys = (*datalib.MODEL_KEYS, *datalib.LABEL_KEYS)
    ds = datalib.make_dataset(dcfg, batch_size, pre=pre, keys=keys, shuffle=False, repeat=False)
    feats, targets = [], []
    for batch in ds:
        keep = batch["has_labels"] > 0
        if not keep.any():
            continue
        model_batch = {k: batch[k] for k in datalib.MODEL_KEYS}
        f = np.asarray(encode(state, model_batch))[keep]
        t = occupancy_targets(batch["boxes"][keep], batch["box_class"][keep], pre.lidar, patch)
        feats.append(f.reshape(-1, f.shape[-1]))
        targets.append(t.reshape(-1))
    if not feats:
        raise ValueError(f"{dcfg.path} split {dcfg.split!r}: no labelled samples")
    return np.concatenate(feats), np.concatenate(targets)


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    inter = np.logical_and(pred, target).sum()
    union = np.logical_or(pred, target).sum()
    return float(inter / union) if union else float("nan")


def fit_probe(x: np.ndarray, y: np.ndarray, steps: int = 500, lr: float = 1e-2,
              weight_decay: float = 1e-4):
    """Class-balanced logistic regression on standardized features; returns predict(x)→prob
    and the decision threshold that maximizes IoU on the training set."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = jnp.asarray((x - mean) / std)
    yj = jnp.asarray(y)
    pos = float(y.mean())
    w_pos = 0.5 / max(pos, 1e-6)
    w_neg = 0.5 / max(1.0 - pos, 1e-6)
    params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}
    tx = optax.adamw(lr, weight_decay=weight_decay)
    opt = tx.init(params)

    def loss_fn(p):
        logits = xs @ p["w"] + p["b"]
        ll = optax.sigmoid_binary_cross_entropy(logits, yj)
        return jnp.mean(ll * jnp.where(yj > 0, w_pos, w_neg))

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    for _ in range(steps):
        params, opt, _ = step(params, opt)

    def predict(x_new):
        z = (x_new - mean) / std
        return np.asarray(jax.nn.sigmoid(jnp.asarray(z) @ params["w"] + params["b"]))

    p_train = predict(x)
    grid = np.linspace(0.05, 0.95, 19)
    threshold = float(max(grid, key=lambda t: np.nan_to_num(iou(p_train > t, y > 0))))
    return predict, threshold


def run_probe(model, cfg, pre, split_train="train", split_val="val", batch_size=8, steps=500):
    def split(name):
        return dataclasses.replace(cfg.data, split=name)

    x_tr, y_tr = lidar_features(model, split(split_train), pre, batch_size)
    try:
        x_va, y_va = lidar_features(model, split(split_val), pre, batch_size)
        held_out = f"{split_val} split"
    except (ValueError, KeyError, RuntimeError) as e:  # no val samples in a tiny dataset
        print(f"[probe] {e}; holding out the last 25% of the train samples instead",
              file=sys.stderr)
        sl = model.token_layout()["lidar"]
        n_tok = sl.stop - sl.start
        n = len(y_tr) // n_tok
        cut = int(n * 0.75) * n_tok
        x_tr, y_tr, x_va, y_va = x_tr[:cut], y_tr[:cut], x_tr[cut:], y_tr[cut:]
        held_out = "last 25% of train"
    predict, thr = fit_probe(x_tr, y_tr, steps=steps)
    return {
        "iou": iou(predict(x_va) > thr, y_va > 0),
        "threshold": thr,
        "train_patches": int(len(y_tr)),
        "val_patches": int(len(y_va)),
        "val_occupied_fraction": float(y_va.mean()),
        "held_out": held_out,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="runs/NAME, runs/NAME/ckpt or .../ckpt/STEP")
    ap.add_argument("--data", default=None, help="dataset folder (default: the run's data.path)")
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--val-split", default="val")
    ap.add_argument("--steps", type=int, default=500, help="probe optimisation steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None, help="JSON report (default: RUN/probe.json)")
    args = ap.parse_args(argv)

    from etl import configlib
    from train.pretrain import default_model, load_trained, resolve_ckpt

    overrides = [f"data.path={args.data}"] if args.data else []
    try:  # the checkpoint's config record
        model, cfg, pre, step = load_trained(args.ckpt, overrides=overrides)
    except configlib.ConfigError as e:
        return configlib.cli_error("train.probe", e)
    if "lidar" not in getattr(model, "modalities", cfg.model.modalities):
        print("the probe reads the LiDAR BEV tokens; this model has no lidar encoder",
              file=sys.stderr)
        return 1
    random_model = default_model()[0](cfg.model, pre, rngs=nnx.Rngs(cfg.training.seed + 1))
    kw = dict(split_train=args.train_split, split_val=args.val_split,
              batch_size=args.batch_size, steps=args.steps)
    report = {"checkpoint_step": step}
    for name, m in (("pretrained", model), ("random_init", random_model)):
        report[name] = run_probe(m, cfg, pre, **kw)
        print(f"{name:12s} IoU {report[name]['iou']:.4f}  (threshold "
              f"{report[name]['threshold']:.2f}, {report[name]['val_patches']} val patches)")
    occ = report["pretrained"]["val_occupied_fraction"]
    report["all_occupied_iou"] = occ
    print(f"{'all occupied':12s} IoU {occ:.4f}  (predicting every patch occupied)")
    ckpt_dir, _ = resolve_ckpt(args.ckpt)
    out = Path(args.out) if args.out else ckpt_dir.parent / "probe.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
