"""The domain gap, shown and measured: what the pretrained encoder sees in the simulator next to
what it was pretrained on.

    python -m rl.domain_gap --ckpt runs/pretrain_cpu [--data data_cache/cpu48] \
        [--tracks austria,procedural:circuit:3] [--samples 240] [--out DIR]

Two sets of model inputs, each an ETL sample (etl/schema.py):

- **ETL**: the held-out split (``--split``, default ``val``) of the checkpoint's dataset — what
  the encoder was pretrained on (real CMHT drives on the cluster; synthetic drives from
  ``etl.synth`` here: the report says which, from the cache's manifest);
- **simulator**: the JAX racecar on ``--tracks``, each sample a random start along the lap
  followed by ``--warmup`` physics steps of the scripted gap follower (so the IMU reads a
  moving car), turned into the same sample by the policy's own seam,
  :class:`rl.envs.adapter.ObservationAdapter` (the 2-D scan at one height as the ETL's BEV,
  the car's motion as IMU, ``--world-scale`` sim metres → real-car metres).

Only the modalities both domains have go in (``--modalities``, default ``lidar,imu``: what the
policy reads); the others are marked absent in both, so the two sets differ only in what the
sensors saw. For the pretrained model and for a random-init model of the same architecture (the
reference: how far apart the two inputs are for an encoder that learnt nothing):

- **reconstruction**: the MAE's masked LiDAR error at its training mask ratio (``--mask-draws``
  draws per sample), absolute and relative to predicting zeros (the BEVs differ in how much of
  them is empty, so the relative error is the comparable one);
- **feature statistics** of the fused LiDAR tokens of the unmasked input: token norm, the
  per-dimension standardised mean difference (|Δ mean| / pooled std, averaged over the
  dimensions), the Fréchet distance between Gaussians fitted to the two sets of tokens —
  next to the same distance between the ETL's train and held-out splits (the within-domain
  floor) — and how well a linear classifier tells the domains apart from a sample's mean token
  (grouped cross-validated accuracy; 0.5 = indistinguishable);
- **inputs**: the fraction of BEV cells with a return and each channel's mean over them.

Intervals: 95 % bootstrap over groups (ETL drives; blocks of ``--block`` simulator samples).

Writes ``OUT/`` (default ``RUN/domain_gap``): ``domain_gap.json`` (every number),
``domain_gap.md`` (tables, pictures, what it shows and what it does not), ``bev_side_by_side.png``
(simulator and ETL BEVs, both channels, with the model's reconstructions).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from etl.dataset import ShardSource
from etl.schema import MODALITY_INDEX
from train import data as datalib
from train import probe_fit as pf


class GapError(RuntimeError):
    """The measurement cannot run on this input (one line naming what and where)."""


# --------------------------------------------------------------------------- the two inputs
def restrict(batch: dict, modalities: Sequence[str]) -> dict:
    """A copy of ``batch`` with every modality outside ``modalities`` marked absent and zeroed
    (so both domains go through the model with the same modalities present)."""
    out = {k: np.array(v, copy=True) for k, v in batch.items()}
    present = out["present"]
    for m, i in MODALITY_INDEX.items():
        if m not in modalities:
            present[:, i] = 0
            if m in out:
                out[m] = np.zeros_like(out[m])
    return out


def etl_samples(path: str, split: str, pre, limit: int, stride: int) -> tuple[dict, np.ndarray]:
    """Every ``stride``-th sample of ``split``, thinned evenly to at most ``limit``: (model batch,
    drive per row)."""
    try:
        src = ShardSource(path, split, keep_meta=True)
    except Exception as e:  # noqa: BLE001 — one line naming the dataset and split
        raise GapError(f"{path}: split {split!r}: {e}") from None
    if len(src) == 0:
        raise GapError(f"{path}: split {split!r} has no samples")
    if src.cfg != pre:
        raise GapError(f"{path}: built with another preprocess config than the checkpoint's")
    idx = np.arange(0, len(src), max(1, stride))
    if len(idx) > limit:  # spread over the whole split (every drive), not its first drives
        idx = idx[np.linspace(0, len(idx) - 1, limit).round().astype(int)]
    samples = [src[int(i)] for i in idx]
    batch = {k: np.stack([s[k] for s in samples]) for k in datalib.MODEL_KEYS}
    drives = np.array([str(s["meta"]["drive"]) for s in samples])
    return batch, drives


def sim_samples(tracks: Sequence[str], pre, n: int, world_scale: float, warmup: int,
                seed: int = 0) -> tuple[dict, np.ndarray]:
    """``n`` simulator samples spread over ``tracks``: a random start along the lap, ``warmup``
    physics steps of the gap follower, then the observation through the policy's adapter.
    Returns (model batch, track per row)."""
    from rl.drivers import gap_follower_obs
    from rl.envs.adapter import ObservationAdapter
    from rl.envs.jax_env import JaxRacecarEnv
    from rl.envs.spec import TaskConfig

    if not tracks:
        raise GapError("no simulator track given (--tracks)")
    adapter = ObservationAdapter(pre, world_scale=world_scale)
    task = TaskConfig(reset_mode="random", time_limit=1e6)
    rows, names = [], []
    for t, track in enumerate(tracks):
        env = JaxRacecarEnv(track, task)
        count = n // len(tracks) + (1 if t < n % len(tracks) else 0)
        for i in range(count):
            obs, _ = env.reset(seed=seed * 100_003 + t * 10_007 + i)
            for _ in range(warmup):
                obs, _, term, trunc, _ = env.step(gap_follower_obs(obs))
                if term or trunc:
                    break
            rows.append(adapter({k: obs[k] for k in ("lidar", "pose", "velocity",
                                                     "acceleration")}))
            names.append(track)
    batch = {k: np.stack([r[k] for r in rows]) for k in datalib.MODEL_KEYS}
    return batch, np.array(names)


# --------------------------------------------------------------------------- model passes
def model_fns(model, modalities: Sequence[str], mask_ratio: float):
    """(tokens(batch) → (B, P, D) fused LiDAR tokens of the unmasked input,
    recon(batch, key) → (B,) masked LiDAR MSE, (B,) the same for predicting zeros)."""
    graphdef, state = nnx.split(model)
    mods = tuple(m for m in model.modalities if m in modalities)

    @jax.jit
    def tokens(state, batch):
        m = nnx.merge(graphdef, state)
        t, _ = m.encode(batch, mods)
        return t[:, m.token_layout(mods)["lidar"]].astype(jnp.float32)

    @jax.jit
    def recon(state, batch, key):
        m = nnx.merge(graphdef, state)
        _, aux = m(batch, key, mask_ratio)
        mask = aux["mask/lidar"].astype(jnp.float32)  # (B, N) 1 = masked
        err = ((aux["pred/lidar"].astype(jnp.float32) - aux["target/lidar"]) ** 2).mean(-1)
        zero = (aux["target/lidar"] ** 2).mean(-1)
        n = jnp.maximum(mask.sum(-1), 1.0)
        return (err * mask).sum(-1) / n, (zero * mask).sum(-1) / n

    return (lambda b: np.asarray(tokens(state, b)),
            lambda b, k: tuple(np.asarray(x) for x in recon(state, b, k)))


def batched(fn, batch: dict, size: int, *extra):
    """Apply ``fn`` to ``batch`` in chunks of ``size`` rows (the last one padded: one shape,
    one compilation); concatenates each output."""
    n = len(batch["present"])
    outs = []
    for j in range(0, n, size):
        part = {k: v[j:j + size] for k, v in batch.items()}
        m = len(part["present"])
        if m < size:
            part = {k: np.concatenate([v, np.repeat(v[-1:], size - m, 0)]) for k, v in part.items()}
        r = fn(part, *extra)
        outs.append(tuple(x[:m] for x in r) if isinstance(r, tuple) else r[:m])
    if isinstance(outs[0], tuple):
        return tuple(np.concatenate([o[i] for o in outs]) for i in range(len(outs[0])))
    return np.concatenate(outs)


# --------------------------------------------------------------------------- statistics
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` and ``b`` (n, D):
    |μa − μb|² + tr(Σa + Σb − 2 (Σa Σb)^½), the trace of the root from the eigenvalues of
    Σa^½ Σb Σa^½ (symmetric, so exact up to round-off)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    mu = a.mean(0) - b.mean(0)
    ca = np.atleast_2d(np.cov(a, rowvar=False))
    cb = np.atleast_2d(np.cov(b, rowvar=False))
    wa, va = np.linalg.eigh(ca)
    ra = (va * np.sqrt(np.clip(wa, 0.0, None))) @ va.T
    cross = np.linalg.eigvalsh(ra @ cb @ ra)
    tr = np.trace(ca) + np.trace(cb) - 2.0 * np.sqrt(np.clip(cross, 0.0, None)).sum()
    return float(mu @ mu + max(tr, 0.0))


def standardised_mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over dimensions of |mean(a) − mean(b)| / pooled std (rows are observations)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    pooled = np.sqrt(0.5 * (a.var(0) + b.var(0)))
    d = np.abs(a.mean(0) - b.mean(0)) / np.where(pooled > 1e-12, pooled, np.inf)
    return float(d.mean())


def domain_accuracy(x: np.ndarray, y: np.ndarray, groups: np.ndarray, k: int = 5,
                    lam: float = 1e-2) -> float:
    """Grouped k-fold accuracy of an L2 logistic regression telling y=1 rows from y=0 rows
    (classes weighted equally: the balanced accuracy of the out-of-fold predictions)."""
    y = np.asarray(y, np.float64)
    pred = np.zeros(len(y))
    for test in pf.group_folds(groups, k):
        fit = np.ones(len(y), bool)
        fit[test] = False
        if y[fit].min() == y[fit].max():
            raise GapError("a cross-validation fold holds one domain only: give more groups")
        st = pf.Standardizer.fit(x[fit])
        w = pf.fit_logistic(st(x[fit]), y[fit], lam)
        pred[test] = pf.predict_logistic(w, st(x[test]))
    hit = (pred > 0.5) == (y > 0.5)
    return float(0.5 * (hit[y > 0.5].mean() + hit[y <= 0.5].mean()))


def group_interval(values: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict:
    """Mean of ``values`` with a 95 % bootstrap interval over whole groups."""
    names, gid = np.unique(groups, return_inverse=True)
    sums = np.bincount(gid, weights=values, minlength=len(names))
    counts = np.bincount(gid, minlength=len(names)).astype(np.float64)
    return pf.paired_bootstrap(lambda i: sums[i].sum() / counts[i].sum(), len(names), n_boot,
                               seed)


def bev_stats(bev: np.ndarray) -> dict:
    """(N, H, W, C) LiDAR BEV → the fraction of cells with a return (channel 0 > 0) and each
    channel's mean over those cells."""
    hit = bev[..., 0] > 0
    out = {"occupied_fraction": float(hit.mean())}
    for c in range(bev.shape[-1]):
        out[f"channel{c}_mean_where_hit"] = float(bev[..., c][hit].mean()) if hit.any() else 0.0
    return out


