"""What a checkpoint reconstructs: one PNG per modality — input, masked input, reconstruction.

    python -m train.visualize --ckpt runs/tiny --out runs/tiny/vis [--split val] [--samples 4]

Image-like modalities (lidar, radar, rgb, ir) get one row per sample: the input, the input with
the masked patches greyed out, the reconstruction (visible patches from the input, masked ones
from the model) and the model's raw prediction everywhere. BEV grids show their first channel
(log-density). GPS and IMU, masked as channel groups, get bars of target vs prediction in the
model's normalized units, masked groups marked. A modality absent from a sample says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

from etl.schema import IMAGE_MODALITIES, MODALITY_INDEX
from train import data as datalib
from train.metrics import reconstruction, to_unit_range


def _display(m: str, x: np.ndarray) -> np.ndarray:
    """(H, W, C) → what imshow shows: rgb as colour, the rest as the first channel."""
    x = to_unit_range(m, x)
    return x if m == "rgb" else x[..., 0]


def plot_image_modality(m: str, batch: dict, aux: dict, patch: int, norm_pix: bool,
                        out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = np.asarray(batch[m], np.float32)
    pred, mask = reconstruction(aux, batch, m, patch, norm_pix)
    n = target.shape[0]
    cmap = None if m == "rgb" else ("inferno" if m in ("lidar", "radar") else "gray")
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.6 * n), squeeze=False)
    for i in range(n):
        present = bool(batch["present"][i, MODALITY_INDEX[m]])
        masked_in = np.where(mask[i], 0.5 if m != "rgb" else 0.0, target[i])
        pasted = np.where(mask[i], pred[i], target[i])
        panels = [("input", target[i]), ("masked input", masked_in),
                  ("reconstruction", pasted), ("prediction", pred[i])]
        for ax, (title, img) in zip(axes[i], panels, strict=True):
            ax.imshow(_display(m, img), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(title if present else f"{title} (absent)", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{m}: {mask[0].mean():.0%} of patches masked")
    fig.tight_layout()
    path = out / f"{m}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_vector_modality(m: str, batch: dict, aux: dict, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if f"pred/{m}" not in aux or f"target/{m}" not in aux:
        return None
    pred, target = np.asarray(aux[f"pred/{m}"]), np.asarray(aux[f"target/{m}"])
    mask = np.asarray(aux.get(f"mask/{m}", np.zeros(pred.shape[:2])))
    n = pred.shape[0]
    fig, axes = plt.subplots(n, 1, figsize=(7, 1.8 * n), squeeze=False)
    for i in range(n):
        ax = axes[i, 0]
        t, p = target[i].reshape(-1), pred[i].reshape(-1)
        group = pred.shape[2]
        xs = np.arange(t.size)
        ax.bar(xs - 0.2, t, 0.4, label="target")
        ax.bar(xs + 0.2, p, 0.4, label="prediction")
        for g in range(pred.shape[1]):
            if mask[i, g]:
                ax.axvspan(g * group - 0.5, (g + 1) * group - 0.5, color="grey", alpha=0.2)
        present = bool(batch["present"][i, MODALITY_INDEX[m]])
        ax.set_title(f"sample {i}" + ("" if present else " (absent)") + "; grey = masked",
                     fontsize=9)
        if i == 0:
            ax.legend(fontsize=8)
    fig.suptitle(f"{m} (normalized units)")
    fig.tight_layout()
    path = out / f"{m}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.visualize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="runs/NAME, runs/NAME/ckpt or .../ckpt/STEP")
    ap.add_argument("--out", required=True, help="folder for the PNGs")
    ap.add_argument("--split", default="val", help="data split (falls back to train if empty)")
    ap.add_argument("--data", default=None, help="dataset folder (default: the run's data.path)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--mask-ratio", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0, help="masking key")
    args = ap.parse_args(argv)

    from etl import configlib
    from train.pretrain import load_trained

    overrides = [f"data.path={args.data}"] if args.data else []
    try:  # the checkpoint's config record
        model, cfg, pre, step = load_trained(args.ckpt, overrides=overrides)
    except configlib.ConfigError as e:
        return configlib.cli_error("train.visualize", e)
    batch = None
    for split in dict.fromkeys((args.split, "train")):
        try:
            dcfg = type(cfg.data)(**{**cfg.data.__dict__, "split": split})
            ds = datalib.make_dataset(dcfg, args.samples, pre=pre, shuffle=False, repeat=False)
            batch = next(iter(ds))
            break
        except (ValueError, StopIteration, RuntimeError) as e:
            print(f"split {split!r}: {e}", file=sys.stderr)
    if batch is None:
        print("no data to show", file=sys.stderr)
        return 1
    ratio = cfg.training.mask_ratio if args.mask_ratio is None else args.mask_ratio
    _, aux = jax.jit(lambda b, k: model(b, k, ratio))(batch, jax.random.PRNGKey(args.seed))
    aux = jax.device_get(aux)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for m in model.modalities if hasattr(model, "modalities") else cfg.model.modalities:
        if m in IMAGE_MODALITIES:
            path = plot_image_modality(m, batch, aux, cfg.model.patch_size,
                                       cfg.model.norm_pix_loss, out)
        else:
            path = plot_vector_modality(m, batch, aux, out)
        if path is not None:
            print(f"{m}: {path}  (loss/{m} = {float(aux.get(f'loss/{m}', np.nan)):.4f})")
    print(f"checkpoint step {step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
