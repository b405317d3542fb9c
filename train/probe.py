"""Linear probes: what do a checkpoint's frozen LiDAR tokens know, next to a random-init model?

    python -m train.probe --ckpt runs/pretrain_cpu [--data data_cache/cpu] [--tokens fused]

Features. Every sample of the train and the held-out split goes through ``model.encode`` — every
modality, *unmasked* (mask ratio 0: no patch is dropped at probe time) — and the fused tokens at
the LiDAR BEV patches are kept (``--tokens encoder``: the LiDAR encoder's own tokens, before
fusion). The same is done for a randomly initialised model of the same architecture, and for the
raw BEV patch itself, projected on its leading principal components (as many as the tokens have
numbers; fitted on the train split): what a probe gets with no encoder at all.

Two probes, one linear map per token, the same procedure for every feature set:

- vehicle occupancy: does a labelled vehicle cover any cell of the patch? L2 logistic regression
  solved to convergence (``train.probe_fit``); scored as the IoU of the occupied patches, and as
  average precision (threshold-free); labelled sweeps only;
- free space: per BEV cell of the patch, the distance (m) to the nearest obstacle cell — a cell
  whose highest LiDAR return is above ``--obstacle-z`` (LiDAR frame; 0.5 m above the road for a
  sensor 1.8 m up) — clipped at ``--max-dist``; multi-output ridge; scored as R² and MAE over
  every cell of the held-out split.

Every feature is standardised with the training rows' mean and std. The regularisation and the
occupancy threshold are chosen by grouped K-fold cross-validation on the train split (groups:
drives, or blocks of consecutive frames when there are fewer than three drives); the held-out
split only scores. The held-out split must not share a drive with the train split (build the
cache with ``etl.build --set output.split=drive``), so that neighbouring, nearly identical
frames never straddle it.

Intervals. 95 % paired bootstrap intervals of pretrained − random init (and of each score) from
resampling the held-out drives (≥ 5) or blocks of 10 consecutive held-out frames.

Writes ``RUN/probe/``: ``probe.json`` (every number), ``probe.md`` (tables and pictures),
``probe_examples.png`` (held-out sweeps, truth and predictions) and reconstructions of held-out
drives (``recon_<modality>.png``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from etl.config import BEVGrid
from etl.dataset import ShardSource
from etl.preprocess import boxes_to_bev
from train import data as datalib
from train import probe_fit as pf

PROBES = ("occupancy", "free_space")


class ProbeError(RuntimeError):
    """The probe cannot run on this data (one line naming what and where)."""


# --------------------------------------------------------------------------- targets
def occupancy_targets(boxes: np.ndarray, box_class: np.ndarray, grid, patch: int) -> np.ndarray:
    """(B, K, 7) boxes → (B, gh·gw) 1 where a vehicle covers any cell of the patch."""
    out = []
    for b, c in zip(boxes, box_class, strict=True):
        occ = boxes_to_bev(b, c, grid)
        h, w = occ.shape
        pooled = occ.reshape(h // patch, patch, w // patch, patch).max(axis=(1, 3))
        out.append(pooled.reshape(-1))
    return np.stack(out).astype(np.float32)


def obstacle_cells(bev: np.ndarray, grid: BEVGrid, obstacle_z: float) -> np.ndarray:
    """(…, H, W, 2) LiDAR BEV → (…, H, W) bool: cells with a return whose height (the BEV's max
    height channel, min-maxed on [z_min, z_max]) is at least ``obstacle_z`` metres."""
    level = (obstacle_z - grid.z_min) / (grid.z_max - grid.z_min)
    return (bev[..., 0] > 0) & (bev[..., 1] >= level)


def distance_targets(bev: np.ndarray, grid: BEVGrid, patch: int, obstacle_z: float,
                     max_dist: float) -> np.ndarray:
    """(B, H, W, 2) LiDAR BEVs → (B, gh·gw, p·p) float32: each cell's Euclidean distance (m,
    cell centre to cell centre) to the nearest obstacle cell, clipped at ``max_dist`` (also
    where the grid holds no obstacle), laid out like ``train.encoders.patchify``."""
    b, h, w = bev.shape[:3]
    obst = obstacle_cells(bev, grid, obstacle_z)
    out = np.empty((b, h, w), np.float32)
    for i in range(b):
        if not obst[i].any():
            out[i] = np.inf  # no obstacle in the grid: as far as the clip
            continue
        free = (~obst[i]).astype(np.uint8)
        out[i] = cv2.distanceTransform(free, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    out = np.minimum(out * grid.resolution, max_dist)
    gh, gw = h // patch, w // patch
    return out.reshape(b, gh, patch, gw, patch).transpose(0, 1, 3, 2, 4).reshape(
        b, gh * gw, patch * patch)


def raw_patches(bev: np.ndarray, patch: int) -> np.ndarray:
    """(B, H, W, C) → (B, gh·gw, p·p·C): the raw-input feature set."""
    b, h, w, c = bev.shape
    x = bev.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


# --------------------------------------------------------------------------- features
def token_fn(model, tokens: str = "fused", modalities: tuple[str, ...] | None = None):
    """batch → (B, n_lidar_patches, D) float32 LiDAR tokens of the *unmasked* input.

    ``fused``: ``model.encode`` (no masking exists there) over ``modalities`` (default: every
    modality of the model; the policy sees lidar, gps and imu), the LiDAR slice of
    ``model.token_layout``; ``encoder``: the LiDAR encoder alone."""
    if tokens not in ("fused", "encoder"):
        raise ValueError(f"tokens must be 'fused' or 'encoder', got {tokens!r}")
    if modalities is not None and "lidar" not in modalities:
        raise ValueError(f"the probe reads the LiDAR tokens; modalities {modalities} lack it")
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, batch):
        m = nnx.merge(graphdef, state)
        if tokens == "fused":
            t, _ = m.encode(batch, modalities)
            t = t[:, m.token_layout(modalities)["lidar"]]
        else:
            t = m.encoders["lidar"](batch["lidar"])
        return t.astype(jnp.float32)

    return lambda batch: np.asarray(f(state, batch))


@dataclasses.dataclass
class ProbeSplit:
    """One split's probe inputs: per feature set (N, P, D) features, and the targets."""

    name: str
    feats: dict[str, np.ndarray]
    occ: np.ndarray  # (N, P) 1 = a vehicle in the patch (meaningful where labelled)
    labelled: np.ndarray  # (N,) bool
    dist: np.ndarray  # (N, P, p·p) metres
    drive: np.ndarray  # (N,) str
    frame: np.ndarray  # (N,) int
    examples: dict[str, np.ndarray]  # a few samples kept whole for the pictures

    def __len__(self) -> int:
        return len(self.drive)