def measure(fns, real: dict, real_groups: np.ndarray, sim: dict, sim_groups: np.ndarray,
            train_tokens: np.ndarray | None, *, batch_size: int, mask_draws: int, seed: int,
            n_boot: int) -> tuple[dict, dict]:
    """Every number for one model; also returns the arrays the pictures need."""
    tok_fn, rec_fn = fns
    out: dict = {}
    arrays: dict = {}
    for name, batch, groups in (("etl", real, real_groups), ("sim", sim, sim_groups)):
        errs, zeros = [], []
        for d in range(mask_draws):
            e, z = batched(rec_fn, batch, batch_size, jax.random.PRNGKey(seed + d))
            errs.append(e)
            zeros.append(z)
        err, zero = np.mean(errs, 0), np.mean(zeros, 0)
        rel = err / np.maximum(zero, 1e-12)
        tokens = batched(tok_fn, batch, batch_size)
        arrays[name] = tokens
        out[name] = {
            "recon_mse": group_interval(err, groups, n_boot, seed),
            "recon_mse_zero_predictor": group_interval(zero, groups, n_boot, seed),
            "recon_relative": group_interval(rel, groups, n_boot, seed),
            "token_norm": group_interval(np.linalg.norm(tokens, axis=-1).mean(-1), groups,
                                         n_boot, seed),
        }
    a, b = arrays["etl"].reshape(-1, arrays["etl"].shape[-1]), arrays["sim"].reshape(
        -1, arrays["sim"].shape[-1])
    out["frechet_sim_vs_etl"] = frechet_distance(b, a)
    out["standardised_mean_difference"] = standardised_mean_difference(b, a)
    if train_tokens is not None:
        t = train_tokens.reshape(-1, train_tokens.shape[-1])
        out["frechet_etl_train_vs_heldout"] = frechet_distance(t, a)
        out["frechet_ratio"] = out["frechet_sim_vs_etl"] / max(out["frechet_etl_train_vs_heldout"],
                                                               1e-12)
    x = np.concatenate([arrays["etl"].mean(1), arrays["sim"].mean(1)])
    y = np.r_[np.zeros(len(arrays["etl"])), np.ones(len(arrays["sim"]))]
    g = np.r_[np.char.add("etl/", real_groups.astype(str)), np.char.add("sim/", sim_groups)]
    out["domain_classifier_accuracy"] = domain_accuracy(x, y, g)
    return out, arrays


