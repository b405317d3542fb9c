"""The linear probes' statistics, in numpy: solved to convergence, tuned on held-out groups only.

    standardize    per-feature mean/std of the *fitting* rows, applied unchanged to any other rows
    fit_logistic   L2-regularised logistic regression by damped Newton steps (IRLS) to a gradient
                   norm of ``tol``: the optimum, not "a few optimiser steps" — a probe that stops
                   early scores the conditioning of the features, not what they hold
    fit_ridge      multi-output ridge regression, closed form, one eigendecomposition per λ grid
    group_folds    K folds over whole groups (drives, or blocks of consecutive frames), so that
                   neighbouring, nearly identical frames never sit on both sides of a fold
    cv_logistic / cv_ridge
                   λ chosen by out-of-fold loss over the training groups, then the final fit on
                   all of them; the classifier's decision threshold is chosen on the out-of-fold
                   probabilities — the test rows never choose anything
    paired_bootstrap
                   95 % percentile intervals of (model a − model b) from resampling test units
                   (drives or frame blocks) with replacement, the same draw for both models

The intercept is never penalised. Everything is float64 and deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

LAMBDAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


class ProbeFitError(RuntimeError):
    """A probe that could not be fitted (one line saying why)."""


# --------------------------------------------------------------------------- standardisation
@dataclass(frozen=True)
class Standardizer:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        x = np.asarray(x, np.float64)
        std = x.std(0)
        # a constant feature carries nothing: keep it at 0 instead of dividing by ~0
        return cls(x.mean(0), np.where(std > 1e-12, std, 1.0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - self.mean) / self.std


# --------------------------------------------------------------------------- logistic
def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warnings for large |z|


def _log1pexp(z):
    return np.logaddexp(0.0, z)


def logistic_objective(w: np.ndarray, x: np.ndarray, y: np.ndarray, lam: float) -> float:
    """mean log-loss + lam/2·|w[:-1]|²; ``w`` = (weights…, intercept), ``x`` without the 1s."""
    z = x @ w[:-1] + w[-1]
    return float(np.mean(_log1pexp(z) - y * z) + 0.5 * lam * w[:-1] @ w[:-1])


def logistic_gradient(w, x, y, lam) -> np.ndarray:
    r = _sigmoid(x @ w[:-1] + w[-1]) - y
    g = np.append(x.T @ r, r.sum()) / len(y)
    g[:-1] += lam * w[:-1]
    return g


def fit_logistic(x: np.ndarray, y: np.ndarray, lam: float, w0: np.ndarray | None = None,
                 tol: float = 1e-8, max_iter: int = 100) -> np.ndarray:
    """Minimise :func:`logistic_objective` by Newton steps with backtracking.

    Returns ``w`` (D + 1,) with ``|gradient|∞ < tol``; raises :class:`ProbeFitError` if that is
    not reached in ``max_iter`` steps (with lam > 0 the objective is strictly convex, so Newton
    converges quadratically; a failure means broken input such as NaN features).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if not np.isfinite(x).all():
        raise ProbeFitError("fit_logistic: non-finite features")
    n, d = x.shape
    xb = np.concatenate([x, np.ones((n, 1))], axis=1)
    reg = np.full(d + 1, lam)
    reg[-1] = 0.0
    w = np.zeros(d + 1) if w0 is None else np.array(w0, np.float64)
    f = logistic_objective(w, x, y, lam)
    for _ in range(max_iter):
        z = xb @ w
        p = _sigmoid(z)
        g = xb.T @ (p - y) / n + reg * w
        if np.abs(g).max() < tol:
            return w
        h = (xb * (p * (1.0 - p))[:, None]).T @ xb / n
        h[np.diag_indices_from(h)] += reg + 1e-12
        step = np.linalg.solve(h, g)
        t = 1.0
        while True:  # backtracking (Armijo); a full Newton step is accepted near the optimum
            w_new = w - t * step
            f_new = logistic_objective(w_new, x, y, lam)
            if f_new <= f - 1e-4 * t * (g @ step) or t < 1e-10:
                break
            t *= 0.5
        w, f = w_new, f_new
    g = logistic_gradient(w, x, y, lam)
    if np.abs(g).max() < tol:
        return w
    raise ProbeFitError(f"fit_logistic: no convergence in {max_iter} Newton steps "
                        f"(|gradient| {np.abs(g).max():.2e}, lam {lam:g})")