def extract(feature_fns: dict, path: str, split: str, pre, patch: int, batch_size: int,
            obstacle_z: float, max_dist: float, keep_examples: int = 4,
            frame_stride: int = 1, progress: bool = True) -> ProbeSplit:
    """Read every ``frame_stride``-th sample of ``split`` once; features of every feature set."""
    try:
        src = ShardSource(path, split, keep_meta=True)
    except Exception as e:  # noqa: BLE001 — one line naming the dataset and split
        raise ProbeError(f"{path}: split {split!r}: {e}") from None
    if len(src) == 0:
        raise ProbeError(f"{path}: split {split!r} has no samples")
    if src.cfg != pre:
        raise ProbeError(f"{path}: built with another preprocess config than the checkpoint's")
    idx = np.arange(0, len(src), frame_stride)
    feats = {k: [] for k in feature_fns}
    feats["raw_bev_patch"] = []
    occ, lab, dist, drive, frame = [], [], [], [], []
    examples, seen_drives = [], set()
    t0 = time.perf_counter()
    for j in range(0, len(idx), batch_size):
        samples = [src[int(i)] for i in idx[j:j + batch_size]]
        n = len(samples)
        padded = samples + [samples[-1]] * (batch_size - n)  # one shape: one compilation
        batch = {k: np.stack([s[k] for s in padded]) for k in datalib.MODEL_KEYS}
        for k, fn in feature_fns.items():
            feats[k].append(fn(batch)[:n])
        bev = batch["lidar"][:n]
        feats["raw_bev_patch"].append(raw_patches(bev, patch))
        occ.append(occupancy_targets(np.stack([s["boxes"] for s in samples]),
                                     np.stack([s["box_class"] for s in samples]),
                                     pre.lidar, patch))
        lab.append(np.array([bool(s["has_labels"]) for s in samples]))
        dist.append(distance_targets(bev, pre.lidar, patch, obstacle_z, max_dist))
        for s in samples:
            drive.append(str(s["meta"]["drive"]))
            frame.append(int(s["meta"]["frame"]))
            # one labelled sweep from each of the first drives, for the pictures
            if (len(examples) < keep_examples and s["has_labels"]
                    and drive[-1] not in seen_drives):
                seen_drives.add(drive[-1])
                examples.append(len(drive) - 1)
        if progress:
            print(f"\r[probe] {split}: {min(j + batch_size, len(idx))}/{len(idx)} samples "
                  f"({time.perf_counter() - t0:.0f} s)", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    out = ProbeSplit(
        name=split, feats={k: np.concatenate(v) for k, v in feats.items()},
        occ=np.concatenate(occ), labelled=np.concatenate(lab), dist=np.concatenate(dist),
        drive=np.array(drive), frame=np.array(frame), examples={"index": np.array(examples)})
    if examples:
        out.examples["samples"] = [src[int(idx[i])] for i in examples]
    return out


def add_pca_baseline(train: ProbeSplit, test: ProbeSplit, dim: int,
                     key: str = "raw_bev_patch") -> None:
    """``raw_bev_pca``: the raw BEV patches projected on their ``dim`` leading principal
    components (fitted on the train split): the best ``dim``-number linear summary of the input,
    as wide as the tokens. A pretrained encoder should beat it; a random one need not."""
    x = _rows(train.feats[key]).astype(np.float64)
    mean = x.mean(0)
    evals, evecs = np.linalg.eigh((x - mean).T @ (x - mean) / len(x))
    comp = evecs[:, ::-1][:, :min(dim, x.shape[1])]
    for s in (train, test):
        f = s.feats.pop(key)
        s.feats["raw_bev_pca"] = ((f - mean) @ comp).astype(np.float32)


def add_position(splits: Sequence[ProbeSplit], names: Sequence[str]) -> list[str]:
    """``<name>+pos``: each token's features with its patch index appended (one-hot), for every
    feature set alike. A random-init model's tokens carry their patch position linearly (its
    sin-cos embedding passes through the random blocks: most of their variance), a pretrained
    one need not (its decoder adds the positions back, and a BEV patch's content gives much of
    it away); with the index given to every probe, the comparison is of what the tokens know
    about the patch beyond where it is. Returns the new names."""
    out = []
    for name in names:
        for s in splits:
            f = s.feats[name]
            n, p = f.shape[:2]
            onehot = np.broadcast_to(np.eye(p, dtype=np.float32), (n, p, p))
            s.feats[f"{name}+pos"] = np.concatenate([f, onehot], axis=-1)
        out.append(f"{name}+pos")
    return out


def check_disjoint(train: ProbeSplit, test: ProbeSplit, path: str) -> None:
    shared = sorted(set(train.drive.tolist()) & set(test.drive.tolist()))
    if shared:
        raise ProbeError(
            f"{path}: the {test.name!r} and {train.name!r} splits share {len(shared)} drive(s) "
            f"(e.g. {shared[0]}): neighbouring frames would leak into the test; rebuild the "
            f"cache with `etl.build --set output.split=drive`")


def cv_groups(split: ProbeSplit, rows: np.ndarray, block: int = 20) -> tuple[np.ndarray, str]:
    """Cross-validation group of each sample in ``rows``: its drive when there are ≥ 3 drives,
    else its block of ``block`` consecutive frames within the drive."""
    d, f = split.drive[rows], split.frame[rows]
    if len(set(d.tolist())) >= 3:
        return d, "drive"
    return np.array([f"{a}#{b // block}" for a, b in zip(d, f, strict=True)]), \
        f"block of {block} frames"


# --------------------------------------------------------------------------- the probes
def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1])