def sim_groups_of(tracks: np.ndarray, block: int) -> np.ndarray:
    """Bootstrap groups of the simulator rows: blocks of ``block`` consecutive samples per
    track (samples of one track are independent starts, but share the track)."""
    out, count = [], {}
    for t in tracks.tolist():
        i = count.get(t, 0)
        count[t] = i + 1
        out.append(f"{t}#{i // block}")
    return np.array(out)


# --------------------------------------------------------------------------- pictures, report
def plot_side_by_side(sim: dict, real: dict, model, modalities, mask_ratio: float, out: Path,
                      n: int = 3, seed: int = 0) -> Path:
    """``n`` simulator and ``n`` ETL BEVs: both channels and the model's reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.encoders import unpatchify

    rows = []
    for name, batch in (("simulator", sim), ("ETL", real)):
        pick = np.linspace(0, len(batch["present"]) - 1, n).astype(int)
        part = {k: v[pick] for k, v in batch.items()}
        _, aux = jax.jit(lambda b, k: model(b, k, mask_ratio))(part, jax.random.PRNGKey(seed))
        h, w, c = part["lidar"].shape[1:]
        p = model.cfg.patch_size
        pred = np.asarray(unpatchify(jnp.asarray(aux["pred/lidar"], jnp.float32), p, (h, w), c))
        for i in range(n):
            rows.append((f"{name} {i}", part["lidar"][i], pred[i]))
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.4 * len(rows)))
    for r, (label, bev, pred) in enumerate(rows):
        for col, (img, title) in enumerate(((bev[..., 0], "log density (ch 0)"),
                                            (bev[..., -1], "max height (ch 1)"),
                                            (pred[..., 0], "MAE reconstruction, ch 0"))):
            ax = axes[r, col]
            ax.imshow(img, origin="lower", cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label}: {title}" if col == 0 else title, fontsize=8)
    fig.suptitle(f"LiDAR BEV, inputs {', '.join(modalities)}; reconstruction at mask "
                 f"{mask_ratio:g}", fontsize=9)
    fig.tight_layout()
    path = out / "bev_side_by_side.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _ci(d: dict, fmt: str = "{:.4f}") -> str:
    return f"{fmt.format(d['estimate'])} [{fmt.format(d['low'])}, {fmt.format(d['high'])}]"


def write_markdown(rep: dict, out: Path) -> Path:
    L = [f"# The domain gap — {rep['checkpoint']} (step {rep['checkpoint_step']})", "",
         f"ETL side: `{rep['data']}` split `{rep['split']}` ({rep['n_etl']} samples, "
         f"{rep['n_etl_groups']} drives): {rep['data_note']}.",
         f"Simulator side: the JAX racecar on {', '.join(rep['tracks'])} ({rep['n_sim']} samples: "
         f"random starts, {rep['warmup']} physics steps of the gap follower), through "
         f"rl.envs.adapter (world scale {rep['world_scale']:g}).",
         f"Modalities present in both: {', '.join(rep['modalities'])}; mask ratio "
         f"{rep['mask_ratio']:g} × {rep['mask_draws']} draws. 95 % intervals: bootstrap over "
         "drives / blocks of simulator samples.", "",
         "## Inputs", "", "| | ETL | simulator |", "|---|---|---|"]
    for k in rep["inputs"]["etl"]:
        L.append(f"| {k} | {rep['inputs']['etl'][k]:.4f} | {rep['inputs']['sim'][k]:.4f} |")
    L += ["", "## What the encoder sees", "",
          "| model | domain | masked LiDAR MSE | relative to predicting zeros | token norm |",
          "|---|---|---|---|---|"]
    for mname, m in rep["models"].items():
        for dom in ("etl", "sim"):
            d = m[dom]
            L.append(f"| {mname} | {dom} | {_ci(d['recon_mse'])} | {_ci(d['recon_relative'])} | "
                     f"{_ci(d['token_norm'], '{:.2f}')} |")
    L += ["", "| model | Fréchet distance sim vs ETL | ETL train vs held-out (floor) | ratio | "
          "standardised mean difference | domain classifier accuracy |",
          "|---|---|---|---|---|---|"]
    for mname, m in rep["models"].items():
        floor = m.get("frechet_etl_train_vs_heldout", float("nan"))
        L.append(f"| {mname} | {m['frechet_sim_vs_etl']:.3f} | {floor:.3f} | "
                 f"{m.get('frechet_ratio', float('nan')):.1f} | "
                 f"{m['standardised_mean_difference']:.3f} | "
                 f"{m['domain_classifier_accuracy']:.3f} |")
    L += ["", "![BEVs side by side](bev_side_by_side.png)", "", "## What this shows, and what not",
          "", *rep["reading"], ""]
    path = out / "domain_gap.md"
    path.write_text("\n".join(L))
    return path


def reading(rep: dict) -> list[str]:
    """Plain statements the numbers support, written from them (and the limits)."""
    pre, rnd = rep["models"]["pretrained"], rep["models"]["random_init"]
    e, s = pre["etl"]["recon_relative"], pre["sim"]["recon_relative"]
    worse = s["low"] > e["high"]
    lines = [
        f"- Reconstruction: the pretrained MAE's relative masked error is {e['estimate']:.3f} on "
        f"held-out ETL samples and {s['estimate']:.3f} on simulator samples — "
        + ("higher in the simulator, the intervals apart: its inputs are out of the "
           "distribution it learnt." if worse else
           "the intervals overlap: no shift shown by this measure."),
        f"- Features: a linear classifier tells the domains apart from a sample's mean token with "
        f"balanced accuracy {pre['domain_classifier_accuracy']:.3f} (pretrained) and "
        f"{rnd['domain_classifier_accuracy']:.3f} (random init); the Fréchet distance between "
        f"the domains' tokens is {pre.get('frechet_ratio', float('nan')):.1f}× the within-ETL "
        f"train-vs-held-out distance (random init: {rnd.get('frechet_ratio', float('nan')):.1f}×).",
        "- The inputs differ before any model sees them: a planar scan at one height gives a thin "
        "ring of returns with one height value, a 32-beam sweep the ground and objects in 3-D "
        f"(cells with a return: {rep['inputs']['sim']['occupied_fraction']:.4f} simulator vs "
        f"{rep['inputs']['etl']['occupied_fraction']:.4f} ETL).",
        "- What it does not show: whether the shift matters for driving. A large distance "
        "between the domains' features says the encoder was not trained on such inputs; whether "
        "its features still help a policy is what the study's arms measure.",
    ]
    if "synthetic" in rep["data_note"].lower():
        lines.append("- The ETL side here is synthetic drives (etl.synth), not real CMHT: the "
                     "gap to real data is not measured by this run.")
    return lines


# --------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rl.domain_gap", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="runs/NAME, runs/NAME/ckpt or .../ckpt/STEP")
    ap.add_argument("--data", default=None, help="dataset folder (default: the run's data.path)")
    ap.add_argument("--split", default="val", help="the ETL split compared (default val)")
    ap.add_argument("--train-split", default="train",
                    help="the split whose distance to --split is the within-domain floor")
    ap.add_argument("--tracks", default="austria", help="comma-separated simulator tracks")
    ap.add_argument("--samples", type=int, default=240, help="samples per domain (at most)")
    ap.add_argument("--etl-stride", type=int, default=1, help="every n-th ETL sample")
    ap.add_argument("--warmup", type=int, default=40,
                    help="physics steps of the gap follower after each random start")
    ap.add_argument("--modalities", default="lidar,imu",
                    help="modalities present in both domains (default lidar,imu)")
    ap.add_argument("--world-scale", type=float, default=10.0)
    ap.add_argument("--mask-draws", type=int, default=4)
    ap.add_argument("--block", type=int, default=10, help="simulator samples per bootstrap group")
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-seed", type=int, default=None,
                    help="init seed of the random model (default: the run's training.seed + 1)")
    ap.add_argument("--out", default=None, help="report folder (default: RUN/domain_gap)")
    args = ap.parse_args(argv)
    for key in ("samples", "etl_stride", "mask_draws", "block", "boot", "batch_size"):
        if getattr(args, key) < 1:
            print(f"rl.domain_gap: error: --{key.replace('_', '-')} must be ≥ 1, got "
                  f"{getattr(args, key)}", file=sys.stderr)
            return 2
    if args.warmup < 0:
        print(f"rl.domain_gap: error: --warmup must be ≥ 0, got {args.warmup}", file=sys.stderr)
        return 2

    from etl import configlib
    from train.pretrain import default_model, load_trained, resolve_ckpt
    from train.probe import data_note

    overrides = [f"data.path={args.data}"] if args.data else []
    try:
        model, cfg, pre, step = load_trained(args.ckpt, overrides=overrides)
    except configlib.ConfigError as e:
        return configlib.cli_error("rl.domain_gap", e)
    mods = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    unknown = sorted(set(mods) - set(model.modalities))
    if unknown or "lidar" not in mods:
        print(f"rl.domain_gap: error: --modalities {args.modalities!r}: "
              + (f"the model has no {unknown}" if unknown else "must include lidar"),
              file=sys.stderr)
        return 2
    sim_side = {"lidar", "imu", "gps"}  # what rl.envs.adapter fills without a camera
    if set(mods) - sim_side:
        print(f"rl.domain_gap: error: --modalities: the simulator gives no "
              f"{sorted(set(mods) - sim_side)}", file=sys.stderr)
        return 2
    tracks = [t.strip() for t in args.tracks.split(",") if t.strip()]
    rseed = cfg.training.seed + 1 if args.random_seed is None else args.random_seed
    random_model = default_model()[0](cfg.model, pre, rngs=nnx.Rngs(rseed))
    ratio = cfg.training.mask_ratio
    path = cfg.data.path
    t0 = time.perf_counter()
    try:
        real, drives = etl_samples(path, args.split, pre, args.samples, args.etl_stride)
        train_b, _ = etl_samples(path, args.train_split, pre, args.samples,
                                 args.etl_stride)
        if len(set(drives.tolist())) < 2:
            raise GapError(f"{path}: split {args.split!r} holds {len(set(drives.tolist()))} "
                           "drive(s); the intervals need ≥ 2")
        sim, sim_tracks = sim_samples(tracks, pre, args.samples, args.world_scale, args.warmup,
                                      args.seed)
    except (GapError, ValueError, FileNotFoundError) as e:
        print(f"rl.domain_gap: error: {e}", file=sys.stderr)
        return 1
    real, train_b, sim = (restrict(b, mods) for b in (real, train_b, sim))
    sim_groups = sim_groups_of(sim_tracks, args.block)
    models = {}
    try:
        for name, m in (("pretrained", model), ("random_init", random_model)):
            fns = model_fns(m, mods, ratio)
            train_tok = batched(fns[0], train_b, args.batch_size)
            models[name], _ = measure(fns, real, drives, sim, sim_groups, train_tok,
                                      batch_size=args.batch_size, mask_draws=args.mask_draws,
                                      seed=args.seed, n_boot=args.boot)
    except (GapError, pf.ProbeFitError) as e:
        print(f"rl.domain_gap: error: {e}", file=sys.stderr)
        return 1
    ckpt_dir, _ = resolve_ckpt(args.ckpt)
    out = Path(args.out) if args.out else ckpt_dir.parent / "domain_gap"
    out.mkdir(parents=True, exist_ok=True)
    rep = {
        "checkpoint": str(args.ckpt), "checkpoint_step": step, "data": str(path),
        "data_note": data_note(path), "split": args.split, "train_split": args.train_split,
        "tracks": tracks, "warmup": args.warmup, "world_scale": args.world_scale,
        "modalities": list(mods), "mask_ratio": ratio, "mask_draws": args.mask_draws,
        "random_init_seed": rseed, "n_etl": int(len(drives)),
        "n_etl_groups": int(len(set(drives.tolist()))), "n_sim": int(len(sim_tracks)),
        "inputs": {"etl": bev_stats(real["lidar"]), "sim": bev_stats(sim["lidar"])},
        "models": models,
    }
    rep["reading"] = reading(rep)
    plot_side_by_side(sim, real, model, mods, ratio, out, seed=args.seed)
    rep["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "domain_gap.json").write_text(json.dumps(rep, indent=2))
    md = write_markdown(rep, out)
    for line in rep["reading"]:
        print(line)
    print(f"wrote {out / 'domain_gap.json'} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