def predict_logistic(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return _sigmoid(np.asarray(x, np.float64) @ w[:-1] + w[-1])


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


# --------------------------------------------------------------------------- ridge
class RidgePath:
    """Multi-output ridge for any λ after one eigendecomposition of the centred Gram matrix.

    ``solve(lam)`` → (W (D, K), b (K,)) minimising mean‖Y − XW − b‖² / 2 + lam/2·‖W‖² (per
    output; the intercept unpenalised).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray):
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64).reshape(len(x), -1)
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise ProbeFitError("fit_ridge: non-finite features or targets")
        self.n = len(x)
        self.x_mean, self.y_mean = x.mean(0), y.mean(0)
        xc = x - self.x_mean
        self.evals, self.evecs = np.linalg.eigh(xc.T @ xc / self.n)
        self.xty = self.evecs.T @ (xc.T @ (y - self.y_mean) / self.n)  # (D, K) in the eigenbasis

    def solve(self, lam: float) -> tuple[np.ndarray, np.ndarray]:
        w = self.evecs @ (self.xty / (np.maximum(self.evals, 0.0) + lam)[:, None])
        return w, self.y_mean - self.x_mean @ w


def fit_ridge(x, y, lam):
    return RidgePath(x, y).solve(lam)


# --------------------------------------------------------------------------- folds
def group_folds(groups: Sequence, k: int = 5) -> list[np.ndarray]:
    """K folds of row indices, each holding whole groups (round-robin over the sorted group
    names, so the assignment is deterministic). Needs at least two groups."""
    groups = np.asarray(groups)
    names = sorted(set(groups.tolist()))
    if len(names) < 2:
        raise ProbeFitError(f"cross-validation needs at least 2 groups, got {len(names)}")
    k = min(k, len(names))
    fold_of = {g: i % k for i, g in enumerate(names)}
    f = np.array([fold_of[g] for g in groups.tolist()])
    return [np.nonzero(f == i)[0] for i in range(k)]


@dataclass
class ClassifierFit:
    predict: Callable[[np.ndarray], np.ndarray]  # raw features → probabilities
    lam: float
    threshold: float
    cv_log_loss: dict[float, float]
    cv_iou: float  # IoU of the out-of-fold predictions at the chosen threshold


@dataclass
class RegressorFit:
    predict: Callable[[np.ndarray], np.ndarray]  # raw features → (n, K)
    lam: float
    cv_mse: dict[float, float]


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    inter = np.logical_and(pred, target).sum()
    union = np.logical_or(pred, target).sum()
    return float(inter / union) if union else float("nan")


def best_iou_threshold(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The threshold t (predict p > t) maximising IoU over every distinct cut of ``p``:
    (t, IoU). Ties go to the higher threshold (fewer positives)."""
    p = np.asarray(p, np.float64).reshape(-1)
    y = np.asarray(y).reshape(-1) > 0
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    tp = np.cumsum(ys)  # predicting the top j+1 positive
    fp = np.cumsum(~ys)
    scores = tp / (ys.sum() + fp)  # |pred ∩ y| / |pred ∪ y|
    last = np.r_[ps[1:] != ps[:-1], True]  # a cut is only possible between distinct values
    scores = np.where(last, scores, -1.0)
    j = int(np.argmax(scores))
    nxt = ps[j + 1] if j + 1 < len(ps) else ps[j] - 1.0
    return float(0.5 * (ps[j] + nxt)), float(scores[j])


def cv_logistic(x: np.ndarray, y: np.ndarray, groups: Sequence, k: int = 5,
                lambdas: Sequence[float] = LAMBDAS) -> ClassifierFit:
    """λ by grouped K-fold out-of-fold log-loss, threshold by out-of-fold IoU, refit on all."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64).reshape(-1)
    if y.min() == y.max():
        raise ProbeFitError(f"occupancy probe: every training target is {y[0]:g}")
    folds = group_folds(groups, k)
    oof = {lam: np.zeros(len(y)) for lam in lambdas}
    for test in folds:
        fit = np.ones(len(y), bool)
        fit[test] = False
        st = Standardizer.fit(x[fit])
        xf, xt = st(x[fit]), st(x[test])
        w = None
        for lam in sorted(lambdas, reverse=True):  # warm start from the smoother solution
            w = fit_logistic(xf, y[fit], lam, w0=w)
            oof[lam][test] = predict_logistic(w, xt)
    losses = {lam: log_loss(oof[lam], y) for lam in lambdas}
    lam = min(lambdas, key=lambda v: (losses[v], -v))
    thr, cv_iou = best_iou_threshold(oof[lam], y)
    st = Standardizer.fit(x)
    w = fit_logistic(st(x), y, lam)
    return ClassifierFit(lambda z: predict_logistic(w, st(z)), lam, thr, losses, cv_iou)


def cv_ridge(x: np.ndarray, y: np.ndarray, groups: Sequence, k: int = 5,
             lambdas: Sequence[float] = LAMBDAS) -> RegressorFit:
    """λ by grouped K-fold out-of-fold mean squared error, then the fit on all rows."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64).reshape(len(x), -1)
    folds = group_folds(groups, k)
    sse = dict.fromkeys(lambdas, 0.0)
    for test in folds:
        fit = np.ones(len(y), bool)
        fit[test] = False
        st = Standardizer.fit(x[fit])
        path = RidgePath(st(x[fit]), y[fit])
        xt = st(x[test])
        for lam in lambdas:
            w, b = path.solve(lam)
            sse[lam] += float(((xt @ w + b - y[test]) ** 2).sum())
    mse = {lam: v / y.size for lam, v in sse.items()}
    lam = min(lambdas, key=lambda v: (mse[v], -v))
    st = Standardizer.fit(x)
    w, b = RidgePath(st(x), y).solve(lam)
    return RegressorFit(lambda z: st(z) @ w + b, lam, mse)


# --------------------------------------------------------------------------- bootstrap
# Per-unit sufficient statistics, so that a bootstrap resample is a sum over units.
def occupancy_unit_stats(prob, threshold, target, units, n_units) -> np.ndarray:
    """(n_units, 2): intersection and union counts of the occupied patches per unit."""
    pred, y = prob > threshold, target > 0
    inter = np.logical_and(pred, y).sum(1)
    union = np.logical_or(pred, y).sum(1)
    return np.stack([np.bincount(units, inter, n_units), np.bincount(units, union, n_units)], 1)


def iou_of(stats: np.ndarray) -> float:
    u = stats[:, 1].sum()
    return float(stats[:, 0].sum() / u) if u else float("nan")


def distance_unit_stats(pred, target, units, n_units) -> np.ndarray:
    """(n_units, 5): Σ squared error, Σ |error|, Σ y, Σ y², number of cells per unit."""
    err = (pred - target).reshape(len(target), -1).astype(np.float64)
    y = target.reshape(len(target), -1).astype(np.float64)
    per = np.stack([(err**2).sum(1), np.abs(err).sum(1), y.sum(1), (y**2).sum(1),
                    np.full(len(y), y.shape[1], np.float64)], 1)
    return np.stack([np.bincount(units, per[:, k], n_units) for k in range(5)], 1)


def r2_of(stats: np.ndarray) -> float:
    sse, _, sy, syy, n = stats.sum(0)
    sst = syy - sy * sy / n
    return float(1.0 - sse / sst) if sst > 0 else float("nan")


def mae_of(stats: np.ndarray) -> float:
    return float(stats[:, 1].sum() / stats[:, 4].sum())


def paired_bootstrap(stat: Callable[[np.ndarray], float], n_units: int, n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Percentile interval of ``stat(idx)`` over ``n_boot`` resamples ``idx`` of ``n_units``
    units drawn with replacement; ``stat(np.arange(n_units))`` is the point estimate.
    ``stat`` computes whatever it compares (e.g. a − b) from the *same* resample, so the
    interval is paired. Returns {estimate, low, high, n_units, n_boot}."""
    if n_units < 2:
        raise ProbeFitError(f"a bootstrap needs at least 2 test units, got {n_units}")
    rng = np.random.default_rng(seed)
    draws = np.array([stat(rng.integers(0, n_units, n_units)) for _ in range(n_boot)])
    draws = draws[np.isfinite(draws)]
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [a, 1.0 - a]) if len(draws) else (np.nan, np.nan)
    return {"estimate": float(stat(np.arange(n_units))), "low": float(lo), "high": float(hi),
            "n_units": int(n_units), "n_boot": int(n_boot)}


def unit_ids(drives: Sequence[str], frames: Sequence[int], min_drives: int = 5,
             block: int = 10) -> tuple[np.ndarray, str]:
    """Bootstrap units of the test rows: whole drives when there are ≥ ``min_drives`` of them,
    else blocks of ``block`` consecutive frames of each drive (neighbouring frames are nearly
    the same picture, so they are resampled together). Returns (unit index per row, kind)."""
    drives = np.asarray(drives)
    frames = np.asarray(frames)
    names = sorted(set(drives.tolist()))
    if len(names) >= min_drives:
        keys = drives.tolist()
        kind = "drive"
    else:
        keys = [f"{d}#{f // block}" for d, f in zip(drives.tolist(), frames.tolist(), strict=True)]
        kind = f"block of {block} frames"
    uniq = {k: i for i, k in enumerate(sorted(set(keys)))}
    return np.array([uniq[k] for k in keys]), kind