def probe_occupancy(train: ProbeSplit, test: ProbeSplit, name: str, folds: int) -> dict:
    """Fit on the train split's labelled sweeps; per held-out labelled sweep: probabilities."""
    tr, te = np.nonzero(train.labelled)[0], np.nonzero(test.labelled)[0]
    if len(tr) == 0 or len(te) == 0:
        raise ProbeError(f"occupancy probe: no labelled sweeps in the "
                         f"{train.name if len(tr) == 0 else test.name!r} split")
    n_tok = train.occ.shape[1]
    groups, gkind = cv_groups(train, tr)
    fit = pf.cv_logistic(_rows(train.feats[name][tr]), train.occ[tr].reshape(-1),
                         np.repeat(groups, n_tok), k=folds)
    prob = fit.predict(_rows(test.feats[name][te])).reshape(len(te), n_tok)
    return {"prob": prob, "rows": te, "lam": fit.lam, "threshold": fit.threshold,
            "cv_iou": fit.cv_iou, "cv_log_loss": fit.cv_log_loss, "cv_groups": gkind}


def probe_free_space(train: ProbeSplit, test: ProbeSplit, name: str, folds: int) -> dict:
    n_tok = train.dist.shape[1]
    groups, gkind = cv_groups(train, np.arange(len(train)))
    fit = pf.cv_ridge(_rows(train.feats[name]), _rows(train.dist),
                      np.repeat(groups, n_tok), k=folds)
    pred = fit.predict(_rows(test.feats[name])).reshape(test.dist.shape)
    return {"pred": pred.astype(np.float32), "lam": fit.lam, "cv_mse": fit.cv_mse,
            "cv_groups": gkind}


def average_precision(score: np.ndarray, target: np.ndarray) -> float:
    s, t = np.asarray(score).reshape(-1), np.asarray(target).reshape(-1) > 0
    if not t.any():
        return float("nan")
    t = t[np.argsort(-s, kind="stable")]
    tp = np.cumsum(t)
    return float((tp / np.arange(1, len(t) + 1))[t].mean())


def compare(stats: dict[str, np.ndarray], metric, a: str, b: str, n_boot: int, seed: int
            ) -> dict:
    """Point estimate and 95 % paired-bootstrap interval of metric(a) − metric(b)."""
    n = len(stats[a])
    return pf.paired_bootstrap(lambda i: metric(stats[a][i]) - metric(stats[b][i]), n,
                               n_boot=n_boot, seed=seed)


def interval(stats: np.ndarray, metric, n_boot: int, seed: int) -> dict:
    return pf.paired_bootstrap(lambda i: metric(stats[i]), len(stats), n_boot=n_boot, seed=seed)


def run_probes(train: ProbeSplit, test: ProbeSplit, names: list[str], folds: int = 5,
               n_boot: int = 2000, seed: int = 0, references: Sequence[tuple[str, str]] = (),
               min_drives: int = 5, block: int = 10) -> tuple[dict, dict]:
    """Both probes for every feature set in ``names``; returns (report, predictions).

    ``references``: pairs (a, b) whose difference a − b gets its paired interval (pretrained −
    random init), under ``report[probe]["differences"]["a - b"]``.
    """
    report: dict = {"occupancy": {}, "free_space": {}}
    preds: dict = {"occupancy": {}, "free_space": {}}
    units, unit_kind = pf.unit_ids(test.drive, test.frame, min_drives=min_drives, block=block)
    n_units = int(units.max()) + 1
    report["bootstrap"] = {"unit": unit_kind, "n_units": n_units, "n_boot": n_boot,
                           "level": 0.95, "seed": seed}
    occ_stats, dist_stats = {}, {}
    for name in names:
        t0 = time.perf_counter()
        o = probe_occupancy(train, test, name, folds)
        y = test.occ[o["rows"]]
        occ_stats[name] = pf.occupancy_unit_stats(o["prob"], o["threshold"], y, units[o["rows"]],
                                               n_units)
        report["occupancy"][name] = {
            "iou": pf.iou_of(occ_stats[name]),
            "iou_ci": interval(occ_stats[name], pf.iou_of, n_boot, seed),
            "average_precision": average_precision(o["prob"], y),
            "threshold": o["threshold"], "lambda": o["lam"], "cv_iou": o["cv_iou"],
            "cv_groups": o["cv_groups"],
            "cv_log_loss": {f"{k:g}": v for k, v in o["cv_log_loss"].items()},
        }
        preds["occupancy"][name] = o
        f = probe_free_space(train, test, name, folds)
        dist_stats[name] = pf.distance_unit_stats(f["pred"], test.dist, units, n_units)
        report["free_space"][name] = {
            "r2": pf.r2_of(dist_stats[name]), "r2_ci": interval(dist_stats[name], pf.r2_of, n_boot,
                                                              seed),
            "mae_m": pf.mae_of(dist_stats[name]),
            "mae_ci": interval(dist_stats[name], pf.mae_of, n_boot, seed),
            "lambda": f["lam"], "cv_groups": f["cv_groups"],
            "cv_mse": {f"{k:g}": v for k, v in f["cv_mse"].items()},
        }
        preds["free_space"][name] = f
        print(f"[probe] {name:14s} occupancy IoU {report['occupancy'][name]['iou']:.4f}  "
              f"free space R² {report['free_space'][name]['r2']:.4f}  "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    # baselines that read no features
    te = np.nonzero(test.labelled)[0]
    y = test.occ[te]
    report["occupancy"]["all_occupied_iou"] = float(y.mean())
    pos_mean = train.dist.mean(0, keepdims=True)  # the per-cell training mean
    pm = pf.distance_unit_stats(np.broadcast_to(pos_mean, test.dist.shape), test.dist, units,
                             n_units)
    report["free_space"]["per_cell_mean"] = {"r2": pf.r2_of(pm), "mae_m": pf.mae_of(pm)}
    report["occupancy"]["differences"], report["free_space"]["differences"] = {}, {}
    for a, b in references:
        report["occupancy"]["differences"][f"{a} - {b}"] = {
            "iou": compare(occ_stats, pf.iou_of, a, b, n_boot, seed)}
        report["free_space"]["differences"][f"{a} - {b}"] = {
            "r2": compare(dist_stats, pf.r2_of, a, b, n_boot, seed),
            "mae_m": compare(dist_stats, pf.mae_of, a, b, n_boot, seed)}
    return report, preds


# --------------------------------------------------------------------------- the report
def _ci(d: dict, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(d['estimate'])} [{fmt.format(d['low'])}, {fmt.format(d['high'])}]"


def _verdict(d: dict, higher_is_better: bool = True) -> str:
    if d["low"] > 0:
        return "pretrained better" if higher_is_better else "pretrained worse"
    if d["high"] < 0:
        return "pretrained worse" if higher_is_better else "pretrained better"
    return "no difference shown (the interval holds 0)"


def write_markdown(report: dict, out: Path, pictures: list[str]) -> Path:
    occ, fs = report["occupancy"], report["free_space"]
    names = [n for n in report["feature_sets"]]
    lines = [
        f"# Linear probes — {report['checkpoint']} (step {report['checkpoint_step']})", "",
        f"Data: `{report['data']}` ({report['data_note']}); probe fitted on the "
        f"`{report['train']['split']}` split ({report['train']['drives']} drives, "
        f"{report['train']['samples']} sweeps, {report['train']['labelled']} labelled), scored "
        f"on the held-out `{report['test']['split']}` split ({report['test']['drives']} other "
        f"drives, {report['test']['samples']} sweeps, {report['test']['labelled']} labelled).",
        f"Tokens: {report['tokens']} LiDAR tokens of the unmasked input (modalities "
        f"{', '.join(report['modalities'])}). Random init: seed "
        f"{report['random_init_seed']}. 95 % intervals: paired bootstrap over "
        f"{report['bootstrap']['n_units']} held-out units ({report['bootstrap']['unit']}), "
        f"{report['bootstrap']['n_boot']} resamples.", "",
        "## Vehicle occupancy per BEV patch (logistic regression)", "",
        "| features | IoU [95 % CI] | average precision | λ | threshold (CV) |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        r = occ[n]
        lines.append(f"| {n} | {_ci(r['iou_ci'])} | {r['average_precision']:.3f} | "
                     f"{r['lambda']:g} | {r['threshold']:.3f} |")
    lines.append(f"| all patches occupied | {occ['all_occupied_iou']:.3f} | | | |")
    for of, dd in occ.get("differences", {}).items():
        d = dd["iou"]
        lines += ["", f"**{of}: IoU {_ci(d, '{:+.3f}')}** — {_verdict(d)}."]
    lines += [
        "", f"## Free space: distance to the nearest obstacle per BEV cell (ridge; clipped at "
        f"{report['max_dist_m']:g} m, obstacles above z = {report['obstacle_z_m']:g} m)", "",
        "| features | R² [95 % CI] | MAE m [95 % CI] | λ |", "|---|---|---|---|",
    ]
    for n in names:
        r = fs[n]
        lines.append(f"| {n} | {_ci(r['r2_ci'])} | {_ci(r['mae_ci'], '{:.2f}')} | "
                     f"{r['lambda']:g} |")
    pcm = fs["per_cell_mean"]
    lines.append(f"| per-cell training mean | {pcm['r2']:.3f} | {pcm['mae_m']:.2f} | |")
    for of, dd in fs.get("differences", {}).items():
        d, m = dd["r2"], dd["mae_m"]
        lines += ["", f"**{of}: R² {_ci(d, '{:+.3f}')}** — {_verdict(d)}; "
                  f"MAE {_ci(m, '{:+.2f}')} m — {_verdict(m, higher_is_better=False)}."]
    if pictures:
        lines += ["", "## Pictures (held-out drives)", ""]
        lines += [f"![{p}]({p})" for p in pictures]
    path = out / "probe.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_examples(test: ProbeSplit, preds: dict, names: list[str], grid: BEVGrid, patch: int,
                  out: Path) -> Path | None:
    """Per example sweep: the LiDAR BEV, occupancy truth and each feature set's probability,
    distance truth and each feature set's prediction."""
    if not len(test.examples["index"]):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = test.examples["index"]
    gh, gw = grid.shape[0] // patch, grid.shape[1] // patch
    ncol = 2 + 2 * len(names) + 1
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.2 * ncol, 2.4 * len(rows)),
                             squeeze=False)

    def cells(x):  # (P, p·p) → (H, W)
        return x.reshape(gh, gw, patch, patch).transpose(0, 2, 1, 3).reshape(gh * patch,
                                                                             gw * patch)

    for r, i in enumerate(rows):
        s = test.examples["samples"][r]
        panels = [("lidar density", s["lidar"][..., 0], "inferno", (0, 1)),
                  ("vehicles (truth)", test.occ[i].reshape(gh, gw), "gray", (0, 1))]
        for n in names:
            o = preds["occupancy"][n]
            k = int(np.nonzero(o["rows"] == i)[0][0])
            panels.append((f"P(vehicle) {n}", o["prob"][k].reshape(gh, gw), "gray", (0, 1)))
        panels.append(("distance m (truth)", cells(test.dist[i]), "viridis", None))
        for n in names:
            panels.append((f"distance {n}", cells(preds["free_space"][n]["pred"][i]),
                           "viridis", None))
        vmax = float(test.dist[i].max())
        for c, (title, img, cmap, lim) in enumerate(panels):
            ax = axes[r, c]
            lo, hi = lim if lim else (0.0, vmax)
            ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(f"{test.drive[i][-18:]}\nframe {test.frame[i]}", fontsize=7)
        for c in range(len(panels), ncol):
            axes[r, c].axis("off")
    fig.tight_layout()
    path = out / "probe_examples.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_reconstructions(model, cfg, test: ProbeSplit, out: Path, seed: int = 0) -> list[Path]:
    """The MAE's reconstructions of the example sweeps (held-out drives), at its training mask
    ratio: one PNG per modality (train.visualize's layout)."""
    from etl.schema import IMAGE_MODALITIES
    from train.visualize import plot_image_modality, plot_vector_modality

    samples = test.examples.get("samples") or []
    if not samples:
        return []
    batch = {k: np.stack([s[k] for s in samples]) for k in datalib.MODEL_KEYS}
    ratio = cfg.training.mask_ratio
    _, aux = jax.jit(lambda b, k: model(b, k, ratio))(batch, jax.random.PRNGKey(seed))
    aux = jax.device_get(aux)
    paths = []
    tmp = out / "_recon"
    tmp.mkdir(exist_ok=True)
    for m in model.modalities:
        if m in IMAGE_MODALITIES:
            p = plot_image_modality(m, batch, aux, cfg.model.patch_size, cfg.model.norm_pix_loss,
                                    tmp)
        else:
            p = plot_vector_modality(m, batch, aux, tmp)
        if p is not None:
            dest = out / f"recon_{m}.png"
            p.replace(dest)
            paths.append(dest)
    tmp.rmdir()
    return paths


# --------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="runs/NAME, runs/NAME/ckpt or .../ckpt/STEP")
    ap.add_argument("--data", default=None, help="dataset folder (default: the run's data.path)")
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--test-split", "--val-split", dest="test_split", default="val",
                    help="held-out split, no drive shared with the train split (default val)")
    ap.add_argument("--tokens", choices=("fused", "encoder"), default="fused",
                    help="fused tokens at the LiDAR patches (default) or the LiDAR encoder's")
    ap.add_argument("--modalities", default=None,
                    help="comma-separated modalities fed to encode (default: all the model's; "
                         "the policy's view is lidar,gps,imu)")
    ap.add_argument("--no-position", dest="position", action="store_false",
                    help="skip the probes that also get each token's patch index (+pos)")
    ap.add_argument("--folds", type=int, default=5, help="cross-validation folds (groups)")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--random-seed", type=int, default=None,
                    help="init seed of the random model (default: the run's training.seed + 1)")
    ap.add_argument("--obstacle-z", type=float, default=-1.3,
                    help="LiDAR-frame height (m) from which a return is an obstacle (-1.3)")
    ap.add_argument("--max-dist", type=float, default=10.0,
                    help="free-space distances are clipped here (m, default 10)")
    ap.add_argument("--frame-stride", type=int, default=1,
                    help="use every n-th sample of each split (neighbours are near-duplicates)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data-note", default=None,
                    help="what the data is, for the report (default: read from the cache)")
    ap.add_argument("--out", default=None, help="report folder (default: RUN/probe)")
    args = ap.parse_args(argv)
    for key in ("folds", "boot", "frame_stride", "batch_size"):
        if getattr(args, key) < (2 if key == "folds" else 1):
            print(f"train.probe: error: --{key.replace('_', '-')} must be ≥ "
                  f"{2 if key == 'folds' else 1}, got {getattr(args, key)}", file=sys.stderr)
            return 2
    if not args.max_dist > 0:
        print(f"train.probe: error: --max-dist must be > 0, got {args.max_dist}", file=sys.stderr)
        return 2

    from etl import configlib
    from train.pretrain import default_model, load_trained, resolve_ckpt

    overrides = [f"data.path={args.data}"] if args.data else []
    try:  # the checkpoint's config record
        model, cfg, pre, step = load_trained(args.ckpt, overrides=overrides)
    except configlib.ConfigError as e:
        return configlib.cli_error("train.probe", e)
    if "lidar" not in getattr(model, "modalities", cfg.model.modalities):
        print("train.probe: error: the probe reads the LiDAR BEV tokens; this model has no "
              "lidar encoder", file=sys.stderr)
        return 1
    rseed = cfg.training.seed + 1 if args.random_seed is None else args.random_seed
    random_model = default_model()[0](cfg.model, pre, rngs=nnx.Rngs(rseed))
    mods = None
    if args.modalities:
        mods = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
        unknown = sorted(set(mods) - set(model.modalities))
        if unknown or "lidar" not in mods:
            print(f"train.probe: error: --modalities {args.modalities!r}: "
                  + (f"the model has no {unknown}" if unknown else "must include lidar"),
                  file=sys.stderr)
            return 2
    fns = {"pretrained": token_fn(model, args.tokens, mods),
           "random_init": token_fn(random_model, args.tokens, mods)}
    path, patch = cfg.data.path, cfg.model.patch_size
    kw = dict(pre=pre, patch=patch, batch_size=args.batch_size, obstacle_z=args.obstacle_z,
              max_dist=args.max_dist, frame_stride=args.frame_stride)
    t0 = time.perf_counter()
    try:
        train = extract(fns, path, args.train_split, keep_examples=0, **kw)
        test = extract(fns, path, args.test_split, **kw)
        check_disjoint(train, test, path)
        add_pca_baseline(train, test, model.cfg.embed_dim)
        names = ["pretrained", "random_init", "raw_bev_pca"]
        if args.position:
            names += add_position((train, test), names)
        refs = [("pretrained", "random_init")]
        if args.position:
            refs.append(("pretrained+pos", "random_init+pos"))
        report, preds = run_probes(train, test, names, folds=args.folds, n_boot=args.boot,
                                   seed=args.seed, references=refs)
    except (ProbeError, pf.ProbeFitError) as e:
        print(f"train.probe: error: {e}", file=sys.stderr)
        return 1
    note = args.data_note or data_note(path)
    ckpt_dir, _ = resolve_ckpt(args.ckpt)
    out = Path(args.out) if args.out else ckpt_dir.parent / "probe"
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "checkpoint": str(args.ckpt), "checkpoint_step": step, "data": str(path),
        "data_note": note, "tokens": args.tokens,
        "modalities": list(mods or model.modalities), "random_init_seed": rseed,
        "feature_sets": names, "obstacle_z_m": args.obstacle_z, "max_dist_m": args.max_dist,
        "frame_stride": args.frame_stride, "folds": args.folds, "position": args.position,
        "train": _split_summary(train), "test": _split_summary(test), **report,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    shown = [n for n in names if not n.endswith("+pos")]
    pics = [plot_examples(test, preds, shown, pre.lidar, patch, out),
            *plot_reconstructions(model, cfg, test, out)]
    pics = [p.name for p in pics if p is not None]
    (out / "probe.json").write_text(json.dumps(report, indent=2))
    md = write_markdown(report, out, pics)
    occ, fs = report["occupancy"], report["free_space"]
    for of in occ["differences"]:
        print(f"{of}: occupancy IoU {_ci(occ['differences'][of]['iou'], '{:+.4f}')}, free "
              f"space R² {_ci(fs['differences'][of]['r2'], '{:+.4f}')}, MAE "
              f"{_ci(fs['differences'][of]['mae_m'], '{:+.3f}')} m")
    print(f"(all patches occupied: IoU {occ['all_occupied_iou']:.4f})")
    print(f"wrote {out / 'probe.json'} and {md}")
    return 0


def _split_summary(s: ProbeSplit) -> dict:
    return {"split": s.name, "samples": len(s), "labelled": int(s.labelled.sum()),
            "drives": len(set(s.drive.tolist()))}


def data_note(path: str) -> str:
    """What the cache was built from, for the report: "synthetic drives (etl.synth)" when every
    drive's raw source has the ground truth etl.synth writes beside it (``<src>/_truth/<drive
    id>.json``, per the manifest's drive paths), else "recorded drives" — or "unknown" when the
    raw data is no longer there to tell."""
    from etl.dataset import load_manifest

    try:
        drives = load_manifest(path).get("drives", {})
    except Exception:  # noqa: BLE001 — only a label for the report
        return "unknown data"
    seen = []
    for drive_id, rec in drives.items():
        raw = Path(str(rec.get("path", "")))
        if not raw.exists():
            return "unknown data (raw drives not found)"
        root = Path(*raw.parts[:len(raw.parts) - len(Path(drive_id).parts)])
        seen.append((root / "_truth" / f"{drive_id}.json").is_file())
    if seen and all(seen):
        return "synthetic drives (etl.synth)"
    return "recorded drives" if seen and not any(seen) else "unknown data"


if __name__ == "__main__":
    sys.exit(main())
